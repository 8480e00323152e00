package controller

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/chain"
	"github.com/haproxy-connect/haproxy-connect/input"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/watch"
)

// Discovery chains. Each service upstream of mode http has a chain watch
// (GET /v1/discovery-chain/<service>, blocking). A chain Consul compiled
// from no entry changes nothing: the upstream renders as it always did.
// Any other chain makes the upstream routed (bootstrap/chain.go): each of
// its targets becomes an upstream of its own in the desired Sidecar,
// without a listener (Upstream.Target), with its own endpoint watch
// (filtered as the resolver says) and slots; the upstream's frontend
// gets the chain's route rules and its chain map.
//
// What needs a reload: the set of targets, and what HAProxy 2.6 holds in
// configuration lines (matches, header changes, rewrites, retries,
// balance, connect timeouts, failover order): all of that is in the
// Sidecar (Upstream.Chain, the targets' fields), so a change is a
// reload with its reason, as any shape change. What does not: weights,
// the target each route goes to, request timeouts: chain map entries,
// set with "set map" (chainMapAction).

// chainMapFile is the chain map of upstream name.
func (c *Controller) chainMapFile(name string) string { return c.path("chain_" + name + ".map") }

// routedBy reports whether upstream u takes its chain: a service
// upstream whose mode is http, whose chain is not Consul's default one.
func routedBy(u Upstream, ch *chain.Chain) bool {
	return ch != nil && !ch.Default && u.Target == "" && u.Type == string(api.UpstreamDestTypeService) && bootstrap.Mode(u.Protocol) == "http"
}

// expand is the desired Sidecar: the registration's, with each routed
// upstream's chain shape and its targets as upstreams of their own.
func expand(reg *Sidecar, chains map[string]*chain.Chain) *Sidecar {
	if reg == nil {
		return nil
	}
	sc := *reg
	sc.Upstreams = nil
	for _, u := range reg.Upstreams {
		ch := chains[u.Name]
		if !routedBy(u, ch) {
			sc.Upstreams = append(sc.Upstreams, u)
			continue
		}
		u.Chain = chainShape(*ch)
		sc.Upstreams = append(sc.Upstreams, u)
		for _, t := range ch.Targets {
			// Each target's servers get the upstream's passive health
			// check, as Envoy applies it to each cluster of the chain.
			// Its limits stay on the upstream: its frontend counts the
			// requests of every target backend (bootstrap/chain.go).
			sc.Upstreams = append(sc.Upstreams, Upstream{
				Name: bootstrap.TargetBackendName(u.Name, t.Name), Type: string(api.UpstreamDestTypeService),
				Destination: t.Service, Datacenter: t.Datacenter, Protocol: u.Protocol,
				ConnectTimeout: t.ConnectTimeout, Target: t.Name, Parent: u.Name, Filter: t.Filter, OnlyPassing: t.OnlyPassing,
				Passive: u.Passive,
			})
		}
	}
	slices.SortFunc(sc.Upstreams, func(a, b Upstream) int { return strings.Compare(a.Name, b.Name) })
	return &sc
}

// chainShape fingerprints what of a chain is in configuration lines: the
// chain without its runtime parts (splits, request timeouts).
func chainShape(ch chain.Chain) string {
	ch.Unsupported = nil
	routes := slices.Clone(ch.Routes)
	for i := range routes {
		routes[i].Splits = nil
		routes[i].Dest.RequestTimeout = 0
	}
	ch.Routes = routes
	// Retries live on the target backends: keep which routes reach
	// which targets only through NewRouting's result.
	_, tbs := bootstrap.NewRouting("", ch, "/")
	b, err := json.Marshal(struct {
		Chain   chain.Chain
		Targets map[string]bootstrap.TargetBackend
	}{ch, tbs})
	if err != nil {
		panic(err) // plain data
	}
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:8])
}

