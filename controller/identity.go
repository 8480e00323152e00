package controller

import (
	"context"
	"errors"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/slots"
	"github.com/haproxy-connect/haproxy-connect/verify"
)

// Upstream identity, proven before traffic.
//
// HAProxy's "verify required" proves only that an upstream server holds
// some leaf of the mesh: Consul leaves carry only a SPIFFE URI SAN, and
// HAProxy 2.6 cannot match one at the handshake. So an endpoint listed for
// "web" but served by another workload (an address reused in a churning
// cluster, a compromised node) would get the full request and its answer
// would reach the caller. The controller therefore places an endpoint in a
// slot ("set server ... state ready", or "add server" then ready) only once
// its own mTLS handshake to it (package verify) has shown the destination's
// SPIFFE ID, spiffe://<trust domain>/ns/<ns>/dc/<dc>/svc/<destination>.
//
// Verification never holds up a batch: the plan places only endpoints whose
// result is known and good; the others are verified concurrently (at most
// verifyWorkers at once) and each result comes back to the loop as an
// event that re-plans the upstreams listing the endpoint. An upstream with
// verifications in flight stays dirty, and an endpoint's propagation
// sample (propagation.go) counts its verification's time.
//
// Proofs are made ahead too: an instance Consul lists while its checks
// fail (desired.standby, standby.go; a new instance is critical until
// its first check runs) is proven while it waits, within standbyWindow of
// turning standby and behind every proof of a listed endpoint, so that
// the check passing places it without a handshake in between. Its result
// is what places it then, if it is not due; a due one of a standby-only
// check is forgotten.
//
// A result is kept per (expected identity, address:port) while some
// upstream lists it, as an endpoint or standby, and is proven again:
// every reverifyEvery (jittered);
// when HAProxy counts connection or handshake errors, or denied responses,
// for a server at that address ("show stat" econ, ssl_failed_handshake and
// dresp, polled every statPoll); and when the endpoint leaves every list and comes back (its
// result is dropped when it leaves). An endpoint that shows another
// identity is parked ("state maint") and logged with the instance and the
// identity it showed, and counted.
//
// The residual window: between two proofs, an address whose holder changes
// keeps its slot until the next trigger. The second line, in HAProxy
// (serverID, rendered by bootstrap: the server certificate's URI SAN
// matched on every response), keeps the new holder's answers from reaching
// the caller; the request bytes of that window still reach it. SECURITY.md
// has the table.

const (
	// verifyWorkers bounds concurrent verifications: a burst of new
	// endpoints costs at most this many handshakes in flight.
	verifyWorkers = 16
	// reverifyEvery is how long a proof holds before it is made again.
	reverifyEvery = 5 * time.Minute
	// identitySweep is how often due proofs are renewed and results for
	// endpoints no upstream lists any more are dropped.
	identitySweep = 10 * time.Second
	// statPoll is how often HAProxy's per-server error counters are read.
	// It bounds the residual window after an address changes hands: until
	// the next read, that server's answers are refused (502) by the second
	// line. One "show stat" of every server costs HAProxy and the sidecar
	// about 400 bytes of CSV per server.
	statPoll = time.Second
	// standbyWindow is how long after an instance turns standby (listed,
	// its checks failing) its identity is proven ahead, retried with
	// backoff while it does not answer: a new instance is critical until
	// its first check runs, which Consul staggers over the check's
	// interval (10 s for a sidecar's), and an orchestrator's readiness
	// can take longer. An instance that stays standby longer is not
	// probed again; a proof of it that falls due is forgotten
	// (sweepIdentities), so that it is proven again before it is placed.
	standbyWindow = 2 * time.Minute
	// standbyRoom is how many verification workers may run when a proof
	// ahead starts: past it, the proof waits in a queue of its own, taken
	// only when the listed endpoints' queue is empty and fewer workers
	// run, so that the proofs of listed endpoints always find room.
	standbyRoom = verifyWorkers / 2
	// maxHold bounds how long endpoints that left the list keep their
	// slots while none of the listed ones is proven yet (holdLeaving):
	// slow proofs must not keep gone endpoints in service.
	maxHold = time.Second
)

// instance is what the sidecar knows of an endpoint besides its address.
type instance struct {
	id string // Consul service ID, for logs
	// service and dc, for a prepared query's endpoints: the service the
	// instance serves and the datacenter that answered. Empty for a
	// service upstream: the upstream's destination is the service.
	service, dc string
}

