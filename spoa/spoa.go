// Package spoa is the SPOE agent that authorizes inbound connections against
// Consul intentions: it reads the client certificate HAProxy sends, decides
// from the destination's intentions it holds (package intentions; watched
// from Consul), and answers sess.<prefix>.allowed. It fails closed, owns the
// decision cache and its invalidation, and knows nothing of the runtime socket.
package spoa

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/haproxy-connect/haproxy-connect/authzgen"
	"github.com/haproxy-connect/haproxy-connect/l7"
)

// The names HAProxy's SPOE configuration and listener rules share with the
// agent are the authorization protocol's (package authzgen): the message
// authzgen.Message with its argument authzgen.ArgCert, and the verdict
// variables authzgen.VarAllowed, VarSource and VarGen (the intentions
// generation the verdict was made under: HAProxy compares it with the
// generation the controller publishes in the authz map and asks again when
// it is older, so a changed intention reaches connections that stay open).
const noSource = "-"

const (
	// DefaultTimeout bounds one Decider call (an Authorizer with a
	// Decider; local decisions need none). HAProxy waits 1 s
	// for the agent ("timeout processing 1s" in the rendered SPOE file):
	// answering a deny a little before that keeps the decision, its log
	// line and its counters ours, instead of an SPOE timeout that HAProxy
	// alone sees.
	DefaultTimeout = 900 * time.Millisecond
	// DefaultCacheSize bounds the decision cache (entries).
	DefaultCacheSize = 65536

	// agentIdleTimeout is how long an agent connection may stay silent.
	// An agent that closes idle connections itself loses a NOTIFY HAProxy
	// sends while that close is under way, and the connection it belongs
	// to is refused. Waiting longer than HAProxy's own "timeout idle 2m"
	// leaves the closing of idle connections to it.
	agentIdleTimeout = 5 * time.Minute
	// frameTimeout bounds reading the rest of a frame once its length has
	// arrived, and writing one frame.
	frameTimeout = time.Second
)

// ErrClosed is returned by Serve after Close.
var ErrClosed = errors.New("spoa: authorizer closed")

// Decider makes one authorization decision: may the client whose leaf
// carries clientCertURI (a SPIFFE ID) and clientCertSerial (colon-hex) open
// a connection to the target service? The sidecar uses none (it decides
// from the intentions it holds); tests use fakes to drive the cache.
type Decider interface {
	Authorize(ctx context.Context, target, clientCertURI, clientCertSerial string) (allowed bool, reason string, err error)
}

// Option configures an Authorizer.
type Option func(*Authorizer)

// WithTimeout bounds one Decider call (default DefaultTimeout). Past it the
// connection is denied; a late answer still fills the cache.
func WithTimeout(d time.Duration) Option { return func(a *Authorizer) { a.timeout = d } }

// WithInvalidateHook calls f with the new generation on every Invalidate,
// before the agent switches to it: until f returns, decisions still come
// from the old cache under the old generation. f should return once HAProxy
// has the new generation, so that no connection can be allowed under the
// old intentions after one was refused under the new ones (a deny that
// flips back for a few ms); it must bound its wait, since the intention
// watch and the switch wait for it.
func WithInvalidateHook(f func(gen uint64)) Option { return func(a *Authorizer) { a.onInvalidate = f } }

// WithL7MapHook calls f with the L7 intentions compiled for HAProxy's L7
// map (l7.Compile, one per key) each time the intentions held change,
// before the switch to them: the controller keeps the map current, and
// the agent hands a connection under an L7 intention its key
// (authzgen.VarL7Rules). f must not block.
func WithL7MapHook(f func([]l7.Compiled)) Option { return func(a *Authorizer) { a.onL7Map = f } }

// WithSourceHook calls f after each allow of a connection whose listener
// says its sources map has no name for the client certificate
// (authzgen.ArgNamed NULL: a tcp listener, whose rules cannot write that
// map on HAProxy 2.6, so the controller does with "add map"), with the
// certificate's SHA-256 and its SPIFFE ID. f runs on the decision path:
// it must not block.
func WithSourceHook(f func(cert [32]byte, source string)) Option {
	return func(a *Authorizer) { a.onSource = f }
}

