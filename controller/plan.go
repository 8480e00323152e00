package controller

import (
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/l7"
	"github.com/haproxy-connect/haproxy-connect/slots"
)

// The plan: from what the sources want (desired) and what HAProxy runs
// (applied, as the executor last reported it) to the actions that move
// HAProxy toward the first. It does no I/O: the time, the identity
// verification state and the reload backoff come in as values, and what
// it wants done, verifications and waits included, goes out as actions
// for the executor (execute.go). So a running HAProxy found at start is
// just an applied state to read back (adoptAction) and plan from.

// planInput is everything plan decides from.
type planInput struct {
	now     time.Time
	desired *desired // read only
	applied *applied // read only
	// masterAlive: a master process runs, started by this controller or
	// found running (then applied.known is false until it is adopted).
	masterAlive bool
	// authzGen is the intentions generation the SPOE agent published.
	authzGen uint64
	proofs   proofs
	pacing   pacing
	// initialWait bounds how long the first start waits for every
	// upstream's first endpoint list and their verifications
	// (Config.InitialWait); minSlots is Config.MinSlots.
	initialWait time.Duration
	minSlots    int
	// chainMaps are the routed upstreams' desired chain map entries, and
	// chainFile names an upstream's chain map file (chain.go).
	chainMaps map[string]map[string]string
	chainFile func(upstream string) string
	// l7 is the L7 map's table the SPOE agent published (l7map.go).
	l7 []l7.Compiled
	// namesMap is the applied listener's sources map when the controller
	// names its sources (a tcp listener), else ""; names are the sources
	// the agent allowed that wait for it (sourcesmap.go).
	namesMap string
	names    map[[32]byte]string
}

// pacing is the plan's memory of time: when the leaf was last swapped,
// and the reload backoff.
type pacing struct {
	leafSwappedAt time.Time
	// reloadDelay spaces reload attempts after a failure (5 s doubling to
	// 1 min, reset by a success); until reloadAfter, runtime changes keep
	// being applied to the running configuration.
	reloadDelay time.Duration
	reloadAfter time.Time
}

// Reload backoff bounds.
const (
	reloadBackoffMin = 5 * time.Second
	reloadBackoffMax = time.Minute
)

// reloadFailed is p after a reload failed at now.
func (p pacing) reloadFailed(now time.Time) pacing {
	p.reloadDelay = min(max(2*p.reloadDelay, reloadBackoffMin), reloadBackoffMax)
	p.reloadAfter = now.Add(p.reloadDelay)
	return p
}

// reloaded is p after a reload succeeded.
func (p pacing) reloaded() pacing {
	p.reloadDelay, p.reloadAfter = 0, time.Time{}
	return p
}

// proofs is the plan's view of upstream identity verification
// (identities implements it, identity.go).
type proofs interface {
	// proof is the state of the check key (expected identity and
	// address); ok is false when there is none.
	proof(key checkKey, now time.Time) (p proof, ok bool)
	// listed is the set of check keys upstream lists.
	listed(upstream string) map[checkKey]struct{}
	// standby is the set of check keys upstream lists as standby.
	standby(upstream string) map[checkKey]struct{}
}

// proof is what the plan needs of one identity check.
type proof struct {
	known bool // a verification completed
	good  bool // the last conclusive one proved the identity
	// due: none is in flight, and the check has no result yet or its
	// result is due for renewal.
	due      bool
	instance string // the Consul service ID it was last listed with
}

// Actions. Each is one step the executor takes; plan returns them in the
// order they are to be taken.
type action interface{ isAction() }

// adoptAction: a running master was found and nothing is known of what
// it serves: read its applied state back before anything else.
type adoptAction struct{}

// startAction starts HAProxy on the rendered configuration.
type startAction struct {
	sidecar Sidecar
	leaf    *certs.Bundle
	roots   *certs.Roots
	tables  map[string]slots.Table
	gen     uint64
	// missing names the upstreams without a first endpoint list, and
	// unverified says some endpoints have no verification result yet:
	// InitialWait passed without them (the executor logs it).
	missing    []string
	unverified bool
}

// reloadAction renders the configuration and reloads HAProxy.
type reloadAction struct {
	reason string
	// cause names the reasons for the reload metric, from a fixed set
	// (reloadRegistration, ...) joined with "+"; reason is the text.
	cause   string
	sidecar Sidecar
	leaf    *certs.Bundle
	roots   *certs.Roots
	tables  map[string]slots.Table
	gen     uint64
}

// rotateLeafAction swaps the leaf at run time.
type rotateLeafAction struct{ leaf *certs.Bundle }