// checkKey names one identity check: the identity an endpoint must
// present, and the endpoint.
type checkKey struct {
	want string
	addr netip.AddrPort
}

// serverRef names a server of a backend.
type serverRef struct{ backend, server string }

// idCheck is the verification state of one (expected identity, address).
type idCheck struct {
	want, addr string
	alpn       []string
	users      upstreamSet // upstreams listing it
	// standby are the upstreams listing it as standby (desired.standby);
	// standbySince is when that set last became non-empty.
	standby      upstreamSet
	standbySince time.Time
	instance     string // Consul service ID, for logs
	inflight     bool
	// unlisted is set by the loop while a queued proof waits and no
	// upstream lists the endpoint: its worker drops it unproven.
	unlisted atomic.Bool
	// ahead is set while its proof waits in the ahead queue.
	ahead    atomic.Bool
	known    bool   // a verification completed
	good     bool   // the last conclusive one proved want
	shown    string // the identity presented at the last one
	serial   string // and the serial of that certificate
	at, due  time.Time
	failures int
}

// identities is the controller's record of proofs. Owned by the loop.
type identities struct {
	verify   func(ctx context.Context, cfg verify.Config, addr, want string) (verify.Result, error)
	cfg      verify.Config
	cfgFrom  [2]string // leaf and roots PEM cfg was built from
	checks   map[checkKey]*idCheck
	listedBy map[string]map[checkKey]struct{} // upstream -> check keys it lists
	// standbyBy: upstream -> check keys it lists as standby
	standbyBy map[string]map[checkKey]struct{}
	errs      map[serverRef]uint64 // econ+ssl_failed_handshake+dresp last read
	mu        sync.Mutex           // guards running and the queues, shared with the workers
	running   int                  // workers running
	queue     []queuedVerify       // verifications waiting for one of verifyWorkers
	ahead     []queuedVerify       // proofs ahead waiting for fewer than standbyRoom to run
	wg        sync.WaitGroup       // workers running (tests wait on it)
}

func newIdentities() *identities {
	return &identities{verify: verify.Endpoint, checks: map[checkKey]*idCheck{}, listedBy: map[string]map[checkKey]struct{}{},
		standbyBy: map[string]map[checkKey]struct{}{}, errs: map[serverRef]uint64{}}
}

// verifyConfig is the verification's TLS material for the current leaf and
// roots, rebuilt when either changes.
func (c *Controller) verifyConfig() (verify.Config, error) {
	id, d := c.ident, &c.desired
	if id.cfgFrom == [2]string{d.leaf.PEM, d.roots.PEM} {
		return id.cfg, nil
	}
	cfg, err := verify.NewConfig(d.leaf.PEM, d.roots.PEM)
	if err != nil {
		return verify.Config{}, err
	}
	id.cfg, id.cfgFrom = cfg, [2]string{d.leaf.PEM, d.roots.PEM}
	return cfg, nil
}

// expectedID is the SPIFFE ID an endpoint of u must present (wantID) for
// the desired leaf and roots.
func (c *Controller) expectedID(u Upstream, in instance) (string, error) {
	return wantID(c.desired.leaf, c.desired.roots, u, in)
}

// wantID is the SPIFFE ID an endpoint of u must present. The trust domain
// is the CA roots' (Consul's TrustDomain); datacenter, namespace and
// partition are the upstream's, else this sidecar's own (from its leaf),
// as Consul resolves an upstream without them.
func wantID(leaf *certs.Bundle, roots *certs.Roots, u Upstream, in instance) (string, error) {
	local, err := certs.ParseSPIFFE(leaf.SPIFFE)
	if err != nil {
		return "", err
	}
	td := roots.TrustDomain
	if td == "" {
		td = local.TrustDomain
	}
	service, dc, ns, ap := u.Destination, u.Datacenter, u.Namespace, u.Partition
	if in.service != "" {
		service, dc = in.service, in.dc
	}
	if dc == "" {
		dc = local.Datacenter
	}
	if ns == "" {
		ns = local.Namespace
	}
	if ap == "" {
		ap = local.Partition
	}
	return verify.ServiceID(td, ap, ns, dc, service), nil
}

