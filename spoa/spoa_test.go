package spoa

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap/zaptest"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

const (
	webID    = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web"
	clientID = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/client"
)

// leafDER issues a leaf from ca with the given URI SANs (any number).
func leafDER(t *testing.T, ca *testenv.CA, serial int64, uris ...string) []byte {
	t.Helper()
	var us []*url.URL
	for _, s := range uris {
		u, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		us = append(us, u)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		URIs:         us,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, ca.Cert.PublicKey, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func pemDER(t *testing.T, certPEM string) []byte {
	t.Helper()
	b, _ := pem.Decode([]byte(certPEM))
	if b == nil {
		t.Fatal("no PEM block")
	}
	return b.Bytes
}

func TestParseIdentity(t *testing.T) {
	ca := testenv.NewCA(t, "root")
	consulLike := pemDER(t, func() string { c, _ := ca.Leaf(t, clientID); return c }())
	parsed, err := x509.ParseCertificate(consulLike)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		der     []byte
		want    identity
		wantErr error
	}{
		{"consul-like leaf", consulLike, identity{uri: clientID, serial: hexSerial(parsed.SerialNumber)}, nil},
		{"serial is colon hex", leafDER(t, ca, 0x0a1b2c, webID), identity{uri: webID, serial: "0a:1b:2c"}, nil},
		{"empty", nil, identity{}, errNoCert},
		{"garbage", []byte("not a certificate"), identity{}, errBadCert},
		{"truncated", consulLike[:len(consulLike)/2], identity{}, errBadCert},
		{"no URI SAN", leafDER(t, ca, 2), identity{}, errNoSPIFFEID},
		{"two URI SANs", leafDER(t, ca, 3, clientID, webID), identity{}, errNoSPIFFEID},
		{"not spiffe", leafDER(t, ca, 4, "https://td.consul/ns/default/dc/dc1/svc/web"), identity{}, errNoSPIFFEID},
		{"no trust domain", leafDER(t, ca, 5, "spiffe:///ns/default/dc/dc1/svc/web"), identity{}, errNoSPIFFEID},
		{"query", leafDER(t, ca, 6, "spiffe://td.consul/ns/default/dc/dc1/svc/web?x=1"), identity{}, errNoSPIFFEID},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseIdentity(tt.der)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("error %v, want %v", err, tt.wantErr)
			}
			if diff := cmp.Diff(tt.want, got, cmp.AllowUnexported(identity{})); diff != "" {
				t.Errorf("identity (-want +got):\n%s", diff)
			}
		})
	}
}

// fakeDecider answers from a table of allowed SPIFFE IDs and records calls.
type fakeDecider struct {
	mu      sync.Mutex
	allowed map[string]bool
	err     error
	calls   []string
	// gate, when set, holds every call until it is closed (or ctx ends,
	// unless ignoreCtx).
	gate      chan struct{}
	ignoreCtx bool
	panics    bool
}

func (f *fakeDecider) Authorize(ctx context.Context, target, uri, serial string) (bool, string, error) {
	f.mu.Lock()
	f.calls = append(f.calls, target+" "+uri+" "+serial)
	gate, allowed, err := f.gate, f.allowed[uri], f.err
	f.mu.Unlock()
	if f.panics {
		panic("boom")
	}
	if gate != nil {
		if f.ignoreCtx {
			<-gate
		} else {
			select {
			case <-gate:
			case <-ctx.Done():
				return false, "", ctx.Err()
			}
		}
	}
	if err != nil {
		return false, "", err
	}
	if allowed {
		return true, "Matched L4 intention: allow", nil
	}
	return false, "Default intention policy", nil
}

func (f *fakeDecider) set(fn func(*fakeDecider)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *fakeDecider) nCalls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.calls)
}

func newTest(t *testing.T, d Decider, opts ...Option) *Authorizer {
	t.Helper()
	a := New("web", d, zaptest.NewLogger(t), opts...)
	t.Cleanup(func() { a.Close() })
	return a
}

// result is the comparable part of a decision.
type result struct {
	Allowed   bool
	Undecided bool
	Source    string
	How       origin
	Err       string // error text prefix, "" for none
}

