package controller

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/slots"
)

// The plan's tests are transcripts: a sequence of inputs (the desired
// state, the clock, what the executor reached) and, for each, the exact
// actions plan returns. Between steps a model of the executor (planSim)
// takes the actions to the applied state as execute does, with the
// outcome the step sets (a failed reload, an endpoint still being
// verified); the real executor is TestReconcileTranscript's.

// t0 is the clock at a scenario's start.
var t0 = time.Date(2026, 12, 3, 9, 0, 0, 0, time.UTC)

// planSim is the plan's input and a model of what the executor does.
type planSim struct {
	d           desired
	ap          applied
	pacing      pacing
	masterAlive bool
	authzGen    uint64
	proofs      *fakeProofs
	now         time.Time
	// Outcomes of the next actions.
	failReload bool
	breakBind  bool // the bind check after a leaf swap fails
	// inflight: addresses whose verification does not complete.
	inflight map[string]bool
	// readBack is what adoption reads back from a running master.
	readBack applied
	// results are the verifications that completed during the last
	// actions; they come back to the loop as events afterwards.
	results []checkResult
}

type checkResult struct {
	upstream string
	key      checkKey
	instance string
	standby  bool // a proof ahead: it re-plans nothing
}

type fakeProofs struct {
	checks   map[checkKey]proof
	lists    map[string]map[checkKey]struct{}
	standbys map[string]map[checkKey]struct{}
}

func (f *fakeProofs) proof(k checkKey, _ time.Time) (proof, bool) {
	p, ok := f.checks[k]
	return p, ok
}

func (f *fakeProofs) listed(u string) map[checkKey]struct{} { return f.lists[u] }

func (f *fakeProofs) standby(u string) map[checkKey]struct{} { return f.standbys[u] }

func newPlanSim(sc *Sidecar, leaf *certs.Bundle, roots *certs.Roots) *planSim {
	return &planSim{
		d: desired{sidecar: sc, sidecarSince: t0, leaf: leaf, roots: roots,
			endpoints: map[string][]slots.Endpoint{}, dirty: map[string]time.Time{}, instances: map[string]map[netip.AddrPort]instance{},
			standby: map[string]*standbySet{}},
		proofs: &fakeProofs{checks: map[checkKey]proof{}, lists: map[string]map[checkKey]struct{}{},
			standbys: map[string]map[checkKey]struct{}{}},
		now:      t0,
		inflight: map[string]bool{},
	}
}

func (s *planSim) input() planInput {
	return planInput{now: s.now, desired: &s.d, applied: &s.ap, masterAlive: s.masterAlive, authzGen: s.authzGen,
		proofs: s.proofs, pacing: s.pacing, initialWait: 3 * time.Second, minSlots: 8}
}

// endpoints is a new endpoint list from Consul, now.
func (s *planSim) endpoints(upstream string, eps ...slots.Endpoint) {
	s.d.setEndpoints(upstream, eps, s.now)
}

// standby is a new list of standby endpoints from Consul, now.
func (s *planSim) standby(upstream string, eps ...slots.Endpoint) {
	s.d.standbyAnswer(upstream, standbyList{eps: eps, at: s.now})
}

// step plans, describes the actions, and takes them as execute would
// (replanning at once when execute would).
func (s *planSim) step() []string {
	var out []string
	for range maxReplans + 1 {
		acts := plan(s.input())
		for _, a := range acts {
			out = append(out, describe(a, s.now))
		}
		again := s.take(acts)
		if len(s.results) > 0 {
			again = true
			s.deliverResults()
		}
		if !again {
			break
		}
	}
	return out
}

// deliverResults is what the loop does with a verification result (see
// Controller.verified): the endpoint proved its identity, and the
// upstreams listing it are planned again.
func (s *planSim) deliverResults() {
	for _, r := range s.results {
		if r.standby {
			p := s.proofs.checks[r.key]
			p.known, p.good, p.due = true, true, false
			s.proofs.checks[r.key] = p
			continue
		}
		s.result(r.upstream, r.key, true)
	}
	s.results = nil
}

// result records a verification result of key, listed by upstream, as
// Controller.verified does: a result that changes nothing for a proven
// endpoint plans nothing.
func (s *planSim) result(upstream string, key checkKey, good bool) {
	p := s.proofs.checks[key]
	wasGood := p.good
	p.known, p.good, p.due = true, good, false
	s.proofs.checks[key] = p
	if good && wasGood {
		return
	}
	if _, ok := s.d.dirty[upstream]; !ok {
		s.d.dirty[upstream] = s.now
	}
}

