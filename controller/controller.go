// Package controller is the sidecar's one loop. It watches Consul (the proxy
// registration, the leaf certificate, the CA roots, every upstream's healthy
// endpoints), plans desired - applied, and applies the plan to HAProxy as
// runtime commands, or as a reload with a logged reason. It is the only
// package that knows both Consul and HAProxy.
//
// Its parts: the sources (source_*.go, one per Consul watch, each on
// watch.Loop; identity.go proves upstream endpoints' identity) publish the
// desired state; plan (plan.go) turns the desired and the applied state
// into actions without I/O; the executor (execute.go) takes them to
// HAProxy and records what it reached as the applied state, the next
// plan's input. Run, in this file, drives them.
package controller

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/authzgen"
	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/chain"
	"github.com/haproxy-connect/haproxy-connect/l7"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/slots"
	"github.com/haproxy-connect/haproxy-connect/watch"
)

// Config wires a Controller.
type Config struct {
	// Consul configures the Consul client (api.DefaultConfig with the
	// command line's address and token applied).
	Consul     *api.Config
	ProxyID    string
	StateDir   string
	HAProxyBin string
	SPOASocket string // the SPOE agent's unix socket (absolute path)
	Log        *zap.Logger
	// HAProxyOutput receives HAProxy's own output (default os.Stderr).
	HAProxyOutput io.Writer
	// MinSlots is the smallest number of server slots per upstream (default 8).
	MinSlots int
	// HardStopAfter bounds old workers after a reload
	// (DefaultHardStopAfter).
	HardStopAfter time.Duration
	// InitialWait is how long the first start waits for every upstream's
	// first endpoint list, so HAProxy starts with endpoints (default 3 s).
	InitialWait time.Duration
	AccessLog   bool
	// Threads is HAProxy's thread count (0: HAProxy's default).
	Threads int
	// MaxEndpoints bounds the endpoints of one upstream (default
	// DefaultMaxEndpoints); see capEndpoints for which are kept.
	MaxEndpoints int
	// AnswerLimit bounds the bytes read from one Consul answer (default
	// DefaultMaxAnswerBytes). New applies it to the Consul client it makes.
	AnswerLimit *AnswerLimit
	// OnAdopt, when set, is called (on its own goroutine) after a running
	// HAProxy was adopted, with the intentions generation it holds: the
	// SPOE agent of this process must decide under later generations only
	// (spoa.Authorizer.RaiseGeneration), so that verdicts the previous
	// agent made are all stale.
	OnAdopt func(gen uint64)
	// OnRootsServed, when set, is told the CA roots (PEM) HAProxy verifies
	// client certificates against: before each start (fresh: no other
	// HAProxy process runs) and reload, and after an adoption of a
	// HAProxy running the desired configuration (fresh false: older
	// processes may hold other roots). The SPOE agent relies on HAProxy's
	// verification only for roots it trusts too
	// (spoa.Authorizer.RootsServed).
	OnRootsServed func(rootsPEM string, fresh bool)
}

// haproxyAPI is what the controller needs of the runtime client; tests
// replace it to record the exact command transcript.
type haproxyAPI interface {
	Exec(ctx context.Context, cmds ...runtime.Command) (runtime.Results, error)
	Reload(ctx context.Context, reason string) (runtime.ProcList, error)
	UpdateCert(ctx context.Context, file, pem string) error
	ServersState(ctx context.Context, backend string) ([]runtime.ServerStatus, error)
	Socket() string
	Close() error
}

