package controller

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/slots"
)

// Standby instances: the ones Consul lists for a service upstream whose
// checks keep them out of traffic. A new instance is one until its first
// check runs (Consul staggers it over the check's interval, 10 s for a
// sidecar's), a failing one while it fails. The sidecar proves their
// identity ahead (identity.go), so that a check turning passing places
// the instance without a handshake in between.
//
// They are read apart from the upstream's own watch, which asks Consul
// for passing instances only: its answers, one per change, do not carry
// them, and a failure to read them costs only the proofs ahead. An
// upstream's own answer whose index moved means something of its
// instances changed, maybe only a standby one; the standby reader then
// asks Consul for the instances with a check that does not pass
// (healthReader.standby), at most once per standbyPoll per upstream, one
// upstream at a time: one goroutine and no held connection for all
// upstreams. None for a prepared query, nor for an upstream with a subset
// filter, whose expression is not combined with another.

// standbyPoll is the least time between two standby queries of an
// upstream: an instance is standby for seconds, so one query a second
// finds most of them in time, and bounds what they cost Consul and the
// sidecar when checks change many times a second.
const standbyPoll = time.Second

// standbyReader queries standby instances for the upstreams whose answers
// moved.
type standbyReader struct {
	mu      sync.Mutex
	pending map[string]Upstream  // by name: an answer moved since the last query
	last    map[string]time.Time // by name: when the last query started
	wake    chan struct{}
}

func newStandbyReader() *standbyReader {
	return &standbyReader{pending: map[string]Upstream{}, last: map[string]time.Time{}, wake: make(chan struct{}, 1)}
}

// due asks for a standby query of u.
func (r *standbyReader) due(u Upstream) {
	r.mu.Lock()
	r.pending[u.Name] = u
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// retry asks again for a standby query of u, whose query failed, unless
// u's watch ended meanwhile.
func (r *standbyReader) retry(u Upstream) {
	r.mu.Lock()
	_, known := r.last[u.Name]
	r.mu.Unlock()
	if known {
		r.due(u)
	}
}

// forget drops u, whose watch ended.
func (r *standbyReader) forget(u Upstream) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pending[u.Name] == u {
		delete(r.pending, u.Name)
	}
	delete(r.last, u.Name)
}

// next takes the upstreams due whose last query is standbyPoll old, and
// returns how long until the next of the others is.
func (r *standbyReader) next(now time.Time) (ready []Upstream, wait time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	wait = -1
	for name, u := range r.pending {
		if d := standbyPoll - now.Sub(r.last[name]); d > 0 {
			if wait < 0 || d < wait {
				wait = d
			}
			continue
		}
		ready = append(ready, u)
		delete(r.pending, name)
		r.last[name] = now
	}
	slices.SortFunc(ready, func(a, b Upstream) int { return strings.Compare(a.Name, b.Name) })
	return ready, wait
}

// readStandby runs the standby queries until ctx ends, and hands each
// answer to the loop.
func (c *Controller) readStandby(ctx context.Context) {
	r := c.standby
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	failing := map[string]bool{} // by upstream: its last query failed
	for {
		ready, wait := r.next(time.Now())
		for _, u := range ready {
			a, err := c.health.standby(ctx, u.Destination, u.Datacenter, onlyPassing(u))
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				if !failing[u.Name] {
					c.log.Warn("reading an upstream's standby instances failed; they are not proven ahead", zap.String("upstream", u.Name), zap.Error(err))
				}
				failing[u.Name] = true
				r.retry(u) // at the next poll
				continue
			}
			if failing[u.Name] {
				c.log.Info("reading standby instances works again", zap.String("upstream", u.Name))
				delete(failing, u.Name)
			}
			l := standbyList{eps: standbyEndpoints(a.standby, c.cfg.MaxEndpoints, c.cfg.ProxyID), inst: healthInstances(a.standby), index: a.index, at: a.at}
			c.send(ctx, func(d *desired) {
				if w, ok := c.watches[u.Name]; ok && w.up == u { // not a stale watch
					d.standbyAnswer(u.Name, l)
				}
			})
		}
		if wait < 0 {
			wait = time.Hour
		}
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			return
		case <-r.wake:
		case <-timer.C:
		}
	}
}

// standbyList is one answer of a standby query (readStandby).
type standbyList struct {
	eps   []slots.Endpoint
	inst  map[netip.AddrPort]instance
	index uint64 // the answer's X-Consul-Index
	at    time.Time
}

