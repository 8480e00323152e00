package controller

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/authzgen"
	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/l7"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/slots"
)

// The executor: it takes the plan's actions (plan.go) to HAProxy and
// records what HAProxy reached in c.applied and c.pacing, the next plan's
// input. Every log line, metric and retry of applying state lives here
// or in what it calls (start in controller.go, track in identity.go).

// execute takes acts in order. It reports again when what it reached moved
// the applied state in a way acts did not foresee (a reload failed, a leaf
// swap broke the public listener): then the rest of acts is dropped and
// the caller plans again at once. Only a failure to start or adopt HAProxy
// is returned; everything else is logged and retried.
func (c *Controller) execute(ctx context.Context, acts []action) (again bool, err error) {
	for _, a := range acts {
		switch a := a.(type) {
		case waitAction:
			c.scheduleRetry(a.at.Sub(c.now()))
		case chainMapAction:
			c.setChainMap(ctx, a)
		case adoptAction:
			if err := c.adopt(ctx); err != nil {
				c.log.Error("a running haproxy could not be adopted; stopping it and starting a new one",
					zap.Int("master_pid", c.master.PID()), zap.Error(err))
				_ = c.master.Stop(5 * time.Second)
				c.master, c.applied = nil, applied{}
			}
			return true, nil
		case startAction:
			for _, name := range a.missing {
				c.log.Warn("starting before the first endpoint list of an upstream", zap.String("upstream", name))
			}
			if a.unverified {
				c.log.Warn("starting before every upstream endpoint is verified; they join as they prove their identity")
			}
			if err := c.start(ctx, a); err != nil {
				if !c.started {
					return false, err
				}
				// HAProxy ran before and exited: keep trying.
				c.log.Error("haproxy did not start again; retrying", zap.Error(err))
				c.scheduleRetry(time.Second)
			}
			return false, nil
		case reloadAction:
			if !c.reload(ctx, a) {
				return true, nil
			}
		case rotateLeafAction:
			if !c.rotateLeaf(ctx, a.leaf) {
				return true, nil
			}
		case l7MapAction:
			c.applyL7Map(ctx, a)
		case nameSourcesAction:
			c.nameSources(ctx, a)
		case publishAuthzGenAction:
			c.applyAuthzGeneration(ctx, a.gen)
		case verifyAction:
			c.track(ctx, a)
		case settleAction:
			for _, name := range a.upstreams {
				delete(c.desired.dirty, name)
				c.changesApplied(name, c.applied.tables[name], true)
			}
		case runtimeBatchAction:
			c.applyEndpoints(ctx, a)
		default:
			panic(fmt.Sprintf("controller: unknown action %T", a))
		}
	}
	return false, nil
}

// adopt reads back the state of a running master this process did not
// start into c.applied; the next plan reconciles it with the desired
// state. readApplied is the lifecycle's (it needs the slot tables from
// "show servers state", the served leaf from "show ssl cert", the authz
// map); until it is set, finding a running master is an error.
func (c *Controller) adopt(ctx context.Context) error {
	if c.readApplied == nil {
		return errors.New("a running haproxy was found, but reading back its state is not available")
	}
	ap, err := c.readApplied(ctx)
	if err != nil {
		return fmt.Errorf("adopt haproxy: %w", err)
	}
	ap.known = true
	c.applied = ap
	if ap.foreign == "" {
		c.rootsServed(ap.rootsPEM, false)
	}
	c.authzGenerationApplied(ap.authzGen)
	c.tablesApplied(ap.tables)
	for _, v := range inheritedChecks(&c.desired, &c.applied) {
		c.ident.inherit(v, c.now())
	}
	// Every upstream is compared with what HAProxy serves.
	for name := range c.desired.endpoints {
		if _, ok := c.desired.dirty[name]; !ok {
			c.desired.dirty[name] = c.now()
		}
	}
	c.started = true
	c.ready.Store(true)
	c.metrics.adoptions.Add(1)
	c.metrics.setEndpoints(ap.tables)
	c.log.Info("haproxy adopted", zap.Int("master_pid", c.master.PID()), zap.String("master_socket", c.rt.Socket()),
		zap.Int("upstreams", len(ap.tables)), zap.String("reload_needed", ap.foreign))
	if c.cfg.OnAdopt != nil {
		// Asynchronous: the agent's generation switch waits for this loop
		// to publish it.
		go c.cfg.OnAdopt(ap.authzGen)
	}
	return nil
}