// serverID is the identity HAProxy itself checks on the responses of u's
// servers (bootstrap.Upstream.ServerID): the second line, behind the
// verification. None for a prepared query, whose instances may serve
// several services, nor for an ID that the configuration cannot carry
// (its endpoints never verify then either).
func (c *Controller) serverID(u Upstream) string {
	if u.Type == string(api.UpstreamDestTypePreparedQuery) {
		return ""
	}
	id, err := c.expectedID(u, instance{})
	if err == nil {
		err = bootstrap.CheckServerID(id)
	}
	if err != nil {
		c.log.Error("upstream identity not checked by HAProxy", zap.String("upstream", u.Name), zap.Error(err))
		return ""
	}
	return id
}

// proof implements proofs for the plan.
func (id *identities) proof(k checkKey, now time.Time) (proof, bool) {
	ch := id.checks[k]
	if ch == nil {
		return proof{}, false
	}
	return proof{known: ch.known, good: ch.good, instance: ch.instance, due: ch.wanted(now)}, true
}

// listed implements proofs for the plan.
func (id *identities) listed(upstream string) map[checkKey]struct{} { return id.listedBy[upstream] }

// standby implements proofs for the plan.
func (id *identities) standby(upstream string) map[checkKey]struct{} { return id.standbyBy[upstream] }

// standbyOnly says no upstream lists ch but as standby: its proof is one
// made ahead.
func (ch *idCheck) standbyOnly() bool { return len(ch.users) == 0 && len(ch.standby) > 0 }

// listed says some upstream lists ch, as an endpoint or standby.
func (ch *idCheck) listed() bool { return len(ch.users) > 0 || len(ch.standby) > 0 }

// wanted says ch is to be proven now: none is in flight, and it has no
// result yet or its result is due; a standby-only check only within
// standbyWindow of turning standby.
func (ch *idCheck) wanted(now time.Time) bool {
	if ch.inflight || (ch.known && now.Before(ch.due)) {
		return false
	}
	return !ch.standbyOnly() || now.Sub(ch.standbySince) < standbyWindow
}

// inherit records v's checks as proven and due (see inheritedChecks), but
// those it already has.
func (id *identities) inherit(v verifyAction, now time.Time) {
	for _, r := range v.checks {
		if id.checks[r.key] == nil {
			id.checks[r.key] = &idCheck{want: r.key.want, addr: r.key.addr.String(), alpn: v.alpn,
				instance: r.instance, known: true, good: true, due: now}
		}
	}
}

// track records the endpoints v lists for its upstream, and its standby
// ones, starts the verifications that are missing or due, and drops the
// results no upstream lists any more (so an endpoint that comes back is
// proven again).
func (c *Controller) track(ctx context.Context, v verifyAction) {
	if v.err != nil {
		c.log.Error("upstream identity unknown; endpoints not placed", zap.String("upstream", v.upstream), zap.Error(v.err))
		return
	}
	id := c.ident
	now := c.now()
	listed := id.record(v.upstream, v.checks, v.alpn, false, now)
	standby := id.record(v.upstream, v.standby, v.alpn, true, now)
	id.forget(v.upstream, id.listedBy[v.upstream], listed, false)
	id.forget(v.upstream, id.standbyBy[v.upstream], standby, true)
	id.listedBy[v.upstream] = listed
	if len(standby) > 0 {
		id.standbyBy[v.upstream] = standby
	} else {
		delete(id.standbyBy, v.upstream)
	}
	for _, refs := range [][]checkRef{v.checks, v.standby} {
		for _, r := range refs {
			if ch := id.checks[r.key]; ch.wanted(now) {
				c.startVerify(ctx, r.key, ch)
			}
		}
	}
	for _, r := range v.checks {
		if ch := id.checks[r.key]; ch.ahead.Load() {
			c.promote(ctx, ch)
		}
	}
}

// record adds upstream to the users (or, with standby, the standby
// upstreams) of each check refs names, creating the missing ones, and
// returns the set of their keys.
func (id *identities) record(upstream string, refs []checkRef, alpn []string, standby bool, now time.Time) map[checkKey]struct{} {
	keys := make(map[checkKey]struct{}, len(refs))
	for _, r := range refs {
		keys[r.key] = struct{}{}
		ch := id.checks[r.key]
		if ch == nil {
			ch = &idCheck{want: r.key.want, addr: r.key.addr.String(), alpn: alpn}
			id.checks[r.key] = ch
		}
		if standby {
			if len(ch.standby) == 0 {
				ch.standbySince = now
			}
			ch.standby.add(upstream)
		} else {
			ch.users.add(upstream)
		}
		ch.unlisted.Store(false)
		if r.instance != "" {
			ch.instance = r.instance
		}
	}
	return keys
}