// publishAuthzGenAction puts the intentions generation in the authz map.
type publishAuthzGenAction struct{ gen uint64 }

// runtimeBatchAction sends the upstreams' slot operations as one batch.
type runtimeBatchAction struct{ upstreams []upstreamOps }

// upstreamOps is one upstream's part of a runtime batch.
type upstreamOps struct {
	name string
	ops  []slots.Op
	next slots.Table // the table once every op succeeded
	// pending: endpoints still being verified, so the upstream stays
	// dirty.
	pending bool
}

// settleAction records that the upstreams' endpoints are applied (they
// leave desired.dirty) without a command.
type settleAction struct{ upstreams []string }

// verifyAction lists an upstream's endpoints for identity verification:
// the executor records them, starts the verifications that are missing or
// due, and drops the results no upstream lists any more.
type verifyAction struct {
	upstream string
	alpn     []string
	checks   []checkRef
	// standby are the upstream's standby endpoints (desired.standby):
	// proven ahead, never placed by the plan while they stay standby.
	standby []checkRef
	err     error // the upstream's identity is unknown: nothing is placed
}

// checkRef names one identity check, and the Consul instance listed there.
type checkRef struct {
	key      checkKey
	instance string
}

// waitAction: plan again at the latest at at (initial wait, reload
// backoff, leaf swap interval). One per plan, the earliest.
type waitAction struct{ at time.Time }

func (adoptAction) isAction()           {}
func (startAction) isAction()           {}
func (reloadAction) isAction()          {}
func (rotateLeafAction) isAction()      {}
func (publishAuthzGenAction) isAction() {}
func (runtimeBatchAction) isAction()    {}
func (settleAction) isAction()          {}
func (verifyAction) isAction()          {}
func (waitAction) isAction()            {}

// plan returns the actions that move HAProxy from in.applied toward
// in.desired, in order:
//
//   - nothing until the registration, the leaf and the roots are known;
//   - adopt, when a master runs whose state is unknown;
//   - start, when no master runs, once every upstream has its first
//     endpoint list and those endpoints their verification results, or
//     InitialWait passed;
//   - reload, with its reasons (registration, CA roots, a public listener
//     a leaf swap broke), unless a failed reload's backoff runs: then a
//     wait, and the rest goes on, on the running configuration;
//   - rotate the leaf, unless the last swap was under LeafSwapInterval
//     ago and the served leaf outlives that interval: then a wait;
//   - publish the authz generation;
//   - verify, settle and a runtime batch for the dirty upstreams.
func plan(in planInput) []action {
	d, ap := in.desired, in.applied
	if d.sidecar == nil || d.leaf == nil || d.roots == nil {
		return nil
	}
	if in.masterAlive && !ap.known {
		// The configuration id an adopted HAProxy is compared with
		// depends on the discovery chains: adopt once they are known
		// (or InitialWait passed), or it would look foreign and reload.
		if deadline := d.sidecarSince.Add(in.initialWait); len(d.chainsPending()) > 0 && in.now.Before(deadline) {
			return []action{waitAction{at: deadline}}
		}
		return []action{adoptAction{}}
	}
	if !in.masterAlive {
		return in.planStart()
	}
	var acts []action
	var wait time.Time
	waitUntil := func(at time.Time) {
		if wait.IsZero() || at.Before(wait) {
			wait = at
		}
	}
	var reasons, causes []string
	if !d.sidecar.Equal(ap.sidecar) {
		reasons = append(reasons, "registration: "+ap.sidecar.Diff(*d.sidecar))
		cause := reloadRegistration
		if ap.sidecar.withoutChains().Equal(d.sidecar.withoutChains()) {
			cause = reloadChain
		}
		causes = append(causes, cause)
	}
	if d.roots.PEM != ap.rootsPEM {
		// HAProxy 2.6 breaks on "commit ssl ca-file" (haproxy GH #3165,
		// fixed in 3.3): roots change by rewriting the file and reloading.
		reasons = append(reasons, "CA roots changed")
		causes = append(causes, reloadRoots)
	}
	if ap.listenerBroken != "" {
		reasons = append(reasons, ap.listenerBroken)
		causes = append(causes, reloadListener)
	}
	if ap.foreign != "" {
		reasons = append(reasons, ap.foreign)
		causes = append(causes, reloadAdopted)
	}
	if len(reasons) > 0 {
		if in.now.Before(in.pacing.reloadAfter) {
			// A reload failed recently: retry later, and meanwhile keep the
			// running configuration's endpoints and certificates current.
			waitUntil(in.pacing.reloadAfter)
		} else if at, verify, ok := in.warming(); ok {
			// New chain targets wait for their endpoints (see warming);
			// the verifications run meanwhile.
			acts = append(acts, verify...)
			waitUntil(at)
		} else {
			verified, verify, _ := in.verifications()
			return append(verify, reloadAction{reason: strings.Join(reasons, "; "), cause: strings.Join(causes, "+"), sidecar: *d.sidecar,
				leaf: d.leaf, roots: d.roots, tables: in.plannedTables(verified), gen: in.authzGen})
		}
	}
	if ap.leaf == nil || d.leaf.PEM != ap.leaf.PEM {
		// The newest leaf waits out the swap interval, unless the one
		// HAProxy serves expires first.
		next := in.pacing.leafSwappedAt.Add(LeafSwapInterval)
		if ap.leaf != nil && in.now.Before(next) && ap.leaf.NotAfter.After(next) {
			waitUntil(next)
		} else {
			acts = append(acts, rotateLeafAction{leaf: d.leaf})
		}
	}
	if ap.foreign == "" {
		// Before the generation: a connection the agent decides under
		// new intentions finds its entries (l7map.go).
		acts = append(acts, planL7Map(in.l7, ap.l7, ap.l7Unknown, ap.l7Held)...)
	}
	if ap.foreign == "" {
		acts = append(acts, planSourceNames(in.names, in.namesMap == "")...)
	}
	if in.authzGen > ap.authzGen {
		// Never backwards: an adopted HAProxy may hold a later generation
		// than this process's agent has reached (Config.OnAdopt raises it).
		acts = append(acts, publishAuthzGenAction{gen: in.authzGen})
	}
	acts = append(acts, in.planEndpoints()...)
	if in.chainFile != nil {
		acts = append(acts, planChainMaps(in.runningChainMaps(), ap.chainMaps, in.chainFile)...)
	}
	if !wait.IsZero() {
		acts = append(acts, waitAction{at: wait})
	}
	return acts
}