// Controller owns the applied state of one sidecar's HAProxy.
type Controller struct {
	cfg    Config
	consul *api.Client
	health *healthReader
	log    *zap.Logger
	rt     haproxyAPI
	// startMaster starts HAProxy on the rendered configuration.
	startMaster func(ctx context.Context) (*runtime.Master, error)
	// checkBind is checkBind; tests replace it.
	checkBind func(ctx context.Context, bind netip.AddrPort, wantSerial string) (bindResult, string, error)
	events    chan func(*desired)
	metrics   *Metrics
	ready     atomic.Bool
	// regNotes are the registration notes last seen, each logged once
	// (the registration watch's goroutine only; see publishRegistration).
	regNotes map[Note]bool
	// ident is which upstream endpoints proved their identity (identity.go).
	ident *identities
	// standby reads the upstreams' standby instances (standby.go).
	standby *standbyReader
	// authz is the intentions generation: published by the SPOE agent
	// (its Kick wakes the loop to apply it), applied by the loop.
	authz *authzgen.Generation
	// l7want is the L7 map's table the SPOE agent published (SetL7Map);
	// l7kick wakes the loop to apply it.
	l7want atomic.Pointer[[]l7.Compiled]
	l7kick chan struct{}
	// names are the sources the SPOE agent allowed on a tcp listener
	// whose sources map lacked them (NameSource), that the loop has not
	// added yet; nameKick wakes the loop to add them (sourcesmap.go).
	names    pendingNames
	nameKick chan struct{}

	// Owned by the loop goroutine.
	desired  desired
	applied  applied
	master   *runtime.Master
	watches  map[string]*upstreamWatch
	leafStop context.CancelFunc
	leafFor  string
	retry    *time.Timer
	retryAt  time.Time // when retry fires; zero when it is stopped
	// pacing is when the leaf was last swapped and the reload backoff.
	pacing pacing
	// now is the clock of the plan and the executor; tests replace it.
	now func() time.Time
	// readApplied reads back what a running master that this process did
	// not start serves (adoptAction); nil: adoption is not available.
	readApplied func(ctx context.Context) (applied, error)
	// searched is set once the state directory was searched for a running
	// master to adopt (before the first start only).
	searched bool
	// started is set once HAProxy ran: a later start (after HAProxy
	// exited) that fails is retried instead of ending Run.
	started bool

	// chainWatches are the discovery chain watches, by upstream (owned
	// by the loop goroutine; made on first use).
	chainWatches map[string]*chainWatch
}

// desired is what the watchers last saw. Values are never mutated after they
// are published: a watcher builds a new one and the loop swaps it in.
type desired struct {
	// sidecar is the registration's shape expanded by the discovery
	// chains (expand, chain.go); registration is the registration's own.
	sidecar      *Sidecar
	registration *Sidecar
	// chains are the upstreams' last good discovery chains; chainSeen
	// names the upstreams whose chain watch answered (well or not).
	chains       map[string]*chain.Chain
	chainSeen    map[string]bool
	sidecarSince time.Time
	leaf         *certs.Bundle
	roots        *certs.Roots
	endpoints    map[string][]slots.Endpoint // by upstream name; absent until the first answer
	// instances names each upstream's endpoints (by key) for logs and,
	// for a prepared query, the service they must prove.
	instances map[string]map[netip.AddrPort]instance
	// standby are each upstream's instances that Consul lists but whose
	// checks keep them out of traffic (healthAnswer.standby): their
	// identity is proven ahead, none is placed. Absent for an upstream
	// without standby queries (standby.go), or before the first answer.
	standby map[string]*standbySet
	// dirty names the upstreams whose endpoints changed since they were
	// last applied, with when the oldest unapplied change arrived from
	// Consul: only those are planned, so one endpoint event costs one
	// plan, not one per upstream.
	dirty map[string]time.Time
	// changes are the endpoints that joined or left an upstream HAProxy
	// serves, not yet in effect, for the propagation histogram
	// (propagation.go).
	changes map[string]map[netip.AddrPort]endpointChange
	// chainSince is when a chain watch last published a chain: the
	// reload that adds its new targets waits from then (plan, warming).
	chainSince time.Time
}

// startWaitLog is how often a controller whose HAProxy has not started
// says what it still waits for from Consul. A blocking query that never
// answers is otherwise silent: the watches log only failures.
const startWaitLog = 5 * time.Second

// waitingFor names what the first start lacks from Consul: plan starts
// nothing without all three.
func (d *desired) waitingFor() []string {
	var w []string
	if d.sidecar == nil {
		w = append(w, "registration")
	}
	if d.roots == nil {
		w = append(w, "CA roots")
	}
	if d.leaf == nil {
		w = append(w, "leaf certificate")
	}
	return w
}

// setEndpoints records an upstream's new endpoint list, which arrived from
// Consul at at, and marks it for planning.
func (d *desired) setEndpoints(name string, eps []slots.Endpoint, at time.Time) {
	d.endpoints[name] = eps
	if _, ok := d.dirty[name]; !ok {
		d.dirty[name] = at
	}
}

// applied is what HAProxy runs, as the executor last reached or read it.
type applied struct {
	// known: set by a start, a reload or an adoption; until then nothing
	// else here is.
	known    bool
	sidecar  Sidecar
	leaf     *certs.Bundle
	rootsPEM string
	tables   map[string]slots.Table
	authzGen uint64 // the generation in HAProxy's authz map
	// listenerBroken is why the public listener needs a reload (a leaf
	// swap broke it, see rotateLeaf); empty when it does not.
	listenerBroken string
	// foreign is why an adopted HAProxy needs a reload: it runs another
	// configuration than the desired one (see readBack); empty when not.
	foreign string
	// chainMaps are the routed upstreams' chain map entries HAProxy has.
	chainMaps map[string]map[string]string
	// l7 is the L7 map's keys HAProxy has (true), or refused (false);
	// l7Held the table they come from; l7Unknown: what HAProxy's map
	// holds is unknown (adopted, or a change failed half way), and it is
	// cleared and filled again (l7map.go).
	l7        map[string]bool
	l7Held    []l7.Compiled
	l7Unknown bool
}