// forget removes upstream from the users (or standby upstreams) of the
// checks in prev that now lacks, and unlists those no upstream lists any
// more.
func (id *identities) forget(upstream string, prev, now map[checkKey]struct{}, standby bool) {
	for k := range prev {
		if _, still := now[k]; still {
			continue
		}
		ch := id.checks[k]
		if ch == nil {
			continue
		}
		if standby {
			ch.standby.remove(upstream)
		} else {
			ch.users.remove(upstream)
		}
		if !ch.listed() {
			id.unlist(k, ch)
		}
	}
}

// holdLeaving is the endpoints table serves that have left listed
// (Consul's list), to keep in service. The plan calls it only while none
// of the upstream's listed endpoints has proven its identity and some are
// still being verified: a list that replaces every endpoint at once then does not
// empty the backend meanwhile (make before break). While any listed
// endpoint is proven, a leaving endpoint leaves at once: its removal does
// not wait for another endpoint's proof, since an instance leaves the list
// because it is going away. The hold is bounded: it ends at the first plan
// after maxHold from the oldest unapplied change, which the next
// verification result brings (one is in flight or queued while any is
// pending, and each ends within verify.DefaultTimeout).
func holdLeaving(table slots.Table, listed []slots.Endpoint) []slots.Endpoint {
	var held []slots.Endpoint
	want := make(map[netip.AddrPort]struct{}, len(listed))
	for _, e := range listed {
		if k, valid := endpointKey(e.Addr, e.Port); valid {
			want[k] = struct{}{}
		}
	}
	for _, s := range table.Slots {
		if !s.Used {
			continue
		}
		if k, valid := endpointKey(s.Addr, s.Port); valid {
			if _, still := want[k]; !still {
				held = append(held, slots.Endpoint{Addr: s.Addr, Port: s.Port, Weight: s.Weight})
			}
		}
	}
	return held
}

func alpnList(protocol string) []string {
	if a := bootstrap.UpstreamALPN(protocol); a != "" {
		return strings.Split(a, ",")
	}
	return nil
}

// startVerify runs one verification of ch in the background, or queues it
// while verifyWorkers run (a proof ahead of a standby-only check runs only
// while fewer than standbyRoom do, and waits in the ahead queue
// otherwise); its result comes back to the loop through c.events. Queued,
// not a goroutine each waiting its turn: a sidecar that
// starts with 10 000 endpoints would hold 10 000 parked goroutines and
// their stacks until the proofs are through. A worker takes the next
// queued proof itself when it is done with one, so the proofs' pace does
// not depend on how soon the loop reads their results.
func (c *Controller) startVerify(ctx context.Context, k checkKey, ch *idCheck) {
	cfg, err := c.verifyConfig()
	if err != nil {
		c.log.Error("cannot verify upstream endpoints: TLS material rejected", zap.Error(err))
		return
	}
	cfg.ALPN = ch.alpn
	id := c.ident
	q := queuedVerify{k, ch, cfg}
	ch.inflight = true
	id.mu.Lock()
	if ch.standbyOnly() && id.running >= standbyRoom {
		ch.ahead.Store(true)
		id.ahead = append(id.ahead, q)
		id.mu.Unlock()
		return
	}
	c.runOrQueue(ctx, q)
}

// runOrQueue starts a worker for q, or queues q while verifyWorkers run.
// It is called with the identities' mu held, and releases it.
func (c *Controller) runOrQueue(ctx context.Context, q queuedVerify) {
	id := c.ident
	if id.running >= verifyWorkers {
		id.queue = append(id.queue, q)
		id.mu.Unlock()
		return
	}
	id.running++
	id.mu.Unlock()
	id.wg.Add(1)
	go c.verifyWorker(ctx, q)
}

// queuedVerify is a verification waiting for a worker, with the TLS
// material of when it was asked for.
type queuedVerify struct {
	k   checkKey
	ch  *idCheck
	cfg verify.Config
}

