// Package controller is the sidecar's one loop. It watches Consul (the proxy
// registration, the leaf certificate, the CA roots, every upstream's healthy
// endpoints), plans desired - applied, and applies the plan to HAProxy as
// runtime commands, or as a reload with a logged reason. It is the only
// package that knows both Consul and HAProxy.
package controller

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/input"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/slots"
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
	// ident is which upstream endpoints proved their identity (identity.go).
	ident *identities
	// authzGen is the intentions generation published by the SPOE agent;
	// authzKick wakes the loop to apply it.
	authzGen  atomic.Uint64
	authzKick chan struct{}
	// authzApplied is the generation HAProxy has; authzDone is closed
	// (and replaced) each time it moves.
	authzApplied atomic.Uint64
	authzMu      sync.Mutex
	authzDone    chan struct{}

	// Owned by the loop goroutine.
	desired  desired
	applied  applied
	master   *runtime.Master
	watches  map[string]*upstreamWatch
	leafStop context.CancelFunc
	leafFor  string
	retry    *time.Timer
	retryAt  time.Time // when retry fires; zero when it is stopped
	// lastLeafSwap is when the leaf was last swapped at run time (see
	// LeafSwapInterval).
	lastLeafSwap time.Time
	// reloadBackoff spaces attempts after a failed reload (5 s doubling to
	// 1 min, reset by a success); until reloadAfter, runtime changes keep
	// being applied to the running configuration.
	reloadBackoff time.Duration
	reloadAfter   time.Time
	// adoptChecked is set once the state directory was searched for a
	// running master to adopt (at the first start only); adoptedStale is
	// the reload reason when the adopted one runs another configuration.
	adoptChecked bool
	adoptedStale string
	// started is set once HAProxy ran: a later start (after HAProxy
	// exited) that fails is retried instead of ending Run.
	started bool
}

// desired is what the watchers last saw. Values are never mutated after they
// are published: a watcher builds a new one and the loop swaps it in.
type desired struct {
	sidecar      *Sidecar
	sidecarSince time.Time
	leaf         *certs.Bundle
	roots        *certs.Roots
	endpoints    map[string][]slots.Endpoint // by upstream name; absent until the first answer
	// instances names each upstream's endpoints (by key) for logs and,
	// for a prepared query, the service they must prove.
	instances map[string]map[string]instance
	// dirty names the upstreams whose endpoints changed since they were
	// last applied, with when the oldest unapplied change arrived from
	// Consul: only those are planned, so one endpoint event costs one
	// plan, not one per upstream.
	dirty map[string]time.Time
}

// setEndpoints records an upstream's new endpoint list, which arrived from
// Consul at at, and marks it for planning.
func (d *desired) setEndpoints(name string, eps []slots.Endpoint, at time.Time) {
	d.endpoints[name] = eps
	if _, ok := d.dirty[name]; !ok {
		d.dirty[name] = at
	}
}

// applied is what HAProxy runs.
type applied struct {
	sidecar  Sidecar
	leaf     *certs.Bundle
	rootsPEM string
	tables   map[string]slots.Table
	authzGen uint64 // the generation in HAProxy's authz map
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
		cfg:       cfg,
		consul:    consul,
		health:    newHealthReader(cfg.Consul),
		log:       cfg.Log,
		rt:        runtime.New(filepath.Join(cfg.StateDir, MasterSocket), cfg.Log.Named("runtime")),
		events:    make(chan func(*desired), 1024),
		authzKick: make(chan struct{}, 1),
		authzDone: make(chan struct{}),
		metrics:   newMetrics(cfg.AnswerLimit),
		ident:     newIdentities(),
		desired:   desired{endpoints: map[string][]slots.Endpoint{}, dirty: map[string]time.Time{}, instances: map[string]map[string]instance{}},
		watches:   map[string]*upstreamWatch{},
	}
	c.retry = time.NewTimer(time.Hour)
	c.retry.Stop()
	c.startMaster = func(ctx context.Context) (*runtime.Master, error) {
		return runtime.StartMaster(ctx, cfg.HAProxyBin, c.path("haproxy.cfg"), c.rt.Socket(), c.path(PIDFile), cfg.HAProxyOutput)
	}
	c.checkBind = checkBind
	return c, nil
}

// SetAuthzGeneration publishes the SPOE agent's intentions generation.
// HAProxy re-authorizes a kept-alive HTTP connection whose verdict is older
// than it. Safe to call from any goroutine; it does not block.
func (c *Controller) SetAuthzGeneration(gen uint64) {
	c.authzGen.Store(gen)
	select {
	case c.authzKick <- struct{}{}:
	default:
	}
}