type upstreamWatch struct {
	up     Upstream
	cancel context.CancelFunc
}

// Files of the state directory that a restarted controller, and
// "haproxy-connect status", find HAProxy through.
const (
	// PIDFile holds the master's PID (HAProxy writes it: "-p").
	PIDFile = "haproxy.pid"
	// MasterSocket is the master CLI.
	MasterSocket = "master.sock"
	// ExporterSocket is where HAProxy serves its Prometheus exporter
	// (bootstrap.Spec.ExporterSocket). As short as "spoa.sock", so a
	// state directory that fits one fits both.
	ExporterSocket = "prom.sock"
)

// DefaultHardStopAfter is how long an old worker keeps its connections
// after a reload. HTTP connections leave it at once (idle keep-alive ones
// are closed, h2 ones get GOAWAY, and callers retry on the new worker);
// a TCP connection cannot move, so it lives on the old worker until it
// ends or this passes. Reloads are rare here (an upstream added or
// removed, new CA roots), so the default favours long TCP connections:
// a CA rotation, whose re-issued leaves Consul spreads over tens of
// seconds, must not cut a database session. Envoy drains for 10 minutes.
const DefaultHardStopAfter = 5 * time.Minute

// New checks cfg and returns a controller; Run starts it.
func New(cfg Config) (*Controller, error) {
	if cfg.Consul == nil || cfg.ProxyID == "" || cfg.StateDir == "" || cfg.SPOASocket == "" {
		return nil, errors.New("controller: Consul, ProxyID, StateDir and SPOASocket are required")
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.HAProxyOutput == nil {
		cfg.HAProxyOutput = os.Stderr
	}
	if cfg.HAProxyBin == "" {
		cfg.HAProxyBin = "haproxy"
	}
	if cfg.MinSlots <= 0 {
		cfg.MinSlots = 8
	}
	if cfg.HardStopAfter <= 0 {
		cfg.HardStopAfter = DefaultHardStopAfter
	}
	if cfg.InitialWait <= 0 {
		cfg.InitialWait = 3 * time.Second
	}
	if cfg.MaxEndpoints <= 0 {
		cfg.MaxEndpoints = DefaultMaxEndpoints
	}
	if cfg.AnswerLimit == nil {
		cfg.AnswerLimit = NewAnswerLimit(0, cfg.Log.Named("consul"))
	}
	consul, err := api.NewClient(cfg.Consul) // normalises cfg.Consul in place
	if err != nil {
		return nil, fmt.Errorf("controller: consul client: %w", err)
	}
	// After NewClient: for a unix:// address it replaces the HTTP client.
	// The health reader shares this one.
	cfg.AnswerLimit.Limit(cfg.Consul.HttpClient)
	c := &Controller{
		cfg:      cfg,
		consul:   consul,
		health:   newHealthReader(cfg.Consul),
		log:      cfg.Log,
		rt:       runtime.New(filepath.Join(cfg.StateDir, MasterSocket), cfg.Log.Named("runtime")),
		events:   make(chan func(*desired), 1024),
		authz:    authzgen.NewGeneration(),
		l7kick:   make(chan struct{}, 1),
		names:    pendingNames{m: map[[32]byte]string{}},
		nameKick: make(chan struct{}, 1),
		metrics:  newMetrics(cfg.AnswerLimit),
		ident:    newIdentities(),
		standby:  newStandbyReader(),
		desired: desired{endpoints: map[string][]slots.Endpoint{}, dirty: map[string]time.Time{}, instances: map[string]map[netip.AddrPort]instance{},
			standby: map[string]*standbySet{},
			chains:  map[string]*chain.Chain{}, changes: map[string]map[netip.AddrPort]endpointChange{}},
		watches: map[string]*upstreamWatch{},
	}
	c.retry = time.NewTimer(time.Hour)
	c.retry.Stop()
	c.startMaster = func(ctx context.Context) (*runtime.Master, error) {
		return runtime.StartMaster(ctx, cfg.HAProxyBin, c.path("haproxy.cfg"), c.rt.Socket(), c.path(PIDFile), cfg.HAProxyOutput)
	}
	c.checkBind = checkBind
	c.health.filtered = c.aclFiltered()
	c.readApplied = c.readBack
	c.now = time.Now
	return c, nil
}

// SetAuthzGeneration publishes the SPOE agent's intentions generation.
// HAProxy re-authorizes a kept-alive HTTP connection whose verdict is older
// than it. Safe to call from any goroutine; it does not block.
func (c *Controller) SetAuthzGeneration(gen uint64) { c.authz.Publish(gen) }

// WaitAuthzGeneration returns once HAProxy has generation gen (or a later
// one), or after AuthzPublishTimeout, or at once when HAProxy is not
// running (it starts with the current generation). The SPOE agent switches
// to a new generation only then (spoa.WithInvalidateHook).
func (c *Controller) WaitAuthzGeneration(gen uint64) {
	if !c.ready.Load() {
		return // HAProxy starts (or restarts) with the current generation
	}
	if !c.authz.Wait(gen, AuthzPublishTimeout) {
		c.log.Warn("authz generation not in HAProxy in time; the agent switches anyway",
			zap.Uint64("generation", gen), zap.Duration("waited", AuthzPublishTimeout))
	}
}

// AuthzPublishTimeout bounds how long an intentions change waits for
// HAProxy to take its generation before the agent decides under it anyway.
const AuthzPublishTimeout = time.Second

// authzGenerationApplied records that HAProxy has gen and wakes the waiters.
func (c *Controller) authzGenerationApplied(gen uint64) { c.authz.Applied(gen) }

// Ready reports whether HAProxy runs the applied state.
func (c *Controller) Ready() bool { return c.ready.Load() }

// Metrics returns the controller's counters.
func (c *Controller) Metrics() *Metrics { return c.metrics }

// MasterSocket is the path of HAProxy's master socket.
func (c *Controller) MasterSocket() string { return c.rt.Socket() }

func (c *Controller) path(name string) string { return filepath.Join(c.cfg.StateDir, name) }

// Run watches and applies until ctx ends. It leaves HAProxy running: a
// requested stop is Stop, after Run returned; any other end of the process
// (an error, a crash, kill -9) leaves HAProxy serving its last state, for
// the next controller on the state directory to adopt. It returns an error
// when HAProxy cannot be started at all.
func (c *Controller) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	began := time.Now()
	startWait := time.NewTicker(startWaitLog)
	defer startWait.Stop()
	go watch.Loop(ctx, watch.Options{Name: "registration", Log: c.log, MinInterval: time.Second}, c.fetchRegistration, func(svc *api.AgentService) {
		c.publishRegistration(ctx, svc)
	})
	go watch.Loop(ctx, watch.Options{Name: "roots", Log: c.log, MinInterval: time.Second}, c.fetchRoots, func(r *certs.Roots) {
		c.send(ctx, func(d *desired) { d.roots = r })
	})
	go c.watchIdentities(ctx)
	go c.pruneSourcesMap(ctx)
	go c.readStandby(ctx)
	defer c.ready.Store(false)
	for {
		var masterDone <-chan struct{}
		if c.master != nil {
			masterDone = c.master.Done()
		}
		select {
		case <-ctx.Done():
			return nil
		case <-masterDone:
			c.masterExited()
		case f := <-c.events:
			f(&c.desired)
			// Drain what else is queued: act once on the newest state.
			for drained := false; !drained; {
				select {
				case f := <-c.events:
					f(&c.desired)
				default:
					drained = true
				}
			}
		case <-startWait.C:
			if c.master != nil {
				startWait.Stop()
			} else if w := c.desired.waitingFor(); len(w) > 0 {
				c.log.Warn("haproxy not started: still waiting for Consul", zap.Strings("waiting_for", w),
					zap.Duration("waited", time.Since(began).Round(time.Second)))
			}
			continue
		case <-c.retry.C:
			c.retryAt = time.Time{}
		case <-c.authz.Kick():
		case <-c.l7kick:
		case <-c.nameKick:
		}
		if err := c.reconcile(ctx); err != nil {
			return err
		}
	}
}

