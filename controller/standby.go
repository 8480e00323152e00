package controller

import (
	"net/netip"
	"slices"
	"time"

	"github.com/haproxy-connect/haproxy-connect/slots"
)

// standbyList is one answer of an upstream's standby watch (watchStandby).
type standbyList struct {
	eps   []slots.Endpoint
	inst  map[netip.AddrPort]instance
	index uint64 // the answer's X-Consul-Index
	at    time.Time
}

// standbySet is an upstream's standby endpoints as the plan sees them.
//
// Two watches answer each change of an upstream's instances, each on its
// own: the upstream's, of the usable instances, and its standby watch. An
// instance that moves from one answer to the other would be in neither
// between the two answers, and its proof forgotten meanwhile (track drops
// a check nothing lists), to be made again before it is placed: the very
// handshake proving ahead saves. So an endpoint that one watch's answer
// drops stays standby (carried) until the other watch has answered as of
// the same change or a later one: Consul's X-Consul-Index orders them,
// both being queries of the same service's health.
type standbySet struct {
	latest    standbyList                        // the standby watch's newest answer
	listIndex uint64                             // the index of the upstream's own newest answer
	carried   map[netip.AddrPort]carriedEndpoint // dropped by one watch, not yet answered by the other
	// eps and inst are latest and carried together, eps sorted: what the
	// plan proves ahead.
	eps  []slots.Endpoint
	inst map[netip.AddrPort]instance
}

// carriedEndpoint is an endpoint one watch dropped.
type carriedEndpoint struct {
	ep   slots.Endpoint
	inst instance
	// until: an answer of the other watch at this index or later ends it;
	// byStandby says which watch that is.
	until     uint64
	byStandby bool
}

// standbyAnswer records an answer of upstream name's standby watch, and
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
			s.carried[k] = carriedEndpoint{ep: e, inst: s.latest.inst[k], until: l.index}
		})
	}
	s.latest = l
	s.rebuild()
	if _, ok := d.dirty[name]; !ok {
		d.dirty[name] = l.at
	}
}

// listAnswer records that upstream name's own watch answered at index,
// listing now where it listed old before (with oldInst).
func (d *desired) listAnswer(name string, old, now []slots.Endpoint, oldInst map[netip.AddrPort]instance, index uint64) {
	s := d.standby[name]
	if s == nil {
		return // no standby watch, or none of its answers yet
	}
	for k, c := range s.carried {
		if !c.byStandby && index >= c.until {
			delete(s.carried, k)
		}
	}
	if s.latest.index < index {
		dropped(old, now, func(k netip.AddrPort, e slots.Endpoint) {
			s.carried[k] = carriedEndpoint{ep: e, inst: oldInst[k], until: index, byStandby: true}
		})
	}
	s.listIndex = index
	s.rebuild()
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

// rebuild sets eps and inst from latest and carried.
func (s *standbySet) rebuild() {
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
}