// verifyWorker proves q's endpoint, then the queued ones, first in first
// out, until the queue is empty. A proof whose endpoint no upstream lists
// any more is dropped unproven: a burst of adds undone before its proofs
// ran costs none.
func (c *Controller) verifyWorker(ctx context.Context, q queuedVerify) {
	id := c.ident
	defer id.wg.Done()
	for {
		k, ch := q.k, q.ch
		if ch.unlisted.Load() {
			c.send(ctx, func(*desired) { c.unlistedProof(k, ch) })
		} else {
			res, err := id.verify(ctx, q.cfg, ch.addr, ch.want)
			c.metrics.verifyDuration.Observe(res.Took.Seconds())
			c.send(ctx, func(d *desired) { c.verified(d, k, ch, res, err) })
		}
		id.mu.Lock()
		var ok bool
		if q, ok = id.next(ctx); !ok {
			id.running--
			id.mu.Unlock()
			return
		}
		id.mu.Unlock()
	}
}

// next takes the proof a worker runs next, with mu held: the first queued
// one, else, while fewer than standbyRoom other workers run, the first
// proof ahead. An empty queue lets its backing array go (a burst's).
func (id *identities) next(ctx context.Context) (queuedVerify, bool) {
	take := func(queue *[]queuedVerify) queuedVerify {
		q := (*queue)[0]
		(*queue)[0] = queuedVerify{}
		if *queue = (*queue)[1:]; len(*queue) == 0 {
			*queue = nil
		}
		return q
	}
	switch {
	case ctx.Err() != nil:
		id.queue, id.ahead = nil, nil
		return queuedVerify{}, false
	case len(id.queue) > 0:
		return take(&id.queue), true
	case len(id.ahead) > 0 && id.running <= standbyRoom:
		q := take(&id.ahead)
		q.ch.ahead.Store(false)
		return q, true
	}
	return queuedVerify{}, false
}

// promote moves ch's proof from the ahead queue to the listed endpoints'
// queue, or to a worker of its own, once an upstream lists it: an
// endpoint waiting to be placed does not wait behind proofs ahead.
func (c *Controller) promote(ctx context.Context, ch *idCheck) {
	id := c.ident
	id.mu.Lock()
	i := slices.IndexFunc(id.ahead, func(q queuedVerify) bool { return q.ch == ch })
	if i < 0 {
		id.mu.Unlock()
		return
	}
	q := id.ahead[i]
	id.ahead = slices.Delete(id.ahead, i, i+1)
	ch.ahead.Store(false)
	c.runOrQueue(ctx, q)
}

// unlist forgets the check k, which no upstream lists any more; one in
// flight is kept until its proof ends, and a queued one is marked for its
// worker to drop.
func (id *identities) unlist(k checkKey, ch *idCheck) {
	if ch.inflight {
		ch.unlisted.Store(true)
		return
	}
	delete(id.checks, k)
}

// unlistedProof ends a queued proof its worker dropped: the endpoint's
// result is forgotten unless an upstream listed it again meanwhile.
func (c *Controller) unlistedProof(k checkKey, ch *idCheck) {
	ch.inflight = false
	if !ch.listed() && c.ident.checks[k] == ch {
		delete(c.ident.checks, k)
	}
}