func (c *Controller) send(ctx context.Context, f func(*desired)) {
	select {
	case c.events <- f:
	case <-ctx.Done():
	}
}

// masterExited handles HAProxy's master exiting unasked: it was killed, or
// the current worker died and took it down (2.6's master exits then; see
// runtime.Master). The next plan starts HAProxy again with the applied
// state: the slots, certificates and maps it had.
func (c *Controller) masterExited() {
	c.ready.Store(false)
	c.metrics.restarts.Add(1)
	c.log.Error("haproxy exited; starting it again with the applied state",
		zap.Int("master_pid", c.master.PID()), zap.Bool("adopted", c.master.Adopted()), zap.NamedError("exit", c.master.Err()))
	c.master = nil
}

// Stop stops HAProxy gracefully: SIGUSR1 has the master close its
// listeners at once and its workers finish what they serve; after grace,
// what is left is killed. Call it once Run has returned, for a requested
// stop only. A master this controller did not reach yet (it stops before
// adopting one) is found on the state directory and stopped too.
func (c *Controller) Stop(grace time.Duration) error {
	c.ready.Store(false)
	defer c.rt.Close()
	m := c.master
	if m == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		m = c.findMaster(ctx)
		cancel()
		if m == nil {
			return nil
		}
	}
	c.log.Info("stopping haproxy", zap.Int("master_pid", m.PID()), zap.Duration("grace", grace))
	start := time.Now()
	if err := m.Stop(grace); err != nil {
		return fmt.Errorf("stop haproxy: %w", err)
	}
	c.log.Info("haproxy stopped", zap.Duration("took", time.Since(start)))
	return nil
}