// applyAuthzGeneration writes the intentions generation to the authz map
// file (for the next reload) and to HAProxy's copy in memory.
func (c *Controller) applyAuthzGeneration(ctx context.Context, gen uint64) {
	file := c.path("authz.map")
	if err := certs.WriteFile(file, authzgen.MapContent(gen)); err != nil {
		c.log.Error("authz generation: write map", zap.Error(err))
		c.scheduleRetry(time.Second)
		return
	}
	cmd, err := runtime.SetMap(file, authzgen.MapKey, strconv.FormatUint(gen, 10))
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

func (c *Controller) spec(sc Sidecar, tables map[string]slots.Table) bootstrap.Spec {
	s := bootstrap.Spec{
		Service:        sc.Service,
		LeafFile:       c.path("leaf.pem"),
		RootsFile:      c.path("roots.pem"),
		SPOEFile:       c.path("spoe.cfg"),
		AuthzMap:       c.path("authz.map"),
		L7Map:          c.path(L7MapFile),
		SourcesMap:     c.sourcesMapPath(),
		InstanceMap:    c.path(InstanceMapFile),
		StateMap:       c.path(StateMapFile),
		CrtList:        c.path("public.crtlist"),
		SNI:            c.publicSNI(),
		SPOASocket:     c.cfg.SPOASocket,
		ExporterSocket: c.path(ExporterSocket),
		HardStopAfter:  c.cfg.HardStopAfter,
		AccessLog:      c.cfg.AccessLog,
		Threads:        c.cfg.Threads,
		Public:         sc.Public,
		Expose:         sc.Expose,
	}
	targets := map[string]bootstrap.TargetBackend{}
	for _, u := range sc.Upstreams {
		bu := bootstrap.Upstream{
			Name: u.Name, Destination: u.Destination, BindAddr: u.BindAddr, BindPort: u.BindPort,
			Protocol: u.Protocol, ConnectTimeout: u.ConnectTimeout, Slots: tables[u.Name],
			ServerID: c.serverID(u), Instances: instanceIDs(c.desired.instances[u.Name]),
			SocketPath: u.SocketPath, SocketMode: u.SocketMode, Passive: u.Passive, Limits: u.Limits,
		}
		if u.Chain != "" {
			var tbs map[string]bootstrap.TargetBackend
			if bu.Routing, tbs = c.routing(u); bu.Routing != nil {
				for t, tb := range tbs {
					targets[bootstrap.TargetBackendName(u.Name, t)] = tb
				}
			}
		}
		s.Upstreams = append(s.Upstreams, bu)
	}
	for i, u := range sc.Upstreams {
		if u.Target == "" {
			continue
		}
		// A target always renders as a backend only, even should its
		// upstream's routing be missing (then with the defaults).
		tb, ok := targets[u.Name]
		if !ok {
			tb = bootstrap.TargetBackend{Map: c.chainMapFile(u.Parent)}
		}
		s.Upstreams[i].Target = &tb
	}
	return s
}

// writeConfig renders and writes every file HAProxy reads; reason is why
// HAProxy loads it (recorded in the state map, with the configuration id).
//
// It returns the L7 map's table it wrote (l7map.go).
func (c *Controller) writeConfig(spec bootstrap.Spec, authzGen uint64, reason string) ([]l7.Compiled, error) {
	spec.ConfigID, spec.Reason = c.configID(*c.desired.sidecar, c.desired.roots.PEM), reason
	cfg, files, err := bootstrap.RenderFiles(spec, authzGen)
	if err != nil {
		return nil, err
	}
	l7t := c.l7Table()
	files = append(files, bootstrap.File{Path: spec.L7Map, Content: l7MapContent(l7t)})
	for _, u := range spec.Upstreams {
		if u.Routing != nil {
			files = append(files, bootstrap.File{Path: u.Routing.Map, Content: bootstrap.RenderChainMap(*u.Routing)})
		}
	}
	files = append(files,
		bootstrap.File{Path: spec.LeafFile, Content: c.desired.leaf.PEM},
		bootstrap.File{Path: spec.RootsFile, Content: c.desired.roots.PEM},
		bootstrap.File{Path: c.path("haproxy.cfg"), Content: cfg}) // last: it names the others
	for _, f := range files {
		if err := certs.WriteFile(f.Path, f.Content); err != nil {
			return nil, err
		}
	}
	return l7t, nil
}

// reload renders the desired configuration and reloads HAProxy; it reports
// whether the reload was applied.
func (c *Controller) reload(ctx context.Context, a reloadAction) bool {
	sc, tables, gen, reason := a.sidecar, a.tables, a.gen, a.reason
	l7t, err := c.writeConfig(c.spec(sc, tables), gen, reason)
	if err != nil {
		c.log.Error("reload skipped: configuration not rendered", zap.String("reason", reason), zap.Error(err))
		c.reloadFailed()
		return false
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	c.rootsServed(a.roots.PEM, false)
	start := time.Now()
	if _, err := c.rt.Reload(rctx, reason); err != nil {
		c.log.Error("reload failed; the previous worker keeps serving", zap.String("reason", reason), zap.Error(err),
			zap.Duration("retry_in", c.reloadFailed()))
		return false
	}
	c.pacing = c.pacing.reloaded()
	c.metrics.reloaded(a.cause)
	c.applied = applied{known: true, sidecar: sc, leaf: a.leaf, rootsPEM: a.roots.PEM, tables: tables, authzGen: gen,
		chainMaps: c.chainMaps(&sc), l7: l7Keys(l7t), l7Held: l7t}
	c.authzGenerationApplied(gen)
	clear(c.desired.dirty)
	c.tablesApplied(tables)
	c.metrics.setEndpoints(tables)
	c.log.Info("reload applied", zap.String("reason", reason), zap.Duration("took", time.Since(start)))
	return true
}

// reloadFailed counts a failed reload and backs off the next attempt.
func (c *Controller) reloadFailed() time.Duration {
	c.metrics.reloadFailures.Add(1)
	c.pacing = c.pacing.reloadFailed(c.now())
	c.scheduleRetry(c.pacing.reloadDelay)
	return c.pacing.reloadDelay
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
// a client certificate; if not, it records the listener as broken and
// reports false: the next plan reloads (which reads the written files) to
// restore it.
func (c *Controller) rotateLeaf(ctx context.Context, leaf *certs.Bundle) (ok bool) {
	file := c.path("leaf.pem")
	if err := certs.WriteFile(file, leaf.PEM); err != nil {
		c.log.Error("leaf rotation: write file", zap.Error(err))
		c.scheduleRetry(5 * time.Second)
		return true
	}
	if err := c.rt.UpdateCert(ctx, file, leaf.PEM); err != nil {
		c.log.Error("leaf rotation failed", zap.String("serial", leaf.Serial), zap.Error(err))
		c.metrics.runtimeErrors.Add(1)
		c.scheduleRetry(5 * time.Second)
		return true
	}
	c.pacing.leafSwappedAt = c.now()
	c.applied.leaf = leaf
	c.metrics.leafRotations.Add(1)
	c.log.Info("leaf certificate rotated", zap.String("serial", leaf.Serial), zap.Time("not_after", leaf.NotAfter), zap.String("spiffe", leaf.SPIFFE))

	p := c.applied.sidecar.Public
	bind := netip.AddrPortFrom(netip.MustParseAddr(p.BindAddr), uint16(p.BindPort))
	res, served, err := c.checkBind(ctx, bind, leaf.Serial)
	c.metrics.bindChecks.WithLabelValues(res.String()).Inc()
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
		c.applied.listenerBroken = reason
		return false
	}
	return true
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
func (c *Controller) applyEndpoints(ctx context.Context, batch runtimeBatchAction) {
	type planned struct {
		upstreamOps
		cmds  int // its commands in the batch
		first int // index of its first command in the batch
	}
	plans := map[string]planned{}
	var cmds, mapCmds []runtime.Command
	for _, u := range batch.upstreams {
		p := planned{upstreamOps: u, first: len(cmds)}
		for _, op := range u.ops {
			// The commands of one slot operation. Any other command an
			// op needs (for the same slot) is appended here too and
			// counted in p.cmds, so that its reply is checked with the
			// upstream's and a failure re-reads the backend.
			cs, err := c.commands(u.name, op)
			if err != nil {
				c.log.Error("cannot build runtime command", zap.String("upstream", u.name), zap.Error(err))
				continue
			}
			cmds = append(cmds, cs...)
			p.cmds += len(cs)
		}
		plans[u.name] = p
		mapCmds = append(mapCmds, c.instanceMapCommands(u.name, u.ops, u.next)...)
	}
	if len(cmds) == 0 {
		return
	}
	// The instance map follows the slots in the same batch; its entries
	// only name instances (status, access log), so a failed one is
	// logged and counted and does not fail the slots (checkInstanceMap).
	nSlot := len(cmds)
	cmds = append(cmds, mapCmds...)
	start := time.Now()
	rs, err := c.rt.Exec(ctx, cmds...)
	c.metrics.runtimeCommands.Add(float64(len(cmds)))
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
		for _, r := range rs[p.first : p.first+p.cmds] {
			if r.Err != nil {
				errs = append(errs, r.Err)
			}
		}
		if len(errs) == 0 {
			c.applied.tables[name] = p.next
			c.changesApplied(name, p.next, !p.pending)
			if !p.pending {
				delete(c.desired.dirty, name)
			}
			continue
		}
		failed = true
		c.metrics.runtimeErrors.Add(float64(len(errs)))
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
	obs, err := c.observe(ctx, name)
	if err != nil {
		c.log.Error("re-read backend failed", zap.String("upstream", name), zap.Error(err))
		return
	}
	templates := 0
	for _, s := range c.applied.tables[name].Slots {
		if !s.Dynamic {
			templates++
		}
	}
	c.applied.tables[name] = slots.FromObserved(name, bootstrap.SlotPrefix, templates, obs)
}

// observe reads an upstream backend's servers as HAProxy reports them
// ("show servers state").
func (c *Controller) observe(ctx context.Context, name string) ([]slots.Observed, error) {
	st, err := c.rt.ServersState(ctx, name)
	if err != nil {
		return nil, err
	}
	obs := make([]slots.Observed, 0, len(st))
	for _, s := range st {
		obs = append(obs, slots.Observed{Name: s.Name, Addr: s.Addr, Port: s.Port, Weight: s.Weight, Maint: s.Maint()})
	}
	return obs, nil
}

// commands translates a planned slot operation into runtime commands.
func (c *Controller) commands(backend string, op slots.Op) ([]runtime.Command, error) {
	// The TLS settings and passive check of the template slots'
	// default-server line (see bootstrap.Render), which a dynamic server
	// does not inherit on 2.6.
	o := runtime.ServerOptions{Weight: op.Weight, SSL: true, CrtFile: c.path("leaf.pem"), CAFile: c.path("roots.pem"), NoSSLReuse: true}
	if op.Kind == slots.OpAdd {
		for _, u := range c.applied.sidecar.Upstreams {
			if u.Name == backend {
				o.ALPN = bootstrap.UpstreamALPN(u.Protocol)
				o.Proto = bootstrap.UpstreamProto(u.Protocol)
				if u.Passive.MaxFailures > 0 {
					o.Passive = runtime.PassiveCheck{Inter: u.Passive.Interval, Layer7: bootstrap.Mode(u.Protocol) == "http", ErrorLimit: u.Passive.MaxFailures}
				}
			}
		}
	}
	return runtime.SlotCommands(backend, op, o)
}

// rootsServed tells Config.OnRootsServed the roots HAProxy verifies client
// certificates against from now on.
func (c *Controller) rootsServed(pem string, fresh bool) {
	if c.cfg.OnRootsServed != nil {
		c.cfg.OnRootsServed(pem, fresh)
	}
}