// standbySet is an upstream's standby endpoints as the plan sees them.
//
// Two queries answer each change of an upstream's instances, each on its
// own: the upstream's watch, of the usable instances, and the standby
// query. An instance that moves from one answer to the other would be in
// neither between the two answers, and its proof forgotten meanwhile
// (track drops a check nothing lists), to be made again before it is
// placed: the very handshake proving ahead saves. So an endpoint that one
// side's answer drops stays standby (carried) until the other side has
// answered as of the same change or a later one (Consul's X-Consul-Index
// orders them, both being queries of the same service's health), or
// carryMax has passed.
type standbySet struct {
	latest    standbyList                        // the newest standby answer
	listIndex uint64                             // the index of the upstream's own newest answer
	carried   map[netip.AddrPort]carriedEndpoint // dropped by one side, not yet answered by the other
	// eps and inst are latest and carried together, eps sorted: what the
	// plan proves ahead.
	eps  []slots.Endpoint
	inst map[netip.AddrPort]instance
}

// carriedEndpoint is an endpoint one side dropped.
type carriedEndpoint struct {
	ep   slots.Endpoint
	inst instance
	// until: an answer of the other side at this index or later ends it;
	// byStandby says which watch that is.
	until     uint64
	byStandby bool
	// since: when it was dropped. The other side answers only when the
	// service changes, so a carried endpoint also ends after carryMax.
	since time.Time
}

// carryMax bounds how long an endpoint stays carried.
const carryMax = 2 * standbyPoll

// standbyAnswer records a standby answer of upstream name, and
// marks the upstream for planning: the plan records the endpoints for
// their proofs.
func (d *desired) standbyAnswer(name string, l standbyList) {
	s := d.standby[name]
	if s == nil {
		s = &standbySet{carried: map[netip.AddrPort]carriedEndpoint{}}
		d.standby[name] = s
	}
	// Ended: what the upstream's own answers dropped, now that this one is
	// as new.
	for k, c := range s.carried {
		if c.byStandby && l.index >= c.until {
			delete(s.carried, k)
		}
	}
	if s.listIndex < l.index {
		dropped(s.latest.eps, l.eps, func(k netip.AddrPort, e slots.Endpoint) {
			s.carried[k] = carriedEndpoint{ep: e, inst: s.latest.inst[k], until: l.index, since: l.at}
		})
	}
	s.latest = l
	if s.rebuild(l.at) {
		if _, ok := d.dirty[name]; !ok {
			d.dirty[name] = l.at
		}
	}
}

// listAnswer records that upstream name's own watch answered at index, at
// at, listing now where it listed old before (with oldInst).
func (d *desired) listAnswer(name string, old, now []slots.Endpoint, oldInst map[netip.AddrPort]instance, index uint64, at time.Time) {
	s := d.standby[name]
	if s == nil {
		return // no standby query, or none of its answers yet
	}
	for k, c := range s.carried {
		if !c.byStandby && index >= c.until {
			delete(s.carried, k)
		}
	}
	if s.latest.index < index {
		dropped(old, now, func(k netip.AddrPort, e slots.Endpoint) {
			s.carried[k] = carriedEndpoint{ep: e, inst: oldInst[k], until: index, byStandby: true, since: at}
		})
	}
	s.listIndex = index
	s.rebuild(at)
}

// dropped calls f for each endpoint of old that now lacks. Both are sorted
// (slots.Endpoint.Compare), as the watches publish them.
func dropped(old, now []slots.Endpoint, f func(netip.AddrPort, slots.Endpoint)) {
	for _, e := range old {
		if _, found := slices.BinarySearchFunc(now, e, slots.Endpoint.Compare); found {
			continue
		}
		if k, ok := endpointKey(e.Addr, e.Port); ok {
			f(k, e)
		}
	}
}

// rebuild drops the carried endpoints older than carryMax at now, sets
// eps and inst from latest and carried, and reports whether eps changed.
func (s *standbySet) rebuild(now time.Time) (changed bool) {
	for k, c := range s.carried {
		if now.Sub(c.since) > carryMax {
			delete(s.carried, k)
		}
	}
	before := s.eps
	defer func() { changed = !slices.Equal(before, s.eps) }()
	if len(s.carried) == 0 {
		s.eps, s.inst = s.latest.eps, s.latest.inst
		return
	}
	s.eps = slices.Clone(s.latest.eps)
	s.inst = make(map[netip.AddrPort]instance, len(s.latest.inst)+len(s.carried))
	for k, in := range s.latest.inst {
		s.inst[k] = in
	}
	for k, c := range s.carried {
		if _, listed := s.inst[k]; !listed {
			s.eps = append(s.eps, c.ep)
			s.inst[k] = c.inst
		}
	}
	slices.SortFunc(s.eps, slots.Endpoint.Compare)
	return
}
