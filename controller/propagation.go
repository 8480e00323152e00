package controller

import (
	"net/netip"
	"time"

	"github.com/haproxy-connect/haproxy-connect/slots"
)

// Endpoint propagation, measured per endpoint.
//
// haproxy_connect_endpoint_propagation_seconds has one sample per endpoint
// that joins or leaves an upstream HAProxy already serves: from the
// arrival of the Consul answer that listed it first, or no longer, to
// HAProxy confirming the runtime batch (or the reload) that put it in or
// out of service. An upstream-wide figure (from its oldest unapplied
// change until nothing is left to apply) said nothing of any one
// endpoint: in a burst, with proofs in flight until the last endpoint
// proved itself, it was one sample as long as the whole burst.
//
// A change that never takes effect (an endpoint that does not prove its
// identity, or that the slot plan rejects) has no sample: it is dropped
// once its upstream has nothing left to apply, or the upstream leaves the
// sidecar.

// endpointChange is an endpoint's listing change not yet in effect.
type endpointChange struct {
	at     time.Time // arrival of the answer that made the change
	listed bool      // joined (true) or left (false) the list
}

// noteChanges records the endpoints that joined or left upstream name's
// list between the instances old and now, from an answer that arrived at
// at. A change that reverses one not yet in effect replaces it.
func (d *desired) noteChanges(name string, old, now map[netip.AddrPort]instance, at time.Time) {
	ch := d.changes[name]
	note := func(k netip.AddrPort, listed bool) {
		if ch == nil {
			ch = map[netip.AddrPort]endpointChange{}
			d.changes[name] = ch
		}
		ch[k] = endpointChange{at: at, listed: listed}
	}
	for k := range now {
		if _, ok := old[k]; !ok {
			note(k, true)
		}
	}
	for k := range old {
		if _, ok := now[k]; !ok {
			note(k, false)
		}
	}
}

// changesApplied observes the propagation of upstream name's changes that
// table t, now confirmed by HAProxy, puts in effect, and forgets them;
// with settled (nothing is left to apply for the upstream) it forgets the
// others too.
func (c *Controller) changesApplied(name string, t slots.Table, settled bool) {
	ch := c.desired.changes[name]
	if len(ch) == 0 {
		return
	}
	serving := make(map[netip.AddrPort]bool, len(ch))
	for _, s := range t.Slots {
		if !s.Used {
			continue
		}
		if k, valid := endpointKey(s.Addr, s.Port); valid {
			if _, changed := ch[k]; changed {
				serving[k] = true
			}
		}
	}
	now := c.now()
	for k, e := range ch {
		if serving[k] == e.listed {
			c.metrics.propagation.Observe(now.Sub(e.at).Seconds())
			delete(ch, k)
		}
	}
	if settled || len(ch) == 0 {
		delete(c.desired.changes, name)
	}
}

// tablesApplied is changesApplied for every table a start, reload or
// adoption put in place; an upstream that has none any more has no change
// left to take effect.
func (c *Controller) tablesApplied(tables map[string]slots.Table) {
	for name := range c.desired.changes {
		t, ok := tables[name]
		if !ok {
			delete(c.desired.changes, name)
			continue
		}
		c.changesApplied(name, t, false)
	}
}