// routing is upstream u's routing and its targets' backends, from the
// desired chain.
func (c *Controller) routing(u Upstream) (*bootstrap.Routing, map[string]bootstrap.TargetBackend) {
	ch := c.desired.chains[u.Name]
	if !routedBy(u, ch) {
		return nil, nil
	}
	r, tbs := bootstrap.NewRouting(u.Name, *ch, c.chainMapFile(u.Name))
	return &r, tbs
}

// chainMaps is every routed upstream's chain map content, by upstream.
func (c *Controller) chainMaps(sc *Sidecar) map[string]map[string]string {
	out := map[string]map[string]string{}
	if sc == nil {
		return out
	}
	for _, u := range sc.Upstreams {
		if u.Chain == "" {
			continue
		}
		if r, _ := c.routing(u); r != nil {
			out[u.Name] = bootstrap.ChainMapEntries(*r)
		}
	}
	return out
}

// chainMapAction sets chain map entries at run time.
type chainMapAction struct {
	upstream string
	file     string
	sets     [][2]string // key, value; sorted
	want     map[string]string
}

func (chainMapAction) isAction() {}

// planChainMaps plans the "set map" of every routed upstream whose
// applied chain map differs from the desired one. The keys of a chain
// map are fixed by its shape (every route has a timeout entry and 100
// buckets), so a change is only ever a "set".
func planChainMaps(desired, applied map[string]map[string]string, file func(string) string) []action {
	var acts []action
	names := make([]string, 0, len(desired))
	for n := range desired {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		a := chainMapAction{upstream: n, file: file(n), want: desired[n]}
		for k, v := range desired[n] {
			if applied[n][k] != v {
				a.sets = append(a.sets, [2]string{k, v})
			}
		}
		if len(a.sets) == 0 {
			continue
		}
		slices.SortFunc(a.sets, func(x, y [2]string) int { return strings.Compare(x[0], y[0]) })
		acts = append(acts, a)
	}
	return acts
}