// verified records a verification's result and re-plans the upstreams that
// list the endpoint.
func (c *Controller) verified(d *desired, k checkKey, ch *idCheck, res verify.Result, err error) {
	ch.inflight = false
	if c.ident.checks[k] != ch {
		return // dropped meanwhile: no upstream lists it
	}
	now := c.now()
	ch.at, ch.shown, ch.serial = now, res.ID, res.Serial
	wasGood := ch.good
	log := c.log.With(zap.Strings("upstreams", ch.users), zap.String("instance", ch.instance),
		zap.String("address", ch.addr), zap.String("want", ch.want))
	switch {
	case err == nil:
		c.metrics.verifications.WithLabelValues("ok").Inc()
		ch.known, ch.good, ch.failures = true, true, 0
		// A proof holds reverifyEvery, give or take 10 %, so that the
		// endpoints verified in one burst are not proven again at once.
		ch.due = now.Add(reverifyEvery - reverifyEvery/10 + rand.N(reverifyEvery/5))
		log.Debug("upstream endpoint proved its identity", zap.Duration("took", res.Took), zap.String("serial", res.Serial),
			zap.Bool("standby", ch.standbyOnly()))
	case errors.Is(err, verify.ErrMismatch), errors.Is(err, verify.ErrUntrusted):
		result := "mismatch"
		if errors.Is(err, verify.ErrUntrusted) {
			result = "untrusted"
		}
		c.metrics.verifications.WithLabelValues(result).Inc()
		ch.known, ch.good = true, false
		ch.due = now.Add(backoffStep(&ch.failures, 5*time.Second, 5*time.Minute))
		for _, u := range ch.users {
			c.metrics.mismatch(u)
		}
		log.Error("upstream endpoint presents another identity; it gets no traffic", zap.String("identity", res.ID),
			zap.Bool("was_in_service", wasGood), zap.Error(err), zap.Time("retry_at", ch.due))
	default:
		// Unreachable for verification. A new endpoint is not placed: an
		// endpoint nobody can prove is exactly what verification exists
		// to keep out, and HAProxy could not reach it either, most of the
		// time, so failing closed costs nothing real. Retried with
		// backoff; Consul's health checks remove a dead one meanwhile.
		// An endpoint already proven keeps its slot: a failed re-proof
		// says nothing about who holds the address (HAProxy's own
		// connections then fail and are redispatched), and dropping it
		// on a passing network hiccup would cost capacity.
		c.metrics.verifications.WithLabelValues("unreachable").Inc()
		ch.due = now.Add(backoffStep(&ch.failures, time.Second, 30*time.Second))
		ch.known = true
		lvl := zap.WarnLevel
		if ch.standbyOnly() {
			// Its checks fail: it may well not listen yet.
			lvl = zap.DebugLevel
		}
		log.Log(lvl, "upstream endpoint not reachable for verification", zap.Bool("kept_in_service", ch.good),
			zap.Bool("standby", ch.standbyOnly()), zap.Error(err), zap.Time("retry_at", ch.due))
	}
	if ch.good == wasGood && wasGood {
		return // still proven: nothing to re-plan
	}
	for _, u := range ch.users {
		if _, ok := d.endpoints[u]; !ok {
			continue
		}
		if _, ok := d.dirty[u]; !ok {
			d.dirty[u] = now
		}
	}
}

// backoffStep returns the next wait, doubling from lo to hi, and counts
// the failure.
func backoffStep(failures *int, lo, hi time.Duration) time.Duration {
	d := lo << min(*failures, 16)
	if d > hi || d <= 0 {
		d = hi
	}
	*failures++
	return d
}

// upstreamSet is the upstreams that list an endpoint: nearly always one,
// so a slice, not a map (a map of one entry costs about ten times the
// memory, and there is one set per endpoint).
type upstreamSet []string

func (s *upstreamSet) add(u string) {
	if !slices.Contains(*s, u) {
		*s = append(*s, u)
	}
}

func (s *upstreamSet) remove(u string) {
	*s = slices.DeleteFunc(*s, func(v string) bool { return v == u })
}

// sweepIdentities renews due proofs of listed endpoints, makes the proofs
// ahead that are missing or due within standbyWindow, forgets due results
// of standby-only checks past it, and drops results that no current
// upstream lists.
func (c *Controller) sweepIdentities(ctx context.Context, d *desired) {
	now := c.now()
	gone := func(u string) bool {
		if _, ok := d.endpoints[u]; ok {
			return false
		}
		delete(c.ident.listedBy, u)
		delete(c.ident.standbyBy, u)
		return true
	}
	for k, ch := range c.ident.checks {
		ch.users = slices.DeleteFunc(ch.users, gone)
		ch.standby = slices.DeleteFunc(ch.standby, gone)
		if !ch.listed() {
			c.ident.unlist(k, ch)
			continue
		}
		switch {
		case ch.wanted(now):
			c.startVerify(ctx, k, ch)
		case ch.standbyOnly() && ch.known && !ch.inflight && !now.Before(ch.due):
			// Past its window: a due proof of it places nothing. It is
			// proven again when its checks pass.
			ch.known, ch.good, ch.failures = false, false, 0
		}
	}
}