// runningChainMaps is the desired chain maps of the routed upstreams
// whose chain shape HAProxy runs. The others wait for their reload (which
// writes the map file whole): their entries may name target backends
// HAProxy does not have yet (a request sent to one would take the
// upstream's own backend), or routes it numbers otherwise. So does every
// map of an adopted HAProxy that runs another configuration.
func (in planInput) runningChainMaps() map[string]map[string]string {
	if in.applied.foreign != "" {
		return nil
	}
	running := map[string]string{}
	for _, u := range in.applied.sidecar.Upstreams {
		running[u.Name] = u.Chain
	}
	out := map[string]map[string]string{}
	for _, u := range in.desired.sidecar.Upstreams {
		if m, ok := in.chainMaps[u.Name]; ok && u.Chain != "" && running[u.Name] == u.Chain {
			out[u.Name] = m
		}
	}
	return out
}

// warming reports whether the due reload should wait for new chain
// targets, until when, and the verifications to run meanwhile. A target
// the running configuration lacks, whose endpoint list has not arrived or
// whose endpoints are still being verified, would be rendered without
// servers while the chain map already sends requests to it: every such
// request would get a 503 until the runtime batch places its endpoints
// (TestChainOnlyPassing saw 41 of 700 fail). As Envoy warms a new
// cluster (its endpoints) before routes use it, the reload waits for
// them, for at most InitialWait from the chain's arrival; past it, the
// reload goes ahead with what is there.
func (in planInput) warming() (time.Time, []action, bool) {
	d := in.desired
	deadline := d.chainSince.Add(in.initialWait)
	if !in.now.Before(deadline) {
		return time.Time{}, nil, false
	}
	running := map[string]bool{}
	for _, u := range in.applied.sidecar.Upstreams {
		running[u.Name] = true
	}
	var verify []action
	waiting := false
	for _, u := range d.sidecar.Upstreams {
		if u.Target == "" || running[u.Name] {
			continue
		}
		eps, seen := d.endpoints[u.Name]
		if !seen {
			waiting = true
			continue
		}
		_, pending, v := in.verifiedEndpoints(u.Name, eps)
		if v != nil {
			verify = append(verify, *v)
		}
		waiting = waiting || pending
	}
	if !waiting {
		return time.Time{}, nil, false
	}
	return deadline, verify, true
}