// WithCacheSize bounds the number of cached decisions (default
// DefaultCacheSize). A full cache evicts one arbitrary entry per insert.
func WithCacheSize(n int) Option { return func(a *Authorizer) { a.cacheSize = n } }

// WithMaxHandlers bounds the NOTIFY frames handled at once over all agent
// connections (default DefaultMaxHandlers). When all are busy, connections
// stop being read until one is free.
func WithMaxHandlers(n int) Option { return func(a *Authorizer) { a.maxHandlers = n } }

// Authorizer answers HAProxy's "authorize" SPOE messages for one
// destination service. Create it with New. Its methods are safe for
// concurrent use.
type Authorizer struct {
	target    string
	decider   Decider
	log       *zap.Logger
	timeout   time.Duration
	cacheSize int
	// slots holds one token per NOTIFY being handled (capacity maxHandlers).
	maxHandlers int
	slots       chan struct{}
	// watchMinInterval spaces the starts of two intention queries.
	watchMinInterval time.Duration

	// ctx ends with Close: it cancels Decider calls in flight.
	ctx    context.Context
	cancel context.CancelFunc

	onInvalidate func(gen uint64)
	onL7Map      func([]l7.Compiled)
	onSource     func(cert [32]byte, source string)
	onSwitch     func(gen uint64)
	// l7 holds the L7 intentions (WithL7Rules); nil: L7 is not decided.
	l7 L7Rules
	// decisionTime is haproxy_connect_authz_decision_seconds (metrics.go).
	decisionTime prometheus.Histogram
	// certs are the client certificates asked about, for Recheck.
	certs certMemory

	mu sync.Mutex
	// invalidating serialises Invalidate, which calls the hook unlocked.
	invalidating sync.Mutex
	gen          uint64 // bumped by Invalidate
	cache        map[cacheKey]verdict
	inflight     map[cacheKey]*flight

	// connMu guards the listeners and agent connections Serve tracks, the
	// closed flag and the count of handlers running.
	connMu    sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[*trackedConn]struct{}
	handlers  sync.WaitGroup

	stats counters
	// trust is what client certificates are checked against (SetRoots);
	// nil until the roots are known.
	trust atomic.Pointer[trust]
	// watchIndex is the Consul index of the intentions WatchIntentions
	// last invalidated for.
	watchIndex atomic.Uint64
	// held is the intentions local decisions are made from (nil Decider;
	// see local.go); nil until the first.
	held atomic.Pointer[heldIntentions]
	// sourceIDs memoises parsed source SPIFFE IDs (sourceID); nSourceIDs
	// counts the stores, to bound it.
	sourceIDs  sync.Map
	nSourceIDs atomic.Int64
	// served is what HAProxy verifies client certificates against
	// (RootsServed, served.go).
	served servedRoots
	// verified holds the certificates checkCert passed, with the trust they
	// were checked under (see checkOnce).
	verifiedMu sync.Mutex
	verified   map[[32]byte]*trust
}