// scheduleRetry wakes the loop within d; an earlier wake-up already
// scheduled stands, so no caller's retry is pushed back by another's.
func (c *Controller) scheduleRetry(d time.Duration) {
	at := time.Now().Add(d)
	if !c.retryAt.IsZero() && c.retryAt.Before(at) {
		return
	}
	c.retry.Stop()
	c.retry.Reset(d)
	c.retryAt = at
}

// reconcile moves HAProxy toward the desired state: it plans from the
// desired and the applied state and executes the plan, and plans again at
// once (a few times at most) when the executor reached something the plan
// did not foresee. Only a failure to start HAProxy is returned; everything
// else is logged and retried.
func (c *Controller) reconcile(ctx context.Context) error {
	if c.desired.sidecar == nil {
		return nil
	}
	c.syncWatches(ctx)
	if !c.searched && c.master == nil && c.desired.leaf != nil && c.desired.roots != nil {
		// Before the first start: a master left running by an earlier
		// controller on this state directory is adopted (the plan's
		// adoptAction), never run beside a new one.
		c.searched = true
		c.master = c.findMaster(ctx)
	}
	for range maxReplans {
		again, err := c.execute(ctx, plan(c.planInput()))
		if err != nil || !again {
			return err
		}
	}
	return nil
}

// maxReplans bounds the plans of one reconcile: a leaf swap that breaks
// the listener, then a failed reload, then the rest on the running
// configuration.
const maxReplans = 3

// planInput is the plan's input now.
func (c *Controller) planInput() planInput {
	return planInput{
		now:         c.now(),
		desired:     &c.desired,
		applied:     &c.applied,
		masterAlive: c.master != nil,
		authzGen:    c.authz.Wanted(),
		proofs:      c.ident,
		pacing:      c.pacing,
		initialWait: c.cfg.InitialWait,
		minSlots:    c.cfg.MinSlots,
		chainMaps:   c.chainMaps(c.desired.sidecar),
		chainFile:   c.chainMapFile,
		l7:          c.l7Table(),
		namesMap:    c.namesMap(c.applied.sidecar),
		names:       c.names.snapshot(),
	}
}

func (c *Controller) start(ctx context.Context, a startAction) error {
	sc, tables, gen := a.sidecar, a.tables, a.gen
	reason := StartReason
	if c.started {
		reason = "haproxy exited"
	}
	l7t, err := c.writeConfig(c.spec(sc, tables), gen, reason)
	if err != nil {
		return fmt.Errorf("render configuration: %w", err)
	}
	c.rootsServed(a.roots.PEM, true)
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	m, err := c.startMaster(sctx)
	if err != nil {
		return err
	}
	c.master, c.started = m, true
	c.applied = applied{known: true, sidecar: sc, leaf: a.leaf, rootsPEM: a.roots.PEM, tables: tables, authzGen: gen,
		chainMaps: c.chainMaps(&sc), l7: l7Keys(l7t), l7Held: l7t}
	c.authzGenerationApplied(gen)
	clear(c.desired.dirty)
	c.tablesApplied(tables)
	c.ready.Store(true)
	c.metrics.setEndpoints(tables)
	c.log.Info("haproxy started", zap.Int("master_pid", m.PID()), zap.String("master_socket", c.rt.Socket()),
		zap.String("config", c.path("haproxy.cfg")), zap.Int("upstreams", len(sc.Upstreams)))
	return nil
}