func resultOf(d decision) result {
	r := result{Allowed: d.allowed, Undecided: d.undecided, Source: d.source, How: d.how}
	if d.err != nil {
		r.Err = d.err.Error()
	}
	return r
}

// cmpResult compares error texts by prefix: the wanted text starts the
// error, and "" only matches "".
var cmpResult = cmp.FilterPath(
	func(p cmp.Path) bool { return p.Last().String() == ".Err" },
	cmp.Comparer(func(x, y string) bool {
		return x == y || x != "" && y != "" && (strings.HasPrefix(x, y) || strings.HasPrefix(y, x))
	}))

func TestDecideSequence(t *testing.T) {
	ca := testenv.NewCA(t, "root")
	client := leafDER(t, ca, 100, clientID)
	client2 := leafDER(t, ca, 101, clientID) // renewed leaf: new serial, new key
	other := leafDER(t, ca, 102, "spiffe://td.consul/ns/default/dc/dc1/svc/other")

	f := &fakeDecider{allowed: map[string]bool{clientID: true}}
	a := newTest(t, f)
	type step struct {
		name      string
		do        func() // before the decision, optional
		der       []byte
		argErr    error
		want      result
		wantCalls int // total Decider calls after the step
	}
	steps := []step{
		{name: "first connection asks", der: client, want: result{Allowed: true, Source: clientID, How: originCall}, wantCalls: 1},
		{name: "second is cached", der: client, want: result{Allowed: true, Source: clientID, How: originCache}, wantCalls: 1},
		{name: "renewed leaf is a new key", der: client2, want: result{Allowed: true, Source: clientID, How: originCall}, wantCalls: 2},
		{name: "deny from consul", der: other, want: result{Source: "spiffe://td.consul/ns/default/dc/dc1/svc/other", How: originCall}, wantCalls: 3},
		{name: "deny is cached", der: other, want: result{Source: "spiffe://td.consul/ns/default/dc/dc1/svc/other", How: originCache}, wantCalls: 3},
		{name: "no cert asks nobody", der: nil, argErr: errNoCert, want: result{Source: "-", Err: "no client certificate"}, wantCalls: 3},
		{name: "garbage asks nobody", der: []byte{0x30, 0x03, 1, 2, 3}, want: result{Source: "-", Err: "unparsable client certificate"}, wantCalls: 3},
		{name: "no URI asks nobody", der: leafDER(t, ca, 103), want: result{Source: "-", Err: "no SPIFFE ID"}, wantCalls: 3},
		{
			name: "invalidate then revoke", do: func() {
				a.Invalidate()
				f.set(func(f *fakeDecider) { f.allowed[clientID] = false })
			},
			der: client, want: result{Source: clientID, How: originCall}, wantCalls: 4,
		},
		{
			name: "consul error leaves it undecided", do: func() {
				a.Invalidate()
				f.set(func(f *fakeDecider) { f.allowed[clientID] = true; f.err = errors.New("agent down") })
			},
			der: client, want: result{Undecided: true, Source: clientID, How: originCall, Err: "agent down"}, wantCalls: 5,
		},
		{
			name: "errors are not cached", do: func() { f.set(func(f *fakeDecider) { f.err = nil }) },
			der: client, want: result{Allowed: true, Source: clientID, How: originCall}, wantCalls: 6,
		},
	}
	for _, s := range steps {
		if s.do != nil {
			s.do()
		}
		got := resultOf(a.decide(s.der, s.argErr))
		if diff := cmp.Diff(s.want, got, cmpResult); diff != "" {
			t.Errorf("%s: decision (-want +got):\n%s", s.name, diff)
		}
		if n := f.nCalls(); n != s.wantCalls {
			t.Errorf("%s: %d decider calls, want %d", s.name, n, s.wantCalls)
		}
	}
	wantStats := Stats{Allowed: 4, Denied: 6, Undecided: 1, CacheHits: 2, ConsulCalls: 6, Errors: 4, Invalidations: 2, Generation: 2, CacheEntries: 1}
	if diff := cmp.Diff(wantStats, a.Stats()); diff != "" {
		t.Errorf("stats (-want +got):\n%s", diff)
	}
	if want := "web " + clientID + " 64"; f.calls[0] != want {
		t.Errorf("first call %q, want %q", f.calls[0], want)
	}
}