// New returns an Authorizer for connections to the target service (its
// Consul name), deciding with d, or, if d is nil, locally from the
// intentions it holds (SetIntentions, WatchIntentions). A nil log
// discards logs.
func New(target string, d Decider, log *zap.Logger, opts ...Option) *Authorizer {
	if log == nil {
		log = zap.NewNop()
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &Authorizer{
		target:           target,
		decider:          d,
		log:              log.With(zap.String("destination", target)),
		timeout:          DefaultTimeout,
		cacheSize:        DefaultCacheSize,
		watchMinInterval: 100 * time.Millisecond,
		ctx:              ctx,
		cancel:           cancel,
		cache:            map[cacheKey]verdict{},
		inflight:         map[cacheKey]*flight{},
		verified:         map[[32]byte]*trust{},
		listeners:        map[net.Listener]struct{}{},
		conns:            map[*trackedConn]struct{}{},
		decisionTime:     newDecisionTime(),
	}
	for _, o := range opts {
		o(a)
	}
	if a.timeout <= 0 {
		a.timeout = DefaultTimeout
	}
	if a.cacheSize <= 0 {
		a.cacheSize = DefaultCacheSize
	}
	if a.maxHandlers <= 0 {
		a.maxHandlers = DefaultMaxHandlers
	}
	a.slots = make(chan struct{}, a.maxHandlers)
	return a
}

// Serve runs the SPOE agent on ln (a unix socket in the sidecar; see
// spop.go for the protocol) until ln is closed or Close is called, and
// returns nil then. When Serve returns, the agent connections it accepted
// are closed too: HAProxy gets no more answers and refuses new inbound
// connections.
func (a *Authorizer) Serve(ln net.Listener) error {
	a.connMu.Lock()
	if a.closed {
		a.connMu.Unlock()
		ln.Close()
		return ErrClosed
	}
	a.listeners[ln] = struct{}{}
	a.connMu.Unlock()

	tl := &trackingListener{Listener: ln, a: a}
	var err error
	for {
		var c net.Conn
		if c, err = tl.Accept(); err != nil {
			break
		}
		go a.serveConn(c)
	}

	a.connMu.Lock()
	delete(a.listeners, ln)
	var mine []*trackedConn
	for c := range a.conns {
		if c.ln == tl {
			mine = append(mine, c)
		}
	}
	a.connMu.Unlock()
	for _, c := range mine {
		c.Close()
	}
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return fmt.Errorf("spoe agent on %s: %w", ln.Addr(), err)
}

// Close stops every Serve, drops the agent connections, cancels Decider
// calls in flight and waits for running handlers to answer (deny). It is
// idempotent. With the agent gone, HAProxy 2.6 refuses each new inbound
// connection once its SPOE processing timeout (1 s) expires.
func (a *Authorizer) Close() error {
	a.connMu.Lock()
	if a.closed {
		a.connMu.Unlock()
		return nil
	}
	a.closed = true
	a.cancel()
	var lns []net.Listener
	for ln := range a.listeners {
		lns = append(lns, ln)
	}
	var conns []*trackedConn
	for c := range a.conns {
		conns = append(conns, c)
	}
	a.connMu.Unlock()
	for _, ln := range lns {
		ln.Close()
	}
	for _, c := range conns {
		c.Close()
	}
	a.handlers.Wait()
	return nil
}

// enter registers a running handler; it fails once Close has begun.
func (a *Authorizer) enter() bool {
	a.connMu.Lock()
	defer a.connMu.Unlock()
	if a.closed {
		return false
	}
	a.handlers.Add(1)
	return true
}

// handle answers one NOTIFY frame: it returns the ACK's actions. Every
// failure is an explicit answer (allowed=false, or no verdict: see
// undecidedActions), never a missing ACK, which would make HAProxy wait its
// whole processing timeout. It recovers from panics.
func (a *Authorizer) handle(payload []byte) (ack []byte) {
	if !a.enter() {
		a.stats.undecided.Add(1)
		return appendActions(nil, undecidedActions(noSource))
	}
	defer a.handlers.Done()
	defer func() {
		if r := recover(); r != nil {
			a.stats.errors.Add(1)
			a.stats.undecided.Add(1)
			a.log.Error("spoe message handler panicked; no verdict, HAProxy refuses", zap.Any("panic", r))
			ack = appendActions(nil, undecidedActions(noSource))
		}
	}()

	start := time.Now()
	if seen, r := readL7(payload); seen {
		defer a.timeDecision(start)
		return appendTxnActions(nil, a.decideL7(r))
	}
	m := readAuthorizeArgs(payload)
	if !m.seen {
		// Not ours: leave the variables unset, which the listener
		// treats as a deny.
		return nil
	}
	defer a.timeDecision(start)
	d := a.decide(m.der, m.argErr)
	if d.undecided {
		return appendActions(nil, undecidedActions(d.source))
	}
	a.l7Connection(&d, m.httpListener)
	if a.onSource != nil && m.unnamed && d.allowed && d.err == nil && d.source != noSource {
		a.onSource(d.cert, d.source)
	}
	acts := verdictActions(d.allowed, d.source, d.gen)
	if d.l7 {
		acts = append(acts, setVar{authzgen.VarL7, true})
		if d.l7Key != "" {
			acts = append(acts, setVar{authzgen.VarL7Rules, d.l7Key})
		}
	}
	return appendActions(nil, acts)
}

// readAuthorize finds the authorize message in a NOTIFY payload (a list of
// messages: name, argument count, then that many name/typed-value pairs)
// and its cert argument. seen is false when there is no such message; a
// payload that cannot be decoded counts as one, with an error.
func readAuthorize(b []byte) (seen bool, der []byte, argErr error) {
	m := readAuthorizeArgs(b)
	return m.seen, m.der, m.argErr
}

// authorizeArgs is what an authorize message carries.
type authorizeArgs struct {
	// seen: the payload holds the message (see readAuthorize).
	seen   bool
	der    []byte
	argErr error
	// httpListener: authzgen.ArgL7 (the listener decides L7 per request).
	httpListener bool
	// unnamed: authzgen.ArgNamed is NULL (the listener's sources map has
	// no name for the certificate, and the controller fills it).
	unnamed bool
}

// readAuthorizeArgs is readAuthorize, with the listener's arguments.
func readAuthorizeArgs(b []byte) authorizeArgs {
	var m authorizeArgs
	for len(b) > 0 {
		name, rest, err := getString(b)
		if err != nil || len(rest) == 0 {
			return authorizeArgs{seen: true, argErr: fmt.Errorf("decode spoe message: %w", errTruncated)}
		}
		n := int(rest[0])
		b = rest[1:]
		mine := name == authzgen.Message
		if mine {
			m = authorizeArgs{seen: true, argErr: errNoCert}
		}
		for range n {
			var arg string
			var v value
			if arg, b, err = getString(b); err == nil {
				v, b, err = getValue(b)
			}
			if err != nil {
				return authorizeArgs{seen: true, argErr: fmt.Errorf("decode spoe message %q: %w", name, err)}
			}
			if !mine {
				continue
			}
			switch arg {
			case authzgen.ArgL7:
				m.httpListener = v.typ == typeBool && v.boolean
			case authzgen.ArgNamed:
				// HAProxy sends NULL for a variable that is not set.
				m.unnamed = v.typ == typeNull
			case authzgen.ArgCert:
				switch v.typ {
				case typeBinary:
					m.der, m.argErr = v.bytes, nil
				case typeNull:
					// HAProxy sends NULL when the sample fetch fails.
					m.der, m.argErr = nil, errNoCert
				default:
					m.der, m.argErr = nil, fmt.Errorf("%w: argument %q has type %s, want binary", errBadCert, authzgen.ArgCert, typeName(v.typ))
				}
			}
		}
	}
	return m
}

// verdictActions sets the verdict, its source and its generation in the
// session scope.
func verdictActions(allowed bool, source string, gen uint64) []setVar {
	return []setVar{{authzgen.VarAllowed, allowed}, {authzgen.VarSource, source}, {authzgen.VarGen, int64(gen)}}
}

// undecidedActions answers when no decision could be made (no CA roots or
// intentions held yet, a Decider failure or timeout, the agent closing):
// the source only, no verdict. HAProxy refuses what it was asked about (TCP: the connection;
// HTTP: this request, with a 503) and asks again for the next request on
// the same connection. A verdict of false instead would stay on the
// connection until the intentions change, so one failed call would
// refuse every request of a kept-alive or pooled connection, long after
// Consul is back.
func undecidedActions(source string) []setVar {
	return []setVar{{authzgen.VarSource, source}}
}

// decision is the outcome for one inbound connection.
type decision struct {
	allowed bool
	source  string // SPIFFE ID, or noSource
	serial  string
	// cert is the SHA-256 of the client certificate's DER (when there
	// was one).
	cert   [32]byte
	reason string
	how    origin
	gen    uint64 // the intentions generation the decision was made under
	// l7: the source is under an L7 intention; each request is decided
	// by its permissions (allowed is then true for the connection).
	l7 bool
	// l7Intention: the verdict came from an L7 intention (local
	// decisions; see verdict.l7).
	l7Intention bool
	// l7Key names the L7 intention's entries in HAProxy's L7 map: with
	// it, HAProxy decides the requests the map can (l7.Compile) and
	// asks the agent for the rest.
	l7Key string
	err   error
	// undecided: no verdict could be had (the Decider failed or timed
	// out); err says why. A failure that asking again cannot change (no
	// or bad certificate) is a deny instead.
	undecided bool
}

// decide authorizes the client certificate der (argErr: HAProxy sent none
// or something else). A certificate that cannot be read is a deny; a
// Decider failure leaves the connection undecided. Both refuse. It logs
// one line.
func (a *Authorizer) decide(der []byte, argErr error) decision {
	d := decision{source: noSource, err: argErr}
	if d.err == nil {
		// A certificate asked about before is not parsed again: after an
		// intentions change every source is decided again, and parsing
		// is most of that decision's time and allocations.
		sum := sha256.Sum256(der)
		d.cert = sum
		r, ok := a.certs.get(sum)
		if !ok {
			// The source's SPIFFE ID is parsed once per URI (sourceID),
			// not once per certificate: a renewed leaf, another instance.
			if r, d.err = readCert(der, sum, a.sourceID); d.err == nil {
				a.certs.remember(r)
			}
		}
		d.serial = r.id.serial
		if r.id.uri != "" {
			d.source = r.id.uri
		}
		if d.err == nil {
			var v verdict
			v, d.how, d.gen, d.err = a.lookup(r)
			d.allowed, d.reason, d.l7Intention, d.l7Key = v.allowed, v.reason, v.l7, v.l7Key
			d.undecided = d.err != nil
			if d.err == nil && v.refused >= 0 {
				a.stats.refused[v.refused].Add(1)
			}
		}
	}
	if d.err != nil {
		d.allowed, d.reason = false, d.err.Error()
		a.stats.errors.Add(1)
	}
	switch {
	case d.undecided:
		a.stats.undecided.Add(1)
	case d.allowed:
		a.stats.allowed.Add(1)
	default:
		a.stats.denied.Add(1)
	}
	a.logDecision(d)
	return d
}

// SetRoots sets the trust domain and the CA roots (with the intermediates
// Consul lists for them) that client certificates are checked against,
// from Consul's /v1/agent/connect/ca/roots. Until the first call every
// connection is left undecided (HAProxy refuses and asks again). A change
// drops the decision cache: a cached allow for a leaf of a root that has
// gone must not outlive it. A bad input is refused and the previous trust
// stays.
func (a *Authorizer) SetRoots(trustDomain string, roots, intermediates []*x509.Certificate) error {
	t, err := newTrust(trustDomain, roots, intermediates)
	if err != nil {
		return err
	}
	if old := a.trust.Swap(t); old != nil && old.key != t.key {
		a.log.Info("CA roots or trust domain changed, decision cache dropped", zap.String("trust_domain", t.domain),
			zap.Int("roots", len(roots)), zap.Int("intermediates", len(intermediates)))
		a.verifiedMu.Lock()
		clear(a.verified) // checked under the old trust: stale
		a.verifiedMu.Unlock()
		a.Invalidate()
	}
	return nil
}

// logDecision writes one line per decision: info when this connection
// caused the decision (a Consul call or a failure), debug when it reused
// one (cache hit, or a call another connection had in flight).
func (a *Authorizer) logDecision(d decision) {
	lvl, msg := zapcore.InfoLevel, "inbound connection decision"
	switch {
	case d.undecided:
		lvl, msg = zapcore.WarnLevel, "inbound connection not decided; refused, the next request asks again"
	case d.err == nil && d.how != originCall:
		lvl = zapcore.DebugLevel
	}
	ce := a.log.Check(lvl, msg)
	if ce == nil {
		return
	}
	ce.Write(
		zap.String("source", d.source),
		zap.String("serial", d.serial),
		zap.Bool("allowed", d.allowed),
		zap.String("reason", d.reason),
		zap.Bool("cached", d.how != originCall),
	)
}

// Stats are counters since New, for metrics.
type Stats struct {
	// Allowed and Denied count verdicts sent to HAProxy; Undecided counts
	// answers without one (Decider failure or timeout, agent closing),
	// which HAProxy refuses and asks again about on the next request.
	Allowed, Denied, Undecided uint64
	// CacheHits counts decisions served from the cache; Coalesced those
	// that waited for a Decider call another connection had in flight.
	CacheHits, Coalesced uint64
	// ConsulCalls counts Decider calls (an Authorizer with a Decider).
	ConsulCalls uint64
	// LocalDecisions counts decisions made from the held intentions (an
	// Authorizer without a Decider): the uncached decisions.
	LocalDecisions uint64
	// Errors counts refusals caused by a failure (no or bad certificate,
	// Decider error or timeout) rather than by a decision.
	Errors uint64
	// Invalidations counts cache drops.
	Invalidations uint64
	// Refused counts connections denied by the agent's own check of the
	// certificate, by reason: "uri_sans" (not exactly one URI SAN),
	// "not_spiffe", "trust_domain" (not the cluster's), "not_service" (an
	// agent's or other non-service SPIFFE ID), "chain" (does not verify
	// against the CA roots). Every reason is present.
	Refused map[string]uint64
	// Generation is the current intentions generation.
	Generation uint64
	// IntentionsIndex is the Consul index of the intentions the watch
	// last saw (0 before its first answer).
	IntentionsIndex uint64
	// CacheEntries is the current number of cached decisions.
	CacheEntries int
	// L7Allowed and L7Denied count requests decided by L7 permissions.
	L7Allowed, L7Denied uint64
	// ChainVerifications counts the client certificates whose chain the
	// agent verified itself (see served.go for when it need not).
	ChainVerifications uint64
}

type counters struct {
	allowed, denied, undecided, cacheHits, coalesced, consulCalls, localDecisions, errors, invalidations atomic.Uint64
	l7Allowed, l7Denied, chainVerifications                                                              atomic.Uint64
	refused                                                                                              [5]atomic.Uint64 // indexed as refusals
}

// Stats returns the current counters.
func (a *Authorizer) Stats() Stats {
	a.mu.Lock()
	n, gen := len(a.cache), a.gen
	a.mu.Unlock()
	refused := make(map[string]uint64, len(refusals))
	for i, r := range refusals {
		refused[r.name] = a.stats.refused[i].Load()
	}
	return Stats{
		Refused:         refused,
		Allowed:         a.stats.allowed.Load(),
		Denied:          a.stats.denied.Load(),
		Undecided:       a.stats.undecided.Load(),
		CacheHits:       a.stats.cacheHits.Load(),
		Coalesced:       a.stats.coalesced.Load(),
		ConsulCalls:     a.stats.consulCalls.Load(),
		LocalDecisions:  a.stats.localDecisions.Load(),
		Errors:          a.stats.errors.Load(),
		Invalidations:   a.stats.invalidations.Load(),
		Generation:      gen,
		IntentionsIndex: a.watchIndex.Load(),
		CacheEntries:    n,
		L7Allowed:       a.stats.l7Allowed.Load(),
		L7Denied:        a.stats.l7Denied.Load(),

		ChainVerifications: a.stats.chainVerifications.Load(),
	}
}