// take models execute: it reports whether execute would plan again.
func (s *planSim) take(acts []action) (again bool) {
	for _, a := range acts {
		switch a := a.(type) {
		case adoptAction:
			// execute.adopt: the applied state read back, every upstream
			// compared with it.
			s.ap = s.readBack
			for _, v := range inheritedChecks(&s.d, &s.ap) {
				for _, r := range v.checks {
					if _, ok := s.proofs.checks[r.key]; !ok {
						s.proofs.checks[r.key] = proof{known: true, good: true, due: true, instance: r.instance}
					}
				}
			}
			for name := range s.d.endpoints {
				if _, ok := s.d.dirty[name]; !ok {
					s.d.dirty[name] = s.now
				}
			}
			return true
		case startAction:
			s.masterAlive = true
			s.ap = applied{known: true, sidecar: a.sidecar, leaf: a.leaf, rootsPEM: a.roots.PEM, tables: a.tables, authzGen: a.gen}
			clear(s.d.dirty)
			return false
		case reloadAction:
			if s.failReload {
				s.pacing = s.pacing.reloadFailed(s.now)
				return true
			}
			s.pacing = s.pacing.reloaded()
			s.ap = applied{known: true, sidecar: a.sidecar, leaf: a.leaf, rootsPEM: a.roots.PEM, tables: a.tables, authzGen: a.gen}
			clear(s.d.dirty)
		case rotateLeafAction:
			s.pacing.leafSwappedAt = s.now
			s.ap.leaf = a.leaf
			if s.breakBind {
				s.ap.listenerBroken = "public listener lost client certificate verification after the leaf swap"
				return true
			}
		case publishAuthzGenAction:
			s.ap.authzGen = a.gen
		case verifyAction:
			record := func(refs []checkRef, standby bool) map[checkKey]struct{} {
				list := map[checkKey]struct{}{}
				for _, r := range refs {
					list[r.key] = struct{}{}
					if p, ok := s.proofs.checks[r.key]; !ok || p.due {
						// A new or due check is in flight; it proves
						// the identity at once, unless the scenario
						// holds it in flight.
						p.due, p.instance = false, r.instance
						s.proofs.checks[r.key] = p
						if !s.inflight[r.key.addr.String()] {
							s.results = append(s.results, checkResult{upstream: a.upstream, key: r.key, instance: r.instance, standby: standby})
						}
					}
				}
				return list
			}
			s.proofs.lists[a.upstream] = record(a.checks, false)
			s.proofs.standbys[a.upstream] = record(a.standby, true)
		case settleAction:
			for _, n := range a.upstreams {
				delete(s.d.dirty, n)
			}
		case runtimeBatchAction:
			for _, u := range a.upstreams {
				s.ap.tables[u.name] = u.next
				if !u.pending {
					delete(s.d.dirty, u.name)
				}
			}
		}
	}
	return false
}

// describe is one line of the transcript: the action, with its runtime
// commands as the executor sends them and times relative to now.
func describe(a action, now time.Time) string {
	switch a := a.(type) {
	case adoptAction:
		return "adopt"
	case startAction:
		s := "start " + describeTables(a.tables)
		if len(a.missing) > 0 {
			s += " missing " + strings.Join(a.missing, ",")
		}
		if a.unverified {
			s += " unverified"
		}
		return s
	case reloadAction:
		return "reload (" + a.reason + ") " + describeTables(a.tables)
	case rotateLeafAction:
		return "rotate leaf " + a.leaf.Serial
	case publishAuthzGenAction:
		return fmt.Sprintf("publish authz generation %d", a.gen)
	case verifyAction:
		addrs := make([]string, 0, len(a.checks))
		for _, r := range a.checks {
			addrs = append(addrs, r.key.addr.String())
		}
		if len(a.standby) > 0 {
			addrs = append(addrs, "standby")
			for _, r := range a.standby {
				addrs = append(addrs, r.key.addr.String())
			}
		}
		return strings.Join(append([]string{"verify " + a.upstream + ":"}, addrs...), " ")
	case settleAction:
		return "settle " + strings.Join(a.upstreams, " ")
	case runtimeBatchAction:
		var cmds []string
		for _, u := range a.upstreams {
			for _, op := range u.ops {
				cs, err := runtime.SlotCommands(u.name, op, runtime.ServerOptions{})
				if err != nil {
					return err.Error()
				}
				for _, cmd := range cs {
					cmds = append(cmds, strings.TrimPrefix(cmd.String(), "@1 "))
				}
			}
			if u.pending {
				cmds = append(cmds, u.name+" stays dirty")
			}
		}
		return "batch: " + strings.Join(cmds, "; ")
	case waitAction:
		return "wait " + a.at.Sub(now).String()
	}
	return fmt.Sprintf("unknown %T", a)
}