func TestSingleFlight(t *testing.T) {
	ca := testenv.NewCA(t, "root")
	der := leafDER(t, ca, 1, clientID)
	f := &fakeDecider{allowed: map[string]bool{clientID: true}, gate: make(chan struct{})}
	a := newTest(t, f, WithTimeout(10*time.Second))
	const n = 1000
	var wg sync.WaitGroup
	results := make([]decision, n)
	for i := range n {
		wg.Go(func() { results[i] = a.decide(der, nil) })
	}
	// Every connection has joined the one call before it is answered.
	waitFor(t, func() bool { return a.Stats().Coalesced == n-1 })
	close(f.gate)
	wg.Wait()
	if c := f.nCalls(); c != 1 {
		t.Fatalf("%d decider calls for %d concurrent connections, want 1", c, n)
	}
	for i, d := range results {
		if !d.allowed || d.err != nil {
			t.Fatalf("connection %d: %+v", i, d)
		}
	}
	if got := a.decide(der, nil); got.how != originCache {
		t.Errorf("after the flight: %v, want a cache hit", got.how)
	}
}

func TestInvalidateDuringCall(t *testing.T) {
	ca := testenv.NewCA(t, "root")
	der := leafDER(t, ca, 1, clientID)
	f := &fakeDecider{allowed: map[string]bool{clientID: true}, gate: make(chan struct{})}
	a := newTest(t, f, WithTimeout(10*time.Second))

	early := make(chan decision)
	go func() { early <- a.decide(der, nil) }()
	waitFor(t, func() bool { return f.nCalls() == 1 })
	// The intentions change while Consul answers under the old ones.
	a.Invalidate()
	f.set(func(f *fakeDecider) { f.allowed[clientID] = false })
	late := make(chan decision)
	go func() { late <- a.decide(der, nil) }()
	// The late connection does not join the old call: it makes its own.
	waitFor(t, func() bool { return f.nCalls() == 2 })
	close(f.gate)
	if d := <-early; !d.allowed {
		t.Errorf("connection that arrived before the change: %+v, want the old answer (allow)", d)
	}
	if d := <-late; d.allowed {
		t.Errorf("connection that arrived after the change: %+v, want deny", d)
	}
	if d := a.decide(der, nil); d.allowed || d.how != originCache {
		t.Errorf("next connection: allowed=%v how=%v, want the new deny from the cache", d.allowed, d.how)
	}
}

func TestTimeoutLeavesUndecided(t *testing.T) {
	ca := testenv.NewCA(t, "root")
	der := leafDER(t, ca, 1, clientID)
	gate := make(chan struct{})
	defer close(gate)
	// A Decider that ignores its context, as api.Agent.ConnectAuthorize does.
	f := &fakeDecider{allowed: map[string]bool{clientID: true}, gate: gate, ignoreCtx: true}
	a := newTest(t, f, WithTimeout(50*time.Millisecond))
	start := time.Now()
	d := a.decide(der, nil)
	if took := time.Since(start); took > time.Second {
		t.Errorf("decision took %s with a 50ms timeout", took)
	}
	if d.allowed || !d.undecided || !errors.Is(d.err, context.DeadlineExceeded) {
		t.Errorf("got allowed=%v undecided=%v err=%v, want undecided by deadline", d.allowed, d.undecided, d.err)
	}
	// The call is no longer in flight: the next connection asks again.
	a.decide(der, nil)
	if n := f.nCalls(); n != 2 {
		t.Errorf("%d calls, want 2", n)
	}
}

func TestDeciderPanicLeavesUndecided(t *testing.T) {
	ca := testenv.NewCA(t, "root")
	a := newTest(t, &fakeDecider{panics: true})
	if d := a.decide(leafDER(t, ca, 1, clientID), nil); d.allowed || !d.undecided || d.err == nil {
		t.Errorf("got %+v, want undecided with an error", d)
	}
}