// serverErrors re-verifies the endpoints of servers whose connection or
// handshake error counters, or denied responses (the second line refused
// an answer: the address may have changed hands), grew since the last read.
func (c *Controller) serverErrors(ctx context.Context, stats []runtime.ServerStat) {
	if c.applied.tables == nil {
		return
	}
	grew := map[netip.AddrPort]bool{}
	last := c.ident.errs
	c.ident.errs = make(map[serverRef]uint64, len(last))
	for _, s := range stats {
		if _, ok := c.applied.tables[s.Backend]; !ok {
			continue
		}
		k := serverRef{s.Backend, s.Server}
		n := s.ConnErrors + s.HandshakeFailures + s.DeniedResponses
		prev, seen := last[k]
		c.ident.errs[k] = n // a new worker starts at 0: then n < prev
		if !seen || n <= prev {
			continue
		}
		if ap, err := netip.ParseAddrPort(s.Addr); err == nil {
			grew[ap] = true
		}
	}
	if len(grew) == 0 {
		return
	}
	for k, ch := range c.ident.checks {
		if grew[k.addr] && !ch.inflight && ch.known {
			c.log.Info("HAProxy counts errors for an upstream endpoint; verifying it again",
				zap.String("address", ch.addr), zap.String("instance", ch.instance))
			c.startVerify(ctx, k, ch)
		}
	}
}

// watchIdentities drives the periodic sweep and the error poll until ctx
// ends. The poll runs here, not in the loop, so a slow reply never holds
// up a batch; its result is handed to the loop as an event.
func (c *Controller) watchIdentities(ctx context.Context) {
	sweep := time.NewTicker(identitySweep)
	defer sweep.Stop()
	poll := time.NewTicker(statPoll)
	defer poll.Stop()
	failures := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-sweep.C:
			c.send(ctx, func(d *desired) { c.sweepIdentities(ctx, d) })
		case <-poll.C:
			if !c.ready.Load() {
				continue
			}
			rs, err := c.rt.Exec(ctx, runtime.ShowServerStats())
			if err == nil {
				err = rs.Err()
			}
			var stats []runtime.ServerStat
			if err == nil {
				stats, err = runtime.ParseServerStats(rs[0].Reply)
			}
			if err != nil {
				// A read during a reload fails (the master re-executes):
				// only a run of failures is worth a warning.
				if failures++; ctx.Err() == nil {
					lvl := zap.DebugLevel
					if failures%5 == 0 {
						lvl = zap.WarnLevel
					}
					c.log.Log(lvl, "reading HAProxy's server error counters failed", zap.Int("failures_in_a_row", failures), zap.Error(err))
				}
				continue
			}
			failures = 0
			c.send(ctx, func(*desired) { c.serverErrors(ctx, stats) })
		}
	}
}

// healthInstances maps the endpoint keys of a health answer to their
// instances (for logs). Entries endpointsOf rejects are skipped here too.
func healthInstances(entries []healthEntry) map[netip.AddrPort]instance {
	out := make(map[netip.AddrPort]instance, len(entries))
	for _, e := range entries {
		if k, ok := endpointKey(e.addr(), e.Port); ok {
			out[k] = instance{id: e.ID}
		}
	}
	return out
}

// queryInstances maps the endpoint keys of a prepared query's answer to
// their instances: the service each serves (a sidecar's destination, or a
// Connect-native service itself) and the datacenter that answered, which
// together are the identity the instance must present.
func queryInstances(resp *api.PreparedQueryExecuteResponse) map[netip.AddrPort]instance {
	out := make(map[netip.AddrPort]instance, len(resp.Nodes))
	for _, e := range resp.Nodes {
		if e.Service == nil {
			continue
		}
		addr := e.Service.Address
		if addr == "" && e.Node != nil {
			addr = e.Node.Address
		}
		service := e.Service.Service
		if e.Service.Kind == api.ServiceKindConnectProxy && e.Service.Proxy != nil {
			service = e.Service.Proxy.DestinationServiceName
		}
		if k, ok := endpointKey(addr, e.Service.Port); ok {
			out[k] = instance{id: e.Service.ID, service: service, dc: resp.Datacenter}
		}
	}
	return out
}

// endpointKey is the endpoint at addr and port as a map key: an address
// and port compare as values, so no key is formatted to look one up.
func endpointKey(addr string, port int) (netip.AddrPort, bool) {
	a, err := netip.ParseAddr(addr)
	if err != nil || port < 1 || port > 65535 {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(a, uint16(port)), true
}