// describeTables lists each upstream's endpoints in slot order, and its
// size.
func describeTables(tables map[string]slots.Table) string {
	var parts []string
	for _, name := range slices.Sorted(maps.Keys(tables)) {
		t := tables[name]
		var eps []string
		for _, s := range t.Slots {
			if s.Used {
				eps = append(eps, fmt.Sprintf("%s=%s:%d", s.Name, s.Addr, s.Port))
			}
		}
		parts = append(parts, fmt.Sprintf("%s[%d]{%s}", name, len(t.Slots), strings.Join(eps, " ")))
	}
	return strings.Join(parts, " ")
}

// TestPlanTranscript: for each scenario, a sequence of inputs and the
// exact actions planned for each.
func TestPlanTranscript(t *testing.T) {
	leafPEM := testLeaf(t)
	leaf := func(serial string, notAfter time.Duration) *certs.Bundle {
		b := *leafPEM
		b.Serial, b.PEM, b.NotAfter = serial, b.PEM+"#"+serial, t0.Add(notAfter)
		return &b
	}
	roots := func(pem string) *certs.Roots { return &certs.Roots{PEM: pem, TrustDomain: "td.consul"} }
	leaf1 := leaf("01", 72*time.Hour)
	api, db := up("api", 9191), up("db", 9192)
	target := Upstream{Name: "up_api:api:v2:dc1", Type: "service", Destination: "api", Target: "api:v2:dc1", Parent: "up_api"}
	const initialWait = 3 * time.Second

	type step struct {
		name   string
		at     time.Duration // the clock, from t0
		change func(s *planSim)
		want   []string
	}
	// started is a sidecar that runs api with endpoints 1 and 2 and db
	// with endpoint 5, all proven.
	started := func(s *planSim) {
		s.endpoints("up_api", ep(1, 21000), ep(2, 21000))
		s.endpoints("up_db", ep(5, 21000))
		s.step()
	}
	scenarios := []struct {
		name  string
		setup func(s *planSim)
		steps []step
	}{
		{"nothing before the registration, leaf and roots", func(s *planSim) { s.d.leaf = nil }, []step{
			{"no leaf yet", 0, func(s *planSim) {}, nil},
			{"the leaf arrives: start waits for the endpoint lists", 0, func(s *planSim) { s.d.leaf = leaf1 }, []string{"wait 3s"}},
		}},
		{"start waits for the first endpoint lists up to InitialWait", nil, []step{
			{"no list yet", 0, func(s *planSim) {}, []string{"wait 3s"}},
			{"api's list: verified meanwhile, still waiting for db's", time.Second, func(s *planSim) {
				s.endpoints("up_api", ep(1, 21000), ep(2, 21000))
			}, []string{
				"verify up_api: 10.0.0.1:21000 10.0.0.2:21000",
				"wait 2s",
				// The results came back.
				"wait 2s",
			}},
			{"db's list: verified (the results come back at once), then started", 1500 * time.Millisecond, func(s *planSim) {
				s.endpoints("up_db", ep(5, 21000))
			}, []string{
				"verify up_db: 10.0.0.5:21000",
				"wait 1.5s",
				"start up_api[8]{s1=10.0.0.1:21000 s2=10.0.0.2:21000} up_db[8]{s1=10.0.0.5:21000}",
			}},
		}},
		{"start does not wait past InitialWait", nil, []step{
			{"api's list only", time.Second, func(s *planSim) {
				s.endpoints("up_api", ep(1, 21000))
			}, []string{"verify up_api: 10.0.0.1:21000", "wait 2s", "wait 2s"}},
			{"InitialWait passed: started without db's list", initialWait, func(s *planSim) {}, []string{
				"start up_api[8]{s1=10.0.0.1:21000} up_db[8]{} missing up_db",
			}},
		}},
		{"start waits for verification up to InitialWait, then starts with the proven ones", nil, []step{
			{"both lists, one endpoint's verification does not complete", time.Second, func(s *planSim) {
				s.inflight["10.0.0.2:21000"] = true
				s.endpoints("up_api", ep(1, 21000), ep(2, 21000))
				s.endpoints("up_db", ep(5, 21000))
			}, []string{
				"verify up_api: 10.0.0.1:21000 10.0.0.2:21000",
				"verify up_db: 10.0.0.5:21000",
				"wait 2s",
				"wait 2s",
			}},
			{"InitialWait passed", initialWait, func(s *planSim) {}, []string{
				"start up_api[8]{s1=10.0.0.1:21000} up_db[8]{s1=10.0.0.5:21000} unverified",
			}},
		}},
		{"a registration change is one reload with its reason", started, []step{
			{"an upstream added", 10 * time.Second, func(s *planSim) {
				s.d.sidecar = sidecar(api, db, up("cache", 9193))
				s.endpoints("up_cache", ep(9, 21000))
			}, []string{
				"verify up_cache: 10.0.0.9:21000",
				"reload (registration: upstream up_cache added) up_api[8]{s1=10.0.0.1:21000 s2=10.0.0.2:21000} up_cache[8]{} up_db[8]{s1=10.0.0.5:21000}",
				// The new upstream's endpoint joins once proven.
				"batch: set server up_cache/s1 addr 10.0.0.9 port 21000; set server up_cache/s1 state ready",
			}},
			{"nothing changed: nothing planned", 11 * time.Second, func(s *planSim) {}, nil},
		}},
		{"a new chain target waits for its endpoints before the reload", started, []step{
			{"the chain adds a target: no list yet", 10 * time.Second, func(s *planSim) {
				s.d.sidecar, s.d.chainSince = sidecar(api, db, target), s.now
			}, []string{"wait 3s"}},
			{"its list: verified, then the reload places it", 10500 * time.Millisecond, func(s *planSim) {
				s.endpoints(target.Name, ep(7, 21000))
			}, []string{
				"verify up_api:api:v2:dc1: 10.0.0.7:21000",
				"wait 2.5s",
				"reload (registration: discovery chain target up_api:api:v2:dc1 added) up_api[8]{s1=10.0.0.1:21000 s2=10.0.0.2:21000} up_api:api:v2:dc1[8]{s1=10.0.0.7:21000} up_db[8]{s1=10.0.0.5:21000}",
			}},
			{"nothing changed: nothing planned", 11 * time.Second, func(s *planSim) {}, nil},
		}},
		{"a new chain target without endpoints: the reload waits InitialWait at most", started, []step{
			{"the chain adds a target", 10 * time.Second, func(s *planSim) {
				s.d.sidecar, s.d.chainSince = sidecar(api, db, target), s.now
			}, []string{"wait 3s"}},
			{"still no list: waiting", 12 * time.Second, func(s *planSim) {}, []string{"wait 1s"}},
			{"InitialWait passed: reloaded without it", 13 * time.Second, func(s *planSim) {}, []string{
				"reload (registration: discovery chain target up_api:api:v2:dc1 added) up_api[8]{s1=10.0.0.1:21000 s2=10.0.0.2:21000} up_api:api:v2:dc1[8]{} up_db[8]{s1=10.0.0.5:21000}",
			}},
		}},
		{"new CA roots are a reload", started, []step{
			{"roots change", 10 * time.Second, func(s *planSim) { s.d.roots = roots("root-1\nroot-2") }, []string{
				"reload (CA roots changed) up_api[8]{s1=10.0.0.1:21000 s2=10.0.0.2:21000} up_db[8]{s1=10.0.0.5:21000}",
			}},
		}},
		{"a failed reload backs off 5 s doubling to 1 min; runtime batches go on; a success resets", started, []step{
			{"reload fails: the plan runs again at once, and waits 5 s", 10 * time.Second, func(s *planSim) {
				s.failReload = true
				s.d.roots = roots("root-2")
			}, []string{"reload (CA roots changed) up_api[8]{s1=10.0.0.1:21000 s2=10.0.0.2:21000} up_db[8]{s1=10.0.0.5:21000}", "wait 5s"}},
			{"within the backoff, endpoint churn is a runtime batch", 12 * time.Second, func(s *planSim) {
				s.endpoints("up_api", ep(1, 21000), ep(2, 21000), ep(3, 21000))
			}, []string{
				"verify up_api: 10.0.0.1:21000 10.0.0.2:21000 10.0.0.3:21000",
				"wait 3s",
				"batch: set server up_api/s3 addr 10.0.0.3 port 21000; set server up_api/s3 state ready",
				"wait 3s",
			}},
			{"fails again: 10 s", 15 * time.Second, func(s *planSim) {}, []string{
				"reload (CA roots changed) up_api[8]{s1=10.0.0.1:21000 s2=10.0.0.2:21000 s3=10.0.0.3:21000} up_db[8]{s1=10.0.0.5:21000}", "wait 10s"}},
			{"20 s", 25 * time.Second, func(s *planSim) {}, []string{
				"reload (CA roots changed) up_api[8]{s1=10.0.0.1:21000 s2=10.0.0.2:21000 s3=10.0.0.3:21000} up_db[8]{s1=10.0.0.5:21000}", "wait 20s"}},
			{"40 s", 45 * time.Second, func(s *planSim) {}, []string{
				"reload (CA roots changed) up_api[8]{s1=10.0.0.1:21000 s2=10.0.0.2:21000 s3=10.0.0.3:21000} up_db[8]{s1=10.0.0.5:21000}", "wait 40s"}},
			{"1 min, the most", 85 * time.Second, func(s *planSim) {}, []string{
				"reload (CA roots changed) up_api[8]{s1=10.0.0.1:21000 s2=10.0.0.2:21000 s3=10.0.0.3:21000} up_db[8]{s1=10.0.0.5:21000}", "wait 1m0s"}},
			{"and stays 1 min", 145 * time.Second, func(s *planSim) {}, []string{
				"reload (CA roots changed) up_api[8]{s1=10.0.0.1:21000 s2=10.0.0.2:21000 s3=10.0.0.3:21000} up_db[8]{s1=10.0.0.5:21000}", "wait 1m0s"}},
			{"succeeds", 205 * time.Second, func(s *planSim) { s.failReload = false }, []string{
				"reload (CA roots changed) up_api[8]{s1=10.0.0.1:21000 s2=10.0.0.2:21000 s3=10.0.0.3:21000} up_db[8]{s1=10.0.0.5:21000}"}},
			{"the next reload is not held back", 206 * time.Second, func(s *planSim) { s.d.roots = roots("root-3") }, []string{
				"reload (CA roots changed) up_api[8]{s1=10.0.0.1:21000 s2=10.0.0.2:21000 s3=10.0.0.3:21000} up_db[8]{s1=10.0.0.5:21000}"}},
			{"a failure after a success backs off 5 s again", 207 * time.Second, func(s *planSim) {
				s.failReload = true
				s.d.roots = roots("root-4")
			}, []string{"reload (CA roots changed) up_api[8]{s1=10.0.0.1:21000 s2=10.0.0.2:21000 s3=10.0.0.3:21000} up_db[8]{s1=10.0.0.5:21000}", "wait 5s"}},
		}},
		{"a leaf within LeafSwapInterval of the last swap waits, unless the served one expires first", started, []step{
			{"a new leaf: swapped", 10 * time.Second, func(s *planSim) { s.d.leaf = leaf("02", 72*time.Hour) }, []string{"rotate leaf 02"}},
			{"another 1 s later waits out the interval", 11 * time.Second, func(s *planSim) { s.d.leaf = leaf("03", 72*time.Hour) }, []string{"wait 4s"}},
			{"the interval passed: the newest is swapped", 15 * time.Second, func(s *planSim) { s.d.leaf = leaf("04", 72*time.Hour) }, []string{"rotate leaf 04"}},
			{"the served leaf expires within the interval: swapped at once", 16 * time.Second, func(s *planSim) {
				s.ap.leaf = leaf("04", 18*time.Second)
				s.d.leaf = leaf("05", 72*time.Hour)
			}, []string{"rotate leaf 05"}},
			{"a swap that breaks the listener: the plan runs again at once and reloads", 30 * time.Second, func(s *planSim) {
				s.breakBind = true
				s.d.leaf = leaf("06", 72*time.Hour)
			}, []string{"rotate leaf 06", "reload (public listener lost client certificate verification after the leaf swap) up_api[8]{s1=10.0.0.1:21000 s2=10.0.0.2:21000} up_db[8]{s1=10.0.0.5:21000}"}},
		}},
		{"endpoint changes are a runtime batch of the dirty upstreams only", started, []step{
			{"api gains one", 10 * time.Second, func(s *planSim) {
				s.endpoints("up_api", ep(1, 21000), ep(2, 21000), ep(3, 21000))
			}, []string{
				"verify up_api: 10.0.0.1:21000 10.0.0.2:21000 10.0.0.3:21000",
				"batch: set server up_api/s3 addr 10.0.0.3 port 21000; set server up_api/s3 state ready",
			}},
			{"db loses its one, api an endpoint: both in one batch", 11 * time.Second, func(s *planSim) {
				s.endpoints("up_api", ep(2, 21000), ep(3, 21000))
				s.endpoints("up_db")
			}, []string{
				"verify up_api: 10.0.0.2:21000 10.0.0.3:21000",
				"verify up_db:",
				"batch: set server up_api/s1 state maint; set server up_db/s1 state maint",
			}},
			{"an unchanged list settles without a command", 12 * time.Second, func(s *planSim) {
				s.endpoints("up_api", ep(2, 21000), ep(3, 21000))
			}, []string{"settle up_api"}},
			{"a new endpoint being verified does not hold back one that leaves while another is proven", 13 * time.Second, func(s *planSim) {
				s.inflight["10.0.0.4:21000"] = true
				s.endpoints("up_api", ep(3, 21000), ep(4, 21000))
			}, []string{
				"verify up_api: 10.0.0.3:21000 10.0.0.4:21000",
				"batch: set server up_api/s2 state maint; up_api stays dirty",
			}},
			{"the last proven endpoint leaves while its successors are verified: it keeps its slot meanwhile", 13*time.Second + maxHold/2, func(s *planSim) {
				s.inflight["10.0.0.5:21000"] = true
				s.endpoints("up_api", ep(4, 21000), ep(5, 21000))
			}, []string{"verify up_api: 10.0.0.4:21000 10.0.0.5:21000"}},
			{"but not past maxHold from the oldest unapplied change", 13*time.Second + maxHold, func(s *planSim) {}, []string{
				"batch: set server up_api/s3 state maint; up_api stays dirty",
			}},
			{"an intentions change publishes its generation", 14 * time.Second, func(s *planSim) { s.authzGen = 7 }, []string{
				"publish authz generation 7",
			}},
		}},
		{"a standby endpoint is proven ahead, and placed at once when its checks pass", started, []step{
			{"endpoint 3 is listed, its checks failing: proven, not placed", 10 * time.Second, func(s *planSim) {
				s.standby("up_api", ep(3, 21000))
			}, []string{
				"verify up_api: 10.0.0.1:21000 10.0.0.2:21000 standby 10.0.0.3:21000",
				"settle up_api",
			}},
			{"its checks pass: placed by the first plan, though a new proof would not complete", 11 * time.Second, func(s *planSim) {
				s.inflight["10.0.0.3:21000"] = true
				s.endpoints("up_api", ep(1, 21000), ep(2, 21000), ep(3, 21000))
				s.standby("up_api")
			}, []string{
				"verify up_api: 10.0.0.1:21000 10.0.0.2:21000 10.0.0.3:21000",
				"batch: set server up_api/s3 addr 10.0.0.3 port 21000; set server up_api/s3 state ready",
			}},
			{"they fail again: out of service, still proven", 12 * time.Second, func(s *planSim) {
				s.endpoints("up_api", ep(1, 21000), ep(2, 21000))
				s.standby("up_api", ep(3, 21000))
			}, []string{
				"verify up_api: 10.0.0.1:21000 10.0.0.2:21000 standby 10.0.0.3:21000",
				"batch: set server up_api/s3 state maint",
			}},
			{"and pass: back at once, in the slot that kept its address", 13 * time.Second, func(s *planSim) {
				s.endpoints("up_api", ep(1, 21000), ep(2, 21000), ep(3, 21000))
				s.standby("up_api")
			}, []string{
				"verify up_api: 10.0.0.1:21000 10.0.0.2:21000 10.0.0.3:21000",
				"batch: set server up_api/s3 state ready",
			}},
		}},
		{"start does not wait for standby endpoints' proofs", nil, []step{
			{"both lists; api's standby endpoint is not proven", time.Second, func(s *planSim) {
				s.inflight["10.0.0.9:21000"] = true
				s.d.standbyAnswer("up_api", standbyList{eps: []slots.Endpoint{ep(9, 21000)}, at: s.now})
				s.endpoints("up_api", ep(1, 21000))
				s.endpoints("up_db", ep(5, 21000))
			}, []string{
				"verify up_api: 10.0.0.1:21000 standby 10.0.0.9:21000",
				"verify up_db: 10.0.0.5:21000",
				"wait 2s",
				"start up_api[8]{s1=10.0.0.1:21000} up_db[8]{s1=10.0.0.5:21000}",
			}},
		}},
		{"a running master not yet adopted: adopt before anything else", nil, []step{
			{"found alive, the roots changed meanwhile", 0, func(s *planSim) {
				runningMaster(s, *sidecar(api, db), leaf1, "root-1", map[string][]slots.Endpoint{"up_api": {ep(1, 21000), ep(2, 21000)}, "up_db": {ep(5, 21000)}})
				s.endpoints("up_api", ep(1, 21000), ep(2, 21000))
				s.endpoints("up_db", ep(5, 21000))
				s.d.roots = roots("root-2")
			}, []string{"adopt", "reload (CA roots changed) up_api[8]{s1=10.0.0.1:21000 s2=10.0.0.2:21000} up_db[8]{s1=10.0.0.5:21000}"}},
		}},
		{"adopted state equal to the desired one: nothing for HAProxy", nil, []step{
			{"adopted", 0, func(s *planSim) {
				runningMaster(s, *sidecar(api, db), leaf1, "root-1", map[string][]slots.Endpoint{"up_api": {ep(1, 21000), ep(2, 21000)}, "up_db": {ep(5, 21000)}})
				s.endpoints("up_api", ep(1, 21000), ep(2, 21000))
				s.endpoints("up_db", ep(5, 21000))
			}, []string{"adopt", "settle up_api up_db"}},
		}},
		{"adopted by a process with no verification results: the served endpoints keep their slots while proven again", nil, []step{
			{"adopted, endpoint 2 unreachable for verification", 0, func(s *planSim) {
				runningMaster(s, *sidecar(api, db), leaf1, "root-1", map[string][]slots.Endpoint{"up_api": {ep(1, 21000), ep(2, 21000)}, "up_db": {ep(5, 21000)}})
				unproven(s)
				s.inflight["10.0.0.2:21000"] = true
				s.endpoints("up_api", ep(1, 21000), ep(2, 21000))
				s.endpoints("up_db", ep(5, 21000))
			}, []string{
				"adopt",
				"verify up_api: 10.0.0.1:21000 10.0.0.2:21000",
				"verify up_db: 10.0.0.5:21000",
				// Proven by the process before: nothing changes while
				// they are proven again (2 keeps its slot meanwhile).
				"settle up_api up_db",
			}},
			{"2 proves another identity: parked", time.Second, func(s *planSim) {
				s.result("up_api", checkKey{"spiffe://td.consul/ns/default/dc/dc1/svc/api", netip.MustParseAddrPort("10.0.0.2:21000")}, false)
			}, []string{"batch: set server up_api/s2 state maint"}},
		}},
		{"adopted state with another upstream set: exactly one reload", nil, []step{
			{"adopted with api only, db added meanwhile", 0, func(s *planSim) {
				runningMaster(s, *sidecar(api), leaf1, "root-1", map[string][]slots.Endpoint{"up_api": {ep(1, 21000), ep(2, 21000)}})
				s.endpoints("up_api", ep(1, 21000), ep(2, 21000))
				s.endpoints("up_db", ep(5, 21000))
			}, []string{
				"adopt",
				"verify up_db: 10.0.0.5:21000",
				"reload (registration: upstream up_db added) up_api[8]{s1=10.0.0.1:21000 s2=10.0.0.2:21000} up_db[8]{}",
				"batch: set server up_db/s1 addr 10.0.0.5 port 21000; set server up_db/s1 state ready",
			}},
			{"then nothing", time.Second, func(s *planSim) {}, nil},
		}},
		{"adopted haproxy runs another configuration (its id differs): exactly one reload, with that reason", nil, []step{
			{"adopted", 0, func(s *planSim) {
				runningMaster(s, *sidecar(api, db), leaf1, "root-1", map[string][]slots.Endpoint{"up_api": {ep(1, 21000)}, "up_db": {ep(5, 21000)}})
				s.readBack.foreign = "adopted haproxy runs another configuration (a, desired b)"
				s.endpoints("up_api", ep(1, 21000))
				s.endpoints("up_db", ep(5, 21000))
			}, []string{
				"adopt",
				"reload (adopted haproxy runs another configuration (a, desired b)) up_api[8]{s1=10.0.0.1:21000} up_db[8]{s1=10.0.0.5:21000}",
			}},
			{"then nothing", time.Second, func(s *planSim) {}, nil},
		}},
		{"adopted haproxy holds a later authz generation: never published backwards", nil, []step{
			{"adopted at generation 9, this agent at 1", 0, func(s *planSim) {
				runningMaster(s, *sidecar(api, db), leaf1, "root-1", map[string][]slots.Endpoint{"up_api": {ep(1, 21000)}, "up_db": {ep(5, 21000)}})
				s.readBack.authzGen = 9
				s.authzGen = 1
				s.endpoints("up_api", ep(1, 21000))
				s.endpoints("up_db", ep(5, 21000))
			}, []string{"adopt", "settle up_api up_db"}},
			{"the agent raised above it", time.Second, func(s *planSim) { s.authzGen = 10 }, []string{"publish authz generation 10"}},
		}},
	}
	for _, sc := range scenarios {
		t.Run(sc.name, func(t *testing.T) {
			s := newPlanSim(sidecar(api, db), leaf1, roots("root-1"))
			if sc.setup != nil {
				sc.setup(s)
			}
			for _, st := range sc.steps {
				s.now = t0.Add(st.at)
				st.change(s)
				got := s.step()
				if diff := cmp.Diff(st.want, got); diff != "" {
					t.Errorf("%s: actions (-want +got):\n%s", st.name, diff)
				}
			}
		})
	}
}