func TestCacheBound(t *testing.T) {
	ca := testenv.NewCA(t, "root")
	f := &fakeDecider{allowed: map[string]bool{}}
	a := newTest(t, f, WithCacheSize(3))
	var ders [][]byte
	for i := range 10 {
		id := fmt.Sprintf("spiffe://td.consul/ns/default/dc/dc1/svc/s%d", i)
		f.set(func(f *fakeDecider) { f.allowed[id] = true })
		ders = append(ders, leafDER(t, ca, int64(i+1), id))
		a.decide(ders[i], nil)
		if n := a.Stats().CacheEntries; n > 3 {
			t.Fatalf("after %d sources: %d cache entries, bound is 3", i+1, n)
		}
	}
	if n := a.Stats().CacheEntries; n != 3 {
		t.Errorf("%d cache entries, want 3", n)
	}
	// The newest entry is never the one evicted.
	if d := a.decide(ders[9], nil); d.how != originCache {
		t.Errorf("newest source: %v, want a cache hit", d.how)
	}
}

func TestClosedDenies(t *testing.T) {
	ca := testenv.NewCA(t, "root")
	f := &fakeDecider{allowed: map[string]bool{clientID: true}}
	a := newTest(t, f)
	a.Close()
	if d := a.decide(leafDER(t, ca, 1, clientID), nil); d.allowed {
		t.Errorf("after Close: %+v, want deny", d)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Serve(ln); !errors.Is(err, ErrClosed) {
		t.Errorf("Serve after Close: %v, want ErrClosed", err)
	}
}

func TestVerdictActions(t *testing.T) {
	got := verdictActions(true, clientID, 7)
	want := []setVar{{"allowed", true}, {"source", clientID}, {"gen", int64(7)}}
	if diff := cmp.Diff(want, got, cmp.AllowUnexported(setVar{})); diff != "" {
		t.Errorf("actions (-want +got):\n%s", diff)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 10s")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestGenerationAndHook: every Invalidate publishes the new generation
// through the hook, and a verdict carries the generation it was made under,
// which HAProxy compares with the published one.
func TestGenerationAndHook(t *testing.T) {
	ca := testenv.NewCA(t, "root")
	der := leafDER(t, ca, 1, clientID)
	var published []uint64
	var a *Authorizer
	a = newTest(t, &fakeDecider{allowed: map[string]bool{clientID: true}},
		WithInvalidateHook(func(gen uint64) {
			// HAProxy learns the generation before the agent decides under it.
			if a.Generation() != gen-1 {
				t.Errorf("hook for generation %d ran after the switch (Generation() = %d)", gen, a.Generation())
			}
			published = append(published, gen)
		}))
	if d := a.decide(der, nil); !d.allowed || d.gen != 0 {
		t.Fatalf("first decision: %+v", d)
	}
	a.Invalidate()
	a.Invalidate()
	if d := a.decide(der, nil); d.gen != 2 || d.how != originCall {
		t.Errorf("after two invalidations: gen %d how %v, want 2 from a new call", d.gen, d.how)
	}
	if d := a.decide(der, nil); d.gen != 2 || d.how != originCache {
		t.Errorf("cached: gen %d how %v, want 2 from the cache", d.gen, d.how)
	}
	if diff := cmp.Diff([]uint64{1, 2}, published); diff != "" {
		t.Errorf("published generations (-want +got):\n%s", diff)
	}
	if a.Generation() != 2 {
		t.Errorf("Generation() = %d", a.Generation())
	}
}

func TestObserver(t *testing.T) {
	ca := testenv.NewCA(t, "root")
	der := leafDER(t, ca, 1, clientID)
	var cached []bool
	a := newTest(t, &fakeDecider{allowed: map[string]bool{clientID: true}},
		WithObserver(func(c bool, took time.Duration) {
			if took <= 0 {
				t.Errorf("non-positive duration %v", took)
			}
			cached = append(cached, c)
		}))
	a.decide(der, nil)
	a.decide(der, nil)
	a.decide([]byte("garbage"), nil)
	if diff := cmp.Diff([]bool{false, true, false}, cached); diff != "" {
		t.Errorf("observed cached flags (-want +got):\n%s", diff)
	}
}