// setChainMap applies a chainMapAction: one batch of "set map" commands.
// They are not one transaction (2.6 has "prepare map" for that, not
// through this client yet), but each bucket moves on its own from one
// valid target to another, so every state in between routes every
// request to a target of the chain.
func (c *Controller) setChainMap(ctx context.Context, a chainMapAction) {
	cmds := make([]runtime.Command, 0, len(a.sets))
	for _, kv := range a.sets {
		cmd, err := runtime.SetMap(a.file, kv[0], kv[1])
		if err != nil {
			c.log.Error("chain map entry refused", zap.String("upstream", a.upstream), zap.Error(err))
			return
		}
		cmds = append(cmds, cmd)
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := c.rt.Exec(rctx, cmds...); err != nil {
		c.log.Error("chain map not applied; retrying", zap.String("upstream", a.upstream), zap.Int("entries", len(cmds)), zap.Error(err))
		c.scheduleRetry(time.Second)
		return
	}
	if c.applied.chainMaps == nil {
		c.applied.chainMaps = map[string]map[string]string{}
	}
	c.applied.chainMaps[a.upstream] = a.want
	c.log.Info("discovery chain applied at run time (no reload)", zap.String("upstream", a.upstream), zap.Int("map_entries", len(cmds)))
}

// watchChain runs upstream u's discovery chain watch.
func (c *Controller) watchChain(ctx context.Context, u Upstream) {
	var lastErr, lastUnsup string
	publish := func(ch *chain.Chain) {
		c.send(ctx, func(d *desired) {
			if w, ok := c.chainWatches[u.Name]; !ok || w.up != u {
				return // a stale watch
			}
			if d.chainSeen == nil {
				d.chainSeen = map[string]bool{}
			}
			d.chainSeen[u.Name] = true
			if ch != nil {
				d.chains[u.Name] = ch
				d.chainSince = time.Now()
				d.sidecar = expand(d.registration, d.chains)
			}
		})
	}
	watch.Loop(ctx, watch.Options{Name: "chain " + u.Name, Log: c.log, MinInterval: time.Second}, func(ctx context.Context, cur watch.Cursor) (*chain.Chain, watch.Cursor, error) {
		resp, meta, err := c.consul.DiscoveryChain().Get(u.Destination, &api.DiscoveryChainOptions{EvaluateInDatacenter: u.Datacenter},
			(&api.QueryOptions{WaitIndex: cur.Index, WaitTime: 5 * time.Minute}).WithContext(ctx))
		if err != nil {
			return nil, cur, err
		}
		next := watch.Cursor{Index: meta.LastIndex}
		ch, err := chain.Compile(resp.Chain)
		if err == nil {
			err = checkBackendNames(u.Name, ch)
		}
		if err != nil {
			// The whole chain or nothing: the upstream keeps its last
			// good chain (none at first: plain).
			if err.Error() != lastErr {
				lastErr = err.Error()
				c.log.Error("discovery chain rejected; the upstream keeps its last good routing", zap.String("upstream", u.Name), zap.Error(err))
			}
			return nil, next, nil
		}
		lastErr = ""
		if s := strings.Join(ch.Unsupported, "; "); s != lastUnsup {
			lastUnsup = s
			for _, what := range ch.Unsupported {
				c.log.Warn("discovery chain asks what the sidecar does not do", zap.String("upstream", u.Name), zap.String("unsupported", what))
			}
		}
		return &ch, next, nil
	}, publish)
}

// checkBackendNames checks that every target's backend name of upstream
// name is an HAProxy identifier (a long upstream name plus a long target
// name can pass 160 bytes): a chain that fails is refused here, not in a
// render that would fail the whole configuration.
func checkBackendNames(name string, ch chain.Chain) error {
	for _, t := range ch.Targets {
		if _, err := input.Ident("chain target backend", bootstrap.TargetBackendName(name, t.Name)); err != nil {
			return err
		}
	}
	return nil
}

type chainWatch struct {
	up     Upstream
	cancel context.CancelFunc
}

// chainsPending names the registration's upstreams whose chain watch has
// not answered yet.
func (d *desired) chainsPending() []string {
	var out []string
	if d.registration == nil {
		return nil
	}
	for _, u := range d.registration.Upstreams {
		if wantsChain(u) && !d.chainSeen[u.Name] {
			out = append(out, u.Name+" (discovery chain)")
		}
	}
	return out
}

// wantsChain reports whether registration upstream u has a chain watch:
// a service upstream of mode http.
func wantsChain(u Upstream) bool {
	return u.Type == string(api.UpstreamDestTypeService) && bootstrap.Mode(u.Protocol) == "http"
}

// syncChainWatches runs one chain watch per service upstream of mode
// http of the registration.
func (c *Controller) syncChainWatches(ctx context.Context) {
	if c.chainWatches == nil {
		c.chainWatches = map[string]*chainWatch{}
	}
	if c.desired.chains == nil {
		c.desired.chains = map[string]*chain.Chain{}
	}
	want := map[string]Upstream{}
	if reg := c.desired.registration; reg != nil {
		for _, u := range reg.Upstreams {
			if wantsChain(u) {
				want[u.Name] = u
			}
		}
	}
	for name, w := range c.chainWatches {
		if u, ok := want[name]; !ok || u != w.up {
			w.cancel()
			delete(c.chainWatches, name)
			delete(c.desired.chains, name)
		}
	}
	for name, u := range want {
		if _, ok := c.chainWatches[name]; ok {
			continue
		}
		delete(c.desired.chainSeen, name)
		wctx, cancel := context.WithCancel(ctx)
		c.chainWatches[name] = &chainWatch{up: u, cancel: cancel}
		go c.watchChain(wctx, u)
	}
	if c.desired.registration != nil {
		c.desired.sidecar = expand(c.desired.registration, c.desired.chains)
	}
}