// runningMaster is a master this process did not start, alive, whose
// read-back state serves sc with these endpoints, all of them proven (as
// if this process had proven them too; see unproven).
func runningMaster(s *planSim, sc Sidecar, leaf *certs.Bundle, rootsPEM string, eps map[string][]slots.Endpoint) {
	s.masterAlive = true
	s.readBack = applied{known: true, sidecar: sc, leaf: leaf, rootsPEM: rootsPEM, tables: map[string]slots.Table{}}
	for _, u := range sc.Upstreams {
		_, t, _ := slots.Plan(slots.New(u.Name, "s", 8), eps[u.Name])
		s.readBack.tables[u.Name] = t
		want := "spiffe://td.consul/ns/default/dc/dc1/svc/" + u.Destination
		list := map[checkKey]struct{}{}
		for _, e := range eps[u.Name] {
			k := checkKey{want, netip.MustParseAddrPort(e.Key())}
			list[k] = struct{}{}
			s.proofs.checks[k] = proof{known: true, good: true}
		}
		s.proofs.lists[u.Name] = list
	}
}

// testLeaf is a leaf of the web service.
// unproven forgets every verification result: a new process adopting a
// master has none.
func unproven(s *planSim) {
	clear(s.proofs.checks)
	clear(s.proofs.lists)
}