// WaitAuthzGeneration returns once HAProxy has generation gen (or a later
// one), or after AuthzPublishTimeout, or at once when HAProxy is not
// running (it starts with the current generation). The SPOE agent switches
// to a new generation only then (spoa.WithInvalidateHook).
func (c *Controller) WaitAuthzGeneration(gen uint64) {
	if !c.ready.Load() {
		return // HAProxy starts (or restarts) with the current generation
	}
	timeout := time.NewTimer(AuthzPublishTimeout)
	defer timeout.Stop()
	for c.authzApplied.Load() < gen {
		c.authzMu.Lock()
		done := c.authzDone
		c.authzMu.Unlock()
		if c.authzApplied.Load() >= gen {
			return
		}
		select {
		case <-done:
		case <-timeout.C:
			c.log.Warn("authz generation not in HAProxy in time; the agent switches anyway",
				zap.Uint64("generation", gen), zap.Duration("waited", AuthzPublishTimeout))
			return
		}
	}
}

// AuthzPublishTimeout bounds how long an intentions change waits for
// HAProxy to take its generation before the agent decides under it anyway.
const AuthzPublishTimeout = time.Second

// authzGenerationApplied records that HAProxy has gen and wakes the waiters.
func (c *Controller) authzGenerationApplied(gen uint64) {
	c.authzApplied.Store(gen)
	c.authzMu.Lock()
	close(c.authzDone)
	c.authzDone = make(chan struct{})
	c.authzMu.Unlock()
}

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
	go watchLoop(ctx, c.log, "registration", time.Second, c.fetchRegistration, func(svc *api.AgentService) {
		c.publishRegistration(ctx, svc)
	})
	go watchLoop(ctx, c.log, "roots", time.Second, c.fetchRoots, func(r *certs.Roots) {
		c.send(ctx, func(d *desired) { d.roots = r })
	})
	go c.watchIdentities(ctx)
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
		case <-c.retry.C:
			c.retryAt = time.Time{}
		case <-c.authzKick:
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
// runtime.Master). The next reconcile starts HAProxy again with the
// applied state: the slots, certificates and maps it had.
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
		m, _ = c.findMaster(ctx)
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

// reconcile moves HAProxy toward the desired state. Only a failure to start
// HAProxy is returned; everything else is logged and retried.
func (c *Controller) reconcile(ctx context.Context) error {
	d := &c.desired
	if d.sidecar == nil {
		return nil
	}
	c.syncWatches(ctx)
	if d.leaf == nil || d.roots == nil {
		return nil
	}
	if c.master == nil && !c.adoptChecked {
		c.adoptChecked = true
		if m, pl := c.findMaster(ctx); m != nil && !c.adopt(ctx, m, pl) {
			c.log.Warn("stopping the haproxy that could not be adopted", zap.Int("master_pid", m.PID()))
			_ = m.Stop(5 * time.Second)
		}
	}
	if c.master == nil {
		if c.started {
			// HAProxy exited: serve again at once, with what is known.
			if err := c.start(ctx); err != nil {
				c.log.Error("haproxy did not start again; retrying", zap.Error(err))
				c.scheduleRetry(time.Second)
			}
			return nil
		}
		for _, u := range d.sidecar.Upstreams {
			if _, ok := d.endpoints[u.Name]; !ok {
				if wait := c.cfg.InitialWait - time.Since(d.sidecarSince); wait > 0 {
					c.scheduleRetry(wait)
					return nil
				}
				c.log.Warn("starting before the first endpoint list of an upstream", zap.String("upstream", u.Name))
			}
		}
		// Start with the endpoints already proven: their results come
		// back as events within milliseconds, so wait for them too.
		if c.pendingVerification(ctx) {
			if wait := c.cfg.InitialWait - time.Since(d.sidecarSince); wait > 0 {
				c.scheduleRetry(wait)
				return nil
			}
			c.log.Warn("starting before every upstream endpoint is verified; they join as they prove their identity")
		}
		return c.start(ctx)
	}

	var reasons []string
	if c.adoptedStale != "" {
		reasons = append(reasons, c.adoptedStale)
	}
	if !d.sidecar.Equal(c.applied.sidecar) {
		reasons = append(reasons, "registration: "+c.applied.sidecar.Diff(*d.sidecar))
	}
	if d.roots.PEM != c.applied.rootsPEM {
		// HAProxy 2.6 breaks on "commit ssl ca-file" (haproxy GH #3165,
		// fixed in 3.3): roots change by rewriting the file and reloading.
		reasons = append(reasons, "CA roots changed")
	}
	if len(reasons) > 0 {
		if wait := time.Until(c.reloadAfter); wait > 0 {
			// A reload failed recently: retry later, and meanwhile keep the
			// running configuration's endpoints and certificates current.
			c.scheduleRetry(wait)
		} else if c.reload(ctx, strings.Join(reasons, "; ")) {
			return nil
		}
	}
	if d.leaf.PEM != c.applied.leaf.PEM {
		c.rotateLeaf(ctx)
	}
	c.applyAuthzGeneration(ctx)
	c.applyEndpoints(ctx)
	return nil
}