// planStart plans HAProxy's start. It waits up to InitialWait from the
// registration for every upstream's first endpoint list and for the
// verification results of the endpoints listed (which come back within
// milliseconds; they start as soon as a list is there), so that HAProxy
// starts with endpoints; past it, it starts with what it has.
//
// While it waits, each verification result re-plans: only the
// verifications are planned then, and the slot tables once, when HAProxy
// starts. Planning every table on every result would cost
// O(endpoints²) before the start.
func (in planInput) planStart() []action {
	d := in.desired
	verified, acts, pending := in.verifications()
	var missing []string
	for _, u := range d.sidecar.Upstreams {
		if _, ok := d.endpoints[u.Name]; !ok {
			missing = append(missing, u.Name)
		}
	}
	// A routed upstream's targets are known once its chain is: start
	// with them rather than reload for them.
	missing = append(missing, d.chainsPending()...)
	if deadline := d.sidecarSince.Add(in.initialWait); (len(missing) > 0 || pending) && in.now.Before(deadline) {
		return append(acts, waitAction{at: deadline})
	}
	return append(acts, startAction{sidecar: *d.sidecar, leaf: d.leaf, roots: d.roots, tables: in.plannedTables(verified),
		gen: in.authzGen, missing: missing, unverified: pending})
}

// verifications checks every upstream's listed endpoints against their
// identity proofs: verified holds, by upstream, those that proved their
// identity (an upstream absent from it has no endpoint list yet); verify
// lists the verifications to record or start, and pending says some
// endpoints have no result yet.
func (in planInput) verifications() (verified map[string][]slots.Endpoint, verify []action, pending bool) {
	verified = make(map[string][]slots.Endpoint, len(in.desired.sidecar.Upstreams))
	for _, u := range in.desired.sidecar.Upstreams {
		if eps, seen := in.desired.endpoints[u.Name]; seen {
			ok, p, v := in.verifiedEndpoints(u.Name, eps)
			if v != nil {
				verify = append(verify, *v)
			}
			pending = pending || p
			verified[u.Name] = ok
		}
	}
	return verified, verify, pending
}

// plannedTables is the slot assignment to render into a new configuration:
// each upstream's table moved to its verified endpoints (verifications)
// and resized to have room to grow, keeping slots where they are. Only
// endpoints that proved their identity are placed.
func (in planInput) plannedTables(verified map[string][]slots.Endpoint) map[string]slots.Table {
	tables := map[string]slots.Table{}
	for _, u := range in.desired.sidecar.Upstreams {
		t, ok := in.applied.tables[u.Name]
		if !ok {
			t = slots.New(u.Name, bootstrap.SlotPrefix, in.minSlots)
		}
		if eps, seen := verified[u.Name]; seen {
			_, t, _ = slots.Plan(t, eps)
		}
		tables[u.Name] = slots.Resize(t, slots.Size(t.Used(), in.minSlots))
	}
	return tables
}

// planEndpoints plans every dirty upstream's slot operations as one
// runtime batch. An upstream HAProxy does not have yet is left to its
// reload.
func (in planInput) planEndpoints() []action {
	d, ap := in.desired, in.applied
	var acts []action
	var settled []string
	var batch runtimeBatchAction
	names := make([]string, 0, len(d.dirty))
	for name := range d.dirty {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		eps, seen := d.endpoints[name]
		table, applied := ap.tables[name]
		if !seen || !applied {
			continue // a new upstream: its reload applies it
		}
		// An endpoint carries no request before it proved its identity.
		ok, pending, v := in.verifiedEndpoints(name, eps)
		if v != nil {
			acts = append(acts, *v)
		}
		if pending && len(ok) == 0 && in.now.Sub(d.dirty[name]) < maxHold {
			ok = holdLeaving(table, eps) // ok is empty here
		}
		ops, next, _ := slots.Plan(table, ok)
		if len(ops) == 0 {
			if !pending {
				settled = append(settled, name)
			}
			continue
		}
		batch.upstreams = append(batch.upstreams, upstreamOps{name: name, ops: ops, next: next, pending: pending})
	}
	if len(settled) > 0 {
		acts = append(acts, settleAction{upstreams: settled})
	}
	if len(batch.upstreams) > 0 {
		acts = append(acts, batch)
	}
	return acts
}

// noStandby is the standby set of an upstream that has none.
var noStandby standbySet