func testLeaf(t *testing.T) *certs.Bundle {
	t.Helper()
	return &certs.Bundle{PEM: "leaf", Serial: "00", NotAfter: t0.Add(72 * time.Hour), SPIFFE: "spiffe://td.consul/ns/default/dc/dc1/svc/web"}
}

// TestWithoutChains: a registration that differs only in its discovery
// chains (a chain's fingerprint, a target added) reloads with the "chain"
// cause; any other difference is the registration's.
func TestWithoutChains(t *testing.T) {
	base := Sidecar{ProxyID: "web-sidecar-proxy", Service: "web", Upstreams: []Upstream{
		{Name: "up_api", Destination: "api", BindAddr: "127.0.0.1", BindPort: 9191, Protocol: "http", Chain: "c1"},
		{Name: "up_api:api:v1:dc1", Destination: "api", Target: "api:v1:dc1", Parent: "up_api"},
	}}
	with := func(f func(*Sidecar)) Sidecar {
		s := base
		s.Upstreams = slices.Clone(base.Upstreams)
		f(&s)
		return s
	}
	tests := []struct {
		name      string
		s         Sidecar
		chainOnly bool
	}{
		{"chain fingerprint", with(func(s *Sidecar) { s.Upstreams[0].Chain = "c2" }), true},
		{"target added", with(func(s *Sidecar) {
			s.Upstreams = append(s.Upstreams, Upstream{Name: "up_api:api:v2:dc1", Destination: "api", Target: "api:v2:dc1", Parent: "up_api"})
		}), true},
		{"target removed", with(func(s *Sidecar) { s.Upstreams = s.Upstreams[:1] }), true},
		{"bind port", with(func(s *Sidecar) { s.Upstreams[0].BindPort = 9292 }), false},
		{"bind port and chain", with(func(s *Sidecar) { s.Upstreams[0].BindPort, s.Upstreams[0].Chain = 9292, "c2" }), false},
		{"upstream added", with(func(s *Sidecar) {
			s.Upstreams = append(s.Upstreams, Upstream{Name: "up_db", Destination: "db", BindAddr: "127.0.0.1", BindPort: 9393})
		}), false},
	}
	for _, tt := range tests {
		if base.Equal(tt.s) {
			t.Fatalf("%s: no difference", tt.name)
		}
		if got := base.withoutChains().Equal(tt.s.withoutChains()); got != tt.chainOnly {
			t.Errorf("%s: chains only %v, want %v", tt.name, got, tt.chainOnly)
		}
	}
}