// applyAuthzGeneration writes the intentions generation to the authz map
// file (for the next reload) and to HAProxy's copy in memory.
func (c *Controller) applyAuthzGeneration(ctx context.Context) {
	gen := c.authzGen.Load()
	if gen <= c.applied.authzGen {
		// Never backwards: an adopted HAProxy may hold a later generation
		// than this process's agent has reached (Config.OnAdopt).
		return
	}
	file := c.path("authz.map")
	if err := certs.WriteFile(file, bootstrap.RenderAuthzMap(gen)); err != nil {
		c.log.Error("authz generation: write map", zap.Error(err))
		c.scheduleRetry(time.Second)
		return
	}
	cmd, err := runtime.SetMap(file, bootstrap.AuthzGenKey, strconv.FormatUint(gen, 10))
	if err == nil {
		var rs runtime.Results
		if rs, err = c.rt.Exec(ctx, cmd); err == nil {
			err = rs.Err()
		}
	}
	if err != nil {
		c.log.Error("authz generation not applied; retrying", zap.Uint64("generation", gen), zap.Error(err))
		c.metrics.runtimeErrors.Add(1)
		c.scheduleRetry(100 * time.Millisecond)
		return
	}
	c.applied.authzGen = gen
	c.authzGenerationApplied(gen)
	c.log.Debug("authz generation applied", zap.Uint64("generation", gen))
}

// plannedTables is the slot assignment to render into a new configuration:
// each upstream's table moved to its desired endpoints and resized to have
// room to grow, keeping slots where they are. Only endpoints that proved
// their identity are placed.
func (c *Controller) plannedTables(ctx context.Context) map[string]slots.Table {
	out := map[string]slots.Table{}
	for _, u := range c.desired.sidecar.Upstreams {
		t, ok := c.applied.tables[u.Name]
		if !ok {
			t = slots.New(u.Name, bootstrap.SlotPrefix, c.cfg.MinSlots)
		}
		if eps, seen := c.desired.endpoints[u.Name]; seen {
			eps, _ = c.verifiedEndpoints(ctx, u.Name, eps)
			_, t, _ = slots.Plan(t, eps)
		}
		out[u.Name] = slots.Resize(t, slots.Size(t.Used(), c.cfg.MinSlots))
	}
	return out
}

func (c *Controller) spec(sc Sidecar, tables map[string]slots.Table) bootstrap.Spec {
	s := bootstrap.Spec{
		Service:       sc.Service,
		LeafFile:      c.path("leaf.pem"),
		RootsFile:     c.path("roots.pem"),
		SPOEFile:      c.path("spoe.cfg"),
		AuthzMap:      c.path("authz.map"),
		InstanceMap:   c.path(InstanceMapFile),
		StateMap:      c.path(StateMapFile),
		CrtList:       c.path("public.crtlist"),
		SNI:           c.publicSNI(),
		SPOASocket:    c.cfg.SPOASocket,
		HardStopAfter: c.cfg.HardStopAfter,
		AccessLog:     c.cfg.AccessLog,
		Threads:       c.cfg.Threads,
		Public:        sc.Public,
	}
	for _, u := range sc.Upstreams {
		s.Upstreams = append(s.Upstreams, bootstrap.Upstream{
			Name: u.Name, Destination: u.Destination, BindAddr: u.BindAddr, BindPort: u.BindPort,
			Protocol: u.Protocol, ConnectTimeout: u.ConnectTimeout, Slots: tables[u.Name],
			ServerID: c.serverID(u), Instances: instanceIDs(c.desired.instances[u.Name]),
		})
	}
	return s
}

// writeConfig renders and writes every file HAProxy reads; reason is why
// HAProxy loads it (recorded in the state map).
func (c *Controller) writeConfig(spec bootstrap.Spec, authzGen uint64, reason string) error {
	spec.ConfigID, spec.Reason = c.configID(*c.desired.sidecar, c.desired.roots.PEM), reason
	cfg, files, err := bootstrap.RenderFiles(spec, authzGen)
	if err != nil {
		return err
	}
	files = append(files,
		bootstrap.File{Path: spec.LeafFile, Content: c.desired.leaf.PEM},
		bootstrap.File{Path: spec.RootsFile, Content: c.desired.roots.PEM},
		bootstrap.File{Path: c.path("haproxy.cfg"), Content: cfg}) // last: it names the others
	for _, f := range files {
		if err := certs.WriteFile(f.Path, f.Content); err != nil {
			return err
		}
	}
	return nil
}

