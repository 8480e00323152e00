package controller

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/input"
	"github.com/haproxy-connect/haproxy-connect/slots"
	"github.com/haproxy-connect/haproxy-connect/watch"
)

func (c *Controller) watchUpstream(ctx context.Context, u Upstream) {
	standby := u.Type != string(api.UpstreamDestTypePreparedQuery) && u.Filter == ""
	if standby {
		defer c.standby.forget(u)
	}
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
				d.listAnswer(u.Name, d.endpoints[u.Name], l.eps, d.instances[u.Name], l.index, l.at)
				d.setEndpoints(u.Name, l.eps, l.at)
				if _, served := c.applied.tables[u.Name]; served {
					d.noteChanges(u.Name, d.instances[u.Name], l.inst, l.at)
				}
				d.instances[u.Name] = l.inst
			}
		})
	}
	if u.Type == string(api.UpstreamDestTypePreparedQuery) {
		// Prepared queries do not block: poll.
		watch.Loop(ctx, watch.Options{Name: "query " + u.Destination, Log: c.log, MinInterval: 2 * time.Second}, func(ctx context.Context, _ watch.Cursor) (endpointList, watch.Cursor, error) {
			resp, _, err := c.consul.PreparedQuery().Execute(u.Destination, (&api.QueryOptions{Connect: true, Datacenter: u.Datacenter}).WithContext(ctx))
			if err != nil {
				return endpointList{}, watch.Cursor{}, err
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
			return endpointList{eps: filter.endpoints(entries, nil), inst: queryInstances(resp), at: at}, watch.Cursor{}, nil
		}, publish)
		return
	}
	watch.Loop(ctx, watch.Options{Name: "upstream " + u.Name, Log: c.log, MinInterval: 10 * time.Millisecond}, func(ctx context.Context, cur watch.Cursor) (endpointList, watch.Cursor, error) {
		a, err := c.health.connectFiltered(ctx, u.Destination, u.Datacenter, u.Filter, onlyPassing(u), cur.Index, 5*time.Minute)
		if err != nil {
			return endpointList{}, cur, err
		}
		if standby && a.index != cur.Index {
			// Something of the service's instances changed, maybe
			// only an instance this answer leaves out.
			c.standby.due(u)
		}
		return endpointList{eps: filter.endpoints(a.usable, a.bad), inst: healthInstances(a.usable), index: a.index, at: a.at}, watch.Cursor{Index: a.index}, nil
	}, publish)
}

// endpointList is one answer of an upstream's watch, and when it arrived.
type endpointList struct {
	eps   []slots.Endpoint
	inst  map[netip.AddrPort]instance // by endpoint
	index uint64                      // X-Consul-Index; 0 for a prepared query
	at    time.Time
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
// one's arrival time: propagation is measured from the oldest change not
// yet applied, an upper bound for the changes the newer one made.
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
		ep, err := endpointOf(e)
		if err != nil {
			drop(e.ID, input.FieldOf(err), err)
			continue
		}
		out = append(out, ep)
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

// endpointOf is the endpoint of a health entry, checked by
// input.NewEndpoint.
func endpointOf(e healthEntry) (slots.Endpoint, error) {
	ep, err := input.NewEndpoint(e.ID, e.addr(), e.Port, e.Weight)
	if err != nil {
		return slots.Endpoint{}, err
	}
	return slots.Endpoint{Addr: ep.Addr().String(), Port: int(ep.Port()), Weight: ep.Weight()}, nil
}

// standbyEndpoints turns an upstream's standby instances into endpoints,
// as instanceFilter.endpoints does, but silently: one with an invalid
// value is logged and counted by endpoints when its checks pass. Past max
// endpoints (when max > 0), the stable subset capEndpoints keeps for
// proxyID, so that the proofs made ahead are bounded as the placed
// endpoints are.
func standbyEndpoints(entries []healthEntry, max int, proxyID string) []slots.Endpoint {
	if len(entries) == 0 {
		return nil
	}
	out := make([]slots.Endpoint, 0, len(entries))
	for _, e := range entries {
		if ep, err := endpointOf(e); err == nil {
			out = append(out, ep)
		}
	}
	slices.SortFunc(out, slots.Endpoint.Compare)
	return capEndpoints(out, max, proxyID)
}

// aclFiltered logs, once each time it starts and once when it ends, that
// Consul leaves instances of an upstream out of its answers because the
// sidecar's token may not read them: without it, an upstream missing
// service:read on its proxies, or node:read, just looks empty.
func (c *Controller) aclFiltered() func(service string, filtered bool) {
	var mu sync.Mutex
	seen := map[string]bool{}
	return func(service string, filtered bool) {
		mu.Lock()
		defer mu.Unlock()
		if seen[service] == filtered {
			return
		}
		seen[service] = filtered
		if filtered {
			c.log.Warn("consul leaves instances of an upstream out: the token may not read them (it needs service:read on the upstream and its sidecar proxies, and node:read on their nodes)",
				zap.String("service", service))
			return
		}
		c.log.Info("consul no longer leaves instances of an upstream out", zap.String("service", service))
	}
}

// onlyPassing reports whether upstream u's watch takes passing instances
// only: every upstream but a chain target whose resolver subset says
// OnlyPassing = false (Consul's default for a target), which takes
// instances with warnings too, as Envoy does.
func onlyPassing(u Upstream) bool { return u.Target == "" || u.OnlyPassing }