// verifiedEndpoints returns the endpoints of upstream name that have proved
// its identity and whether some endpoint has no result yet, and the
// verifyAction that records its list and its standby endpoints, and
// starts the verifications that are missing or due (nil when there is
// nothing to record or start). Standby endpoints are never placed and
// never pending: they are proven ahead only.
func (in planInput) verifiedEndpoints(name string, eps []slots.Endpoint) (ok []slots.Endpoint, pending bool, v *verifyAction) {
	d := in.desired
	u, found := d.sidecar.upstream(name)
	if !found {
		return nil, false, nil
	}
	// One identity for a service upstream, computed once: this runs on
	// every plan of the upstream, for each of its endpoints.
	want, err := wantID(d.leaf, d.roots, u, instance{})
	if err != nil {
		return nil, false, &verifyAction{upstream: name, err: err}
	}
	query := u.Type == string(api.UpstreamDestTypePreparedQuery)
	keyOf := func(e slots.Endpoint, insts map[netip.AddrPort]instance) (checkKey, instance, bool) {
		addr, valid := endpointKey(e.Addr, e.Port)
		if !valid {
			return checkKey{}, instance{}, false // slots.Plan rejects it too
		}
		inst := insts[addr]
		if query {
			// Each answer entry names the service it serves.
			want, err := wantID(d.leaf, d.roots, u, inst)
			return checkKey{want, addr}, inst, err == nil
		}
		return checkKey{want, addr}, inst, true
	}
	// stale says the list is to be recorded again: an endpoint it does
	// not list yet, a proof due, or another instance at the address.
	stale := func(k checkKey, inst instance, prev map[checkKey]struct{}) (proof, bool) {
		p, exists := in.proofs.proof(k, in.now)
		_, listed := prev[k]
		return p, !listed || !exists || p.due || (inst.id != "" && inst.id != p.instance)
	}
	insts, sb := d.instances[name], d.standby[name]
	if sb == nil {
		sb = &noStandby
	}
	prev, prevStandby := in.proofs.listed(name), in.proofs.standby(name)
	changed, n, m := false, 0, 0
	ok = make([]slots.Endpoint, 0, len(eps))
	for _, e := range eps {
		k, inst, valid := keyOf(e, insts)
		if !valid {
			continue
		}
		n++
		p, st := stale(k, inst, prev)
		changed = changed || st
		switch {
		case p.good:
			ok = append(ok, e)
		case !p.known:
			pending = true
		}
	}
	for _, e := range sb.eps {
		if k, inst, valid := keyOf(e, sb.inst); valid {
			m++
			_, st := stale(k, inst, prevStandby)
			changed = changed || st
		}
	}
	if !changed && n == len(prev) && m == len(prevStandby) {
		return ok, pending, nil
	}
	// The list is recorded again: most plans (a verification result, a
	// batch retried) find it unchanged and skip this.
	refs := func(eps []slots.Endpoint, insts map[netip.AddrPort]instance, n int) []checkRef {
		out := make([]checkRef, 0, n)
		for _, e := range eps {
			if k, inst, valid := keyOf(e, insts); valid {
				out = append(out, checkRef{key: k, instance: inst.id})
			}
		}
		return out
	}
	v = &verifyAction{upstream: name, alpn: alpnList(u.Protocol), checks: refs(eps, insts, n)}
	if m > 0 {
		v.standby = refs(sb.eps, sb.inst, m)
	}
	return ok, pending, v
}

// inheritedChecks lists, per upstream, the identity checks of the
// endpoints an adopted HAProxy serves. They were proven before they were
// placed, by the process that placed them, whose results this one does not
// have: the executor records them as proven and due, so they keep their
// slots while they are proven again at once (as a re-proof never takes a
// proven endpoint out of service, see Controller.verified) instead of
// being parked until their first proof here. One that proves another
// identity is parked then.
func inheritedChecks(d *desired, ap *applied) []verifyAction {
	var out []verifyAction
	for _, u := range ap.sidecar.Upstreams {
		t, ok := ap.tables[u.Name]
		if !ok {
			continue
		}
		insts := d.instances[u.Name]
		v := verifyAction{upstream: u.Name, alpn: alpnList(u.Protocol)}
		for _, s := range t.Slots {
			if !s.Used {
				continue
			}
			addr, valid := endpointKey(s.Addr, s.Port)
			if !valid {
				continue
			}
			want, err := wantID(d.leaf, d.roots, u, insts[addr])
			if err != nil {
				continue // not proven here: its first proof places it
			}
			v.checks = append(v.checks, checkRef{key: checkKey{want, addr}, instance: insts[addr].id})
		}
		out = append(out, v)
	}
	return out
}

// upstream is the upstream named name.
func (sc *Sidecar) upstream(name string) (Upstream, bool) {
	for _, u := range sc.Upstreams {
		if u.Name == name {
			return u, true
		}
	}
	return Upstream{}, false
}