func (c *Controller) start(ctx context.Context) error {
	sc := *c.desired.sidecar
	tables := c.plannedTables(ctx)
	gen := c.authzGen.Load()
	reason := StartReason
	if c.started {
		reason = "haproxy exited"
	}
	if err := c.writeConfig(c.spec(sc, tables), gen, reason); err != nil {
		return fmt.Errorf("render configuration: %w", err)
	}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	m, err := c.startMaster(sctx)
	if err != nil {
		return err
	}
	c.master = m
	c.started = true
	c.applied = applied{sidecar: sc, leaf: c.desired.leaf, rootsPEM: c.desired.roots.PEM, tables: tables, authzGen: gen}
	c.authzGenerationApplied(gen)
	clear(c.desired.dirty)
	c.ready.Store(true)
	c.metrics.setEndpoints(tables)
	c.log.Info("haproxy started", zap.Int("master_pid", m.PID()), zap.String("master_socket", c.rt.Socket()),
		zap.String("config", c.path("haproxy.cfg")), zap.Int("upstreams", len(sc.Upstreams)))
	return nil
}

// reload renders the desired configuration and reloads HAProxy; it reports
// whether the reload was applied.
func (c *Controller) reload(ctx context.Context, reason string) bool {
	sc := *c.desired.sidecar
	tables := c.plannedTables(ctx)
	gen := c.authzGen.Load()
	if err := c.writeConfig(c.spec(sc, tables), gen, reason); err != nil {
		c.log.Error("reload skipped: configuration not rendered", zap.String("reason", reason), zap.Error(err))
		c.reloadFailed()
		return false
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	start := time.Now()
	if _, err := c.rt.Reload(rctx, reason); err != nil {
		c.log.Error("reload failed; the previous worker keeps serving", zap.String("reason", reason), zap.Error(err),
			zap.Duration("retry_in", c.reloadFailed()))
		return false
	}
	c.reloadBackoff, c.reloadAfter = 0, time.Time{}
	c.adoptedStale = ""
	c.metrics.reloads.Add(1)
	c.applied = applied{sidecar: sc, leaf: c.desired.leaf, rootsPEM: c.desired.roots.PEM, tables: tables, authzGen: gen}
	c.authzGenerationApplied(gen)
	clear(c.desired.dirty)
	c.metrics.setEndpoints(tables)
	c.log.Info("reload applied", zap.String("reason", reason), zap.Duration("took", time.Since(start)))
	return true
}

// reloadFailed counts a failed reload and backs off the next attempt.
func (c *Controller) reloadFailed() time.Duration {
	c.metrics.reloadFailures.Add(1)
	c.reloadBackoff = min(max(2*c.reloadBackoff, 5*time.Second), time.Minute)
	c.reloadAfter = time.Now().Add(c.reloadBackoff)
	c.scheduleRetry(c.reloadBackoff)
	return c.reloadBackoff
}

// LeafSwapInterval is the least time between two run-time swaps of the
// leaf. Consul hands out a new leaf on every fetch while a leaf's lifetime
// is under 10 minutes (its agent/leafcert soft expiry), so a short
// LeafCertTTL would otherwise make the sidecar swap many times a second;
// each swap builds new TLS contexts in every worker. The newest leaf waits
// out the interval, unless the one HAProxy serves expires first.
const LeafSwapInterval = 5 * time.Second

// rotateLeaf writes the new leaf to disk (for the next reload) and swaps it
// in memory: one "set ssl cert" + "commit" replaces it on the public bind
// (through its crt-list entry: see bootstrap.RenderCrtList) and on every
// upstream server that uses it as client certificate. Then a handshake
// checks that the public listener serves the new leaf and still asks for
// a client certificate; if not, a reload (which reads the written files)
// restores it.
func (c *Controller) rotateLeaf(ctx context.Context) {
	leaf := c.desired.leaf
	if wait := time.Until(c.lastLeafSwap.Add(LeafSwapInterval)); wait > 0 && time.Until(c.applied.leaf.NotAfter) > wait {
		c.scheduleRetry(wait)
		return
	}
	file := c.path("leaf.pem")
	if err := certs.WriteFile(file, leaf.PEM); err != nil {
		c.log.Error("leaf rotation: write file", zap.Error(err))
		c.scheduleRetry(5 * time.Second)
		return
	}
	if err := c.rt.UpdateCert(ctx, file, leaf.PEM); err != nil {
		c.log.Error("leaf rotation failed", zap.String("serial", leaf.Serial), zap.Error(err))
		c.metrics.runtimeErrors.Add(1)
		c.scheduleRetry(5 * time.Second)
		return
	}
	c.lastLeafSwap = time.Now()
	c.applied.leaf = leaf
	c.metrics.leafRotations.Add(1)
	c.log.Info("leaf certificate rotated", zap.String("serial", leaf.Serial), zap.Time("not_after", leaf.NotAfter), zap.String("spiffe", leaf.SPIFFE))

	p := c.applied.sidecar.Public
	bind := netip.AddrPortFrom(netip.MustParseAddr(p.BindAddr), uint16(p.BindPort))
	res, served, err := c.checkBind(ctx, bind, leaf.Serial)
	c.metrics.bindChecks[res].Add(1)
	switch res {
	case bindOK:
		c.log.Debug("public listener checked after the leaf swap", zap.String("serial", served))
	case bindUnreachable:
		c.log.Warn("public listener not checked after the leaf swap", zap.Stringer("bind", bind), zap.Error(err))
	default:
		reason := "public listener lost client certificate verification after the leaf swap"
		if res == bindWrongLeaf {
			reason = "public listener serves another leaf after the swap"
		}
		c.log.Error(reason, zap.Stringer("bind", bind), zap.String("want_serial", leaf.Serial), zap.String("served_serial", served))
		c.reload(ctx, reason)
	}
}

// publicSNI is the public listener's crt-list filter: the service's Consul
// SNI name, from the leaf's SPIFFE ID, or a fixed name where that is not a
// plain DNS name (any name serves, see bootstrap.RenderCrtList).
func (c *Controller) publicSNI() string {
	if id, err := certs.ParseSPIFFE(c.desired.leaf.SPIFFE); err == nil {
		if sni := id.SNI(); bootstrap.ValidSNI(sni) {
			return sni
		}
	}
	return bootstrap.FallbackSNI
}

// applyEndpoints sends every upstream's slot operations in one batch.
func (c *Controller) applyEndpoints(ctx context.Context) {
	type planned struct {
		next    slots.Table
		ops     int
		first   int  // index of its first command in the batch
		pending bool // endpoints still being verified: stays dirty
	}
	plans := map[string]planned{}
	var cmds, mapCmds []runtime.Command
	names := make([]string, 0, len(c.desired.dirty))
	for name := range c.desired.dirty {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		eps, seen := c.desired.endpoints[name]
		table, applied := c.applied.tables[name]
		if !seen || !applied {
			continue // a new upstream: its reload applies it
		}
		// An endpoint carries no request before it proved its identity.
		ok, pending := c.verifiedEndpoints(ctx, name, eps)
		if pending && time.Since(c.desired.dirty[name]) < maxHold {
			ok = holdLeaving(table, eps, ok)
		}
		eps = ok
		ops, next, _ := slots.Plan(table, eps)
		if len(ops) == 0 {
			if !pending {
				delete(c.desired.dirty, name)
			}
			continue
		}
		p := planned{next: next, first: len(cmds), pending: pending}
		for _, op := range ops {
			cmd, err := c.command(name, op)
			if err != nil {
				c.log.Error("cannot build runtime command", zap.String("upstream", name), zap.Error(err))
				continue
			}
			cmds = append(cmds, cmd)
			p.ops++
		}
		plans[name] = p
		mapCmds = append(mapCmds, c.instanceMapCommands(name, ops, next)...)
	}
	if len(cmds) == 0 {
		return
	}
	nSlot := len(cmds)
	cmds = append(cmds, mapCmds...)
	start := time.Now()
	rs, err := c.rt.Exec(ctx, cmds...)
	c.metrics.runtimeCommands.Add(uint64(len(cmds)))
	c.metrics.batches.Add(1)
	if err != nil {
		c.log.Error("runtime batch failed", zap.Int("commands", len(cmds)), zap.Error(err))
		c.metrics.runtimeErrors.Add(1)
		for name := range plans {
			c.resync(ctx, name)
		}
		c.scheduleRetry(time.Second)
		return
	}
	failed := false
	for name, p := range plans {
		var errs []error
		for _, r := range rs[p.first : p.first+p.ops] {
			if r.Err != nil {
				errs = append(errs, r.Err)
			}
		}
		if len(errs) == 0 {
			c.applied.tables[name] = p.next
			if !p.pending {
				c.metrics.propagation.observe(time.Since(c.desired.dirty[name]))
				delete(c.desired.dirty, name)
			}
			continue
		}
		failed = true
		c.metrics.runtimeErrors.Add(uint64(len(errs)))
		c.log.Error("runtime commands failed; re-reading the backend", zap.String("upstream", name), zap.Errors("errors", errs))
		c.resync(ctx, name)
	}
	c.checkInstanceMap(rs[nSlot:])
	c.metrics.setEndpoints(c.applied.tables)
	c.log.Debug("endpoints applied", zap.Int("commands", len(cmds)), zap.Duration("took", time.Since(start)))
	if failed {
		c.scheduleRetry(time.Second)
	}
}

// resync rebuilds an upstream's applied table from what HAProxy reports.
func (c *Controller) resync(ctx context.Context, name string) {
	st, err := c.rt.ServersState(ctx, name)
	if err != nil {
		c.log.Error("re-read backend failed", zap.String("upstream", name), zap.Error(err))
		return
	}
	obs := make([]slots.Observed, 0, len(st))
	for _, s := range st {
		obs = append(obs, slots.Observed{Name: s.Name, Addr: s.Addr, Port: s.Port, Weight: s.Weight, Maint: s.Maint()})
	}
	templates := 0
	for _, s := range c.applied.tables[name].Slots {
		if !s.Dynamic {
			templates++
		}
	}
	c.applied.tables[name] = slots.FromObserved(name, bootstrap.SlotPrefix, templates, obs)
}

// command translates a planned slot operation into a runtime command.
func (c *Controller) command(backend string, op slots.Op) (runtime.Command, error) {
	o := runtime.ServerOptions{Weight: op.Weight, SSL: true, CrtFile: c.path("leaf.pem"), CAFile: c.path("roots.pem")}
	if op.Kind == slots.OpAdd {
		for _, u := range c.applied.sidecar.Upstreams {
			if u.Name == backend {
				o.ALPN = bootstrap.UpstreamALPN(u.Protocol)
			}
		}
	}
	return SlotCommand(backend, op, o)
}

// SlotCommand is the runtime command for a planned slot operation; add
// holds the server options of "add server" (its weight is the op's).
func SlotCommand(backend string, op slots.Op, add runtime.ServerOptions) (runtime.Command, error) {
	switch op.Kind {
	case slots.OpSetAddr:
		return runtime.SetServerAddr(backend, op.Server, op.Addr, op.Port)
	case slots.OpSetWeight:
		return runtime.SetServerWeight(backend, op.Server, op.Weight)
	case slots.OpReady:
		return runtime.SetServerState(backend, op.Server, runtime.StateReady)
	case slots.OpMaint:
		return runtime.SetServerState(backend, op.Server, runtime.StateMaint)
	case slots.OpAdd:
		add.Weight = op.Weight
		return runtime.AddServer(backend, op.Server, op.Addr, op.Port, add)
	}
	return runtime.Command{}, fmt.Errorf("unknown slot operation %d", op.Kind)
}

// syncWatches runs one endpoint watch per desired upstream and the leaf
// watch for the destination service.
func (c *Controller) syncWatches(ctx context.Context) {
	sc := c.desired.sidecar
	want := map[string]Upstream{}
	for _, u := range sc.Upstreams {
		want[u.Name] = u
	}
	for name, w := range c.watches {
		if u, ok := want[name]; !ok || u != w.up {
			w.cancel()
			delete(c.watches, name)
			delete(c.desired.endpoints, name)
			delete(c.desired.instances, name)
		}
	}
	for name, u := range want {
		if _, ok := c.watches[name]; ok {
			continue
		}
		wctx, cancel := context.WithCancel(ctx)
		c.watches[name] = &upstreamWatch{up: u, cancel: cancel}
		go c.watchUpstream(wctx, u)
	}
	if c.leafFor != sc.Service {
		if c.leafStop != nil {
			c.leafStop()
		}
		lctx, cancel := context.WithCancel(ctx)
		c.leafStop, c.leafFor = cancel, sc.Service
		service := sc.Service
		go watchLoop(lctx, c.log, "leaf", time.Second, func(ctx context.Context, cur cursor) (*certs.Bundle, cursor, error) {
			return c.fetchLeaf(ctx, service, cur)
		}, func(b *certs.Bundle) { c.send(lctx, func(d *desired) { d.leaf = b }) })
	}
}

func (c *Controller) publishRegistration(ctx context.Context, svc *api.AgentService) {
	sc, rejected, err := ParseRegistration(svc)
	if err != nil {
		c.log.Error("proxy registration rejected; keeping the applied configuration", zap.String("proxy_id", c.cfg.ProxyID), zap.Error(err))
		return
	}
	for _, r := range rejected {
		c.log.Error("upstream rejected; the other upstreams keep working", zap.String("proxy_id", c.cfg.ProxyID), zap.Error(r))
	}
	c.send(ctx, func(d *desired) {
		if d.sidecar == nil {
			d.sidecarSince = time.Now()
		}
		d.sidecar = &sc
	})
}

func (c *Controller) watchUpstream(ctx context.Context, u Upstream) {
	var last []slots.Endpoint
	first := true
	p := &pendingList{taken: make(chan struct{}, 1)}
	filter := newInstanceFilter(u.Name, c.log, c.metrics)
	filter.max, filter.proxyID = c.cfg.MaxEndpoints, c.cfg.ProxyID
	publish := func(l endpointList) {
		if !first && slices.Equal(l.eps, last) {
			return
		}
		first, last = false, l.eps
		c.metrics.endpointUpdates.Add(1)
		if !p.put(l) {
			// The loop has not taken the previous list yet (it is
			// applying a batch): this one replaced it. Query again only
			// once the loop has taken it, so that a slow apply does not
			// have Consul encode, and this process decode, whole
			// instance lists that are replaced unread (in a burst of
			// 1000, about one per few ms, each about 1 MB).
			select {
			case <-p.taken:
			case <-ctx.Done():
			}
			return
		}
		c.send(ctx, func(d *desired) {
			l, ok := p.take()
			if !ok {
				return
			}
			if w, ok := c.watches[u.Name]; ok && w.up == u { // not a stale watch
				d.setEndpoints(u.Name, l.eps, l.at)
				d.instances[u.Name] = l.inst
			}
		})
	}
	if u.Type == string(api.UpstreamDestTypePreparedQuery) {
		// Prepared queries do not block: poll.
		watchLoop(ctx, c.log, "query "+u.Destination, 2*time.Second, func(ctx context.Context, _ cursor) (endpointList, cursor, error) {
			resp, _, err := c.consul.PreparedQuery().Execute(u.Destination, (&api.QueryOptions{Connect: true, Datacenter: u.Datacenter}).WithContext(ctx))
			if err != nil {
				return endpointList{}, cursor{}, err
			}
			at := time.Now()
			entries := make([]healthEntry, 0, len(resp.Nodes))
			for _, e := range resp.Nodes {
				if e.Service == nil {
					continue
				}
				he := healthEntry{ID: e.Service.ID, Address: e.Service.Address, Port: e.Service.Port, Weight: e.Service.Weights.Passing}
				if e.Node != nil {
					he.NodeAddress = e.Node.Address
				}
				entries = append(entries, he)
			}
			return endpointList{eps: filter.endpoints(entries, nil), inst: queryInstances(resp), at: at}, cursor{}, nil
		}, publish)
		return
	}
	watchLoop(ctx, c.log, "upstream "+u.Name, 10*time.Millisecond, func(ctx context.Context, cur cursor) (endpointList, cursor, error) {
		entries, bad, index, at, err := c.health.connect(ctx, u.Destination, u.Datacenter, cur.index, 5*time.Minute)
		if err != nil {
			return endpointList{}, cur, err
		}
		return endpointList{eps: filter.endpoints(entries, bad), inst: healthInstances(entries), at: at}, cursor{index: index}, nil
	}, publish)
}

// endpointList is one answer of an upstream's watch, and when it arrived.
type endpointList struct {
	eps  []slots.Endpoint
	inst map[string]instance // by endpoint key
	at   time.Time
}

// pendingList holds an upstream's newest list between its watch and the
// controller loop: at most one list waits, and a newer one replaces it.
type pendingList struct {
	mu    sync.Mutex
	l     endpointList
	full  bool
	taken chan struct{} // a token per take of a list put into an empty slot
}

// put stores l and reports whether the slot was empty (the caller then
// tells the loop). A list that replaces a waiting one keeps the waiting
// one's arrival time: the propagation histogram measures from the oldest
// change not yet applied.
func (p *pendingList) put(l endpointList) (wasEmpty bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.full {
		l.at = p.l.at
		p.l = l
		return false
	}
	// A token left from an earlier take is stale: the next one must mean
	// that this list was taken.
	select {
	case <-p.taken:
	default:
	}
	p.l, p.full = l, true
	return true
}

// take empties the slot and returns what it held.
func (p *pendingList) take() (endpointList, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.full {
		return endpointList{}, false
	}
	l := p.l
	p.l, p.full = endpointList{}, false
	select {
	case p.taken <- struct{}{}:
	default:
	}
	return l, true
}

// instanceFilter turns one upstream's passing Connect instances into
// endpoints: the service address, else the node address, the port, and
// Consul's passing weight, each checked by input.NewEndpoint. An instance
// that fails (a zone, a host name, a port out of range, ...), or that the
// answer did not carry readably, is left out: the rest of the upstream goes
// on. Each such instance is logged once, with its ID, the field and the
// reason, and counted once, for as long as it stays the same; it is logged
// again if it comes back after being fixed or gone.
//
// Past max endpoints (when max > 0), the ones capEndpoints chooses for
// proxyID are kept, with a log line and a counter.
type instanceFilter struct {
	upstream string
	log      *zap.Logger
	metrics  *Metrics
	logged   map[string]bool // instance ID and reason, of the last answer's rejections
	max      int
	proxyID  string
}

func newInstanceFilter(upstream string, log *zap.Logger, m *Metrics) *instanceFilter {
	return &instanceFilter{upstream: upstream, log: log, metrics: m, logged: map[string]bool{}}
}

// fieldUnreadable labels instances the health answer did not carry in the
// shape the sidecar reads.
const fieldUnreadable = "entry"

func (f *instanceFilter) endpoints(entries []healthEntry, bad []error) []slots.Endpoint {
	seen := make(map[string]bool, len(f.logged))
	drop := func(id, field string, err error) {
		key := id + "\x00" + err.Error()
		seen[key] = true
		if f.logged[key] {
			return
		}
		f.metrics.invalidInstance(f.upstream, field)
		f.log.Warn("upstream instance dropped: a value Consul serves for it is invalid",
			zap.String("upstream", f.upstream), zap.String("instance_id", id), zap.String("field", field), zap.Error(err))
	}
	for _, err := range bad {
		id := ""
		var ee *entryError
		if errors.As(err, &ee) {
			// Keyed without its index in the answer, which moves.
			id, err = ee.ID, ee.Err
		}
		drop(id, fieldUnreadable, err)
	}
	out := make([]slots.Endpoint, 0, len(entries))
	for _, e := range entries {
		addr := e.Address
		if addr == "" {
			addr = e.NodeAddress
		}
		ep, err := input.NewEndpoint(e.ID, addr, e.Port, e.Weight)
		if err != nil {
			drop(e.ID, input.FieldOf(err), err)
			continue
		}
		out = append(out, slots.Endpoint{Addr: ep.Addr().String(), Port: int(ep.Port()), Weight: ep.Weight()})
	}
	f.logged = seen
	slices.SortFunc(out, slots.Endpoint.Compare)
	if n := len(out); f.max > 0 && n > f.max {
		f.metrics.endpointLimitHits.Add(1)
		f.log.Warn("upstream has more endpoints than the limit; keeping a stable subset (rendezvous hash of proxy ID and endpoint)",
			zap.String("upstream", f.upstream), zap.Int("endpoints", n), zap.Int("kept", f.max))
		out = capEndpoints(out, f.max, f.proxyID)
	}
	return out
}

func (c *Controller) fetchRegistration(ctx context.Context, cur cursor) (*api.AgentService, cursor, error) {
	svc, meta, err := c.consul.Agent().Service(c.cfg.ProxyID, (&api.QueryOptions{WaitHash: cur.hash, WaitTime: 5 * time.Minute}).WithContext(ctx))
	if err != nil {
		return nil, cur, fmt.Errorf("proxy registration %s: %w", c.cfg.ProxyID, err)
	}
	return svc, cursor{hash: meta.LastContentHash}, nil
}

func (c *Controller) fetchLeaf(ctx context.Context, service string, cur cursor) (*certs.Bundle, cursor, error) {
	leaf, meta, err := c.consul.Agent().ConnectCALeaf(service, (&api.QueryOptions{WaitIndex: cur.index, WaitTime: 5 * time.Minute}).WithContext(ctx))
	if err != nil {
		return nil, cur, fmt.Errorf("leaf certificate for %s: %w", service, err)
	}
	b, err := certs.NewBundle(leaf.CertPEM, leaf.PrivateKeyPEM, time.Now())
	if err != nil {
		// Bad material from Consul: keep what is applied, try again later.
		return nil, cur, fmt.Errorf("leaf certificate for %s rejected: %w", service, err)
	}
	return &b, cursor{index: meta.LastIndex}, nil
}

func (c *Controller) fetchRoots(ctx context.Context, cur cursor) (*certs.Roots, cursor, error) {
	list, meta, err := c.consul.Agent().ConnectCARoots((&api.QueryOptions{WaitIndex: cur.index, WaitTime: 5 * time.Minute}).WithContext(ctx))
	if err != nil {
		return nil, cur, fmt.Errorf("CA roots: %w", err)
	}
	pems := make([]string, 0, len(list.Roots))
	for _, r := range list.Roots {
		pems = append(pems, r.RootCertPEM)
	}
	roots, err := certs.NewRoots(pems)
	if err != nil {
		return nil, cur, fmt.Errorf("CA roots rejected: %w", err)
	}
	roots.TrustDomain = list.TrustDomain
	return &roots, cursor{index: meta.LastIndex}, nil
}