// TestRunningChainMaps: chain map entries are set at run time only for
// routed upstreams whose chain shape HAProxy runs.
func TestRunningChainMaps(t *testing.T) {
	routed := func(name, shape string) Upstream { u := up(name, 9000); u.Chain = shape; return u }
	maps := map[string]map[string]string{"up_a": {"r0": "1"}, "up_b": {"r0": "2"}, "up_c": {"r0": "3"}}
	tests := []struct {
		name    string
		applied []Upstream
		desired []Upstream
		foreign string
		want    []string
	}{
		{"same shapes", []Upstream{routed("a", "s1"), routed("b", "s1")}, []Upstream{routed("a", "s1"), routed("b", "s1")}, "", []string{"up_a", "up_b"}},
		{"a shape changed: that one waits for its reload", []Upstream{routed("a", "s1"), routed("b", "s1")}, []Upstream{routed("a", "s2"), routed("b", "s1")}, "", []string{"up_b"}},
		{"a new routed upstream waits", []Upstream{routed("a", "s1")}, []Upstream{routed("a", "s1"), routed("c", "s1")}, "", []string{"up_a"}},
		{"plain before, routed now: waits", []Upstream{up("a", 9000)}, []Upstream{routed("a", "s1")}, "", nil},
		{"an adopted foreign configuration: none", []Upstream{routed("a", "s1")}, []Upstream{routed("a", "s1")}, "another configuration", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := planInput{desired: &desired{sidecar: sidecar(tt.desired...)},
				applied: &applied{sidecar: *sidecar(tt.applied...), foreign: tt.foreign}, chainMaps: maps}
			var got []string
			for n := range in.runningChainMaps() {
				got = append(got, n)
			}
			slices.Sort(got)
			if d := cmp.Diff(tt.want, got); d != "" {
				t.Errorf("(-want +got):\n%s", d)
			}
		})
	}
}
