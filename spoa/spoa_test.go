package spoa

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
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
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/haproxy-connect/haproxy-connect/authzgen"
	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/scrape"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

const (
	// testTD is the trust domain newTest's Authorizer trusts.
	testTD   = "11111111-2222-3333-4444-555555555555.consul"
	webID    = "spiffe://" + testTD + "/ns/default/dc/dc1/svc/web"
	clientID = "spiffe://" + testTD + "/ns/default/dc/dc1/svc/client"
)

// testCA is the CA newTest's Authorizer trusts, shared by the tests of a
// run (making a key per test would cost more than the tests).
var testCA = sync.OnceValue(func() *testenv.CA {
	ca, err := testenv.GenerateCA("root")
	if err != nil {
		panic(err)
	}
	return ca
})

// leafDER issues a leaf from ca with the given URI SANs (any number).
func leafDER(t testing.TB, ca *testenv.CA, serial int64, uris ...string) []byte {
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

func pemDER(t testing.TB, certPEM string) []byte {
	t.Helper()
	b, _ := pem.Decode([]byte(certPEM))
	if b == nil {
		t.Fatal("no PEM block")
	}
	return b.Bytes
}

func TestParseIdentity(t *testing.T) {
	ca := testCA()
	consulLike := pemDER(t, func() string { c, _ := ca.Leaf(t, clientID); return c }())
	parsed, err := x509.ParseCertificate(consulLike)
	if err != nil {
		t.Fatal(err)
	}
	type id struct{ URI, Serial string }
	tests := []struct {
		name    string
		der     []byte
		want    id
		wantErr error
	}{
		{"consul-like leaf", consulLike, id{clientID, hexSerial(parsed.SerialNumber.Bytes())}, nil},
		{"serial is colon hex", leafDER(t, ca, 0x0a1b2c, webID), id{webID, "0a:1b:2c"}, nil},
		{"no URI SAN: checked later", leafDER(t, ca, 2), id{"", "02"}, nil},
		{"two URI SANs: checked later", leafDER(t, ca, 3, clientID, webID), id{"", "03"}, nil},
		{"empty", nil, id{}, errNoCert},
		{"garbage", []byte("not a certificate"), id{}, errBadCert},
		{"truncated", consulLike[:len(consulLike)/2], id{}, errBadCert},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, cert, err := parseIdentity(tt.der)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("error %v, want %v", err, tt.wantErr)
			}
			if diff := cmp.Diff(tt.want, id{got.uri, got.serial}); diff != "" {
				t.Errorf("identity (-want +got):\n%s", diff)
			}
			if err == nil && (cert == nil || got.sum != sha256.Sum256(tt.der)) {
				t.Errorf("certificate %v, sum %x: want the parsed certificate and the DER's SHA-256", cert, got.sum)
			}
		})
	}
}

// TestCheckCert: what the agent refuses by itself, before asking Consul.
func TestCheckCert(t *testing.T) {
	ca := testCA()
	inter := ca.Intermediate(t, "intermediate")
	other := testenv.NewCA(t, "other")
	trusted, err := newTrust(testTD, []*x509.Certificate{ca.Cert}, nil)
	if err != nil {
		t.Fatal(err)
	}
	withInter, err := newTrust(testTD, []*x509.Certificate{ca.Cert}, []*x509.Certificate{inter.Cert})
	if err != nil {
		t.Fatal(err)
	}
	serverOnly := func() []byte {
		u, _ := url.Parse(clientID)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(99), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			URIs: []*url.URL{u}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, ca.Cert.PublicKey, ca.Key)
		if err != nil {
			t.Fatal(err)
		}
		return der
	}()
	// A service leaf valid from notBefore to notAfter, from now.
	leafFor := func(signer *testenv.CA, serial int64, notBefore, notAfter time.Duration) []byte {
		u, _ := url.Parse(clientID)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), NotBefore: time.Now().Add(notBefore), NotAfter: time.Now().Add(notAfter),
			URIs: []*url.URL{u}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, AuthorityKeyId: signer.Cert.SubjectKeyId}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, signer.Cert, signer.Key.Public(), signer.Key)
		if err != nil {
			t.Fatal(err)
		}
		return der
	}
	tests := []struct {
		name  string
		der   []byte
		trust *trust
		want  error // nil: passes to Consul
	}{
		// HAProxy checked the validity period at the handshake; the
		// agent also decides for connections made earlier, and sessions
		// resumed from an earlier handshake.
		{"leaf expired since", leafFor(ca, 20, -2*time.Hour, -time.Hour), trusted, nil},
		{"leaf of an intermediate, expired since", leafFor(inter, 21, -2*time.Hour, -time.Hour), withInter, nil},
		{"another CA, leaf expired", leafFor(other, 22, -2*time.Hour, -time.Hour), trusted, errChain},
		{"service leaf", leafDER(t, ca, 1, clientID), trusted, nil},
		{"service leaf in a partition", leafDER(t, ca, 2, "spiffe://"+testTD+"/ap/team/ns/default/dc/dc1/svc/client"), trusted, nil},
		{"leaf of an intermediate", leafDER(t, inter, 3, clientID), withInter, nil},
		{"roots not known yet", leafDER(t, ca, 4, clientID), nil, errNoRoots},
		{"no URI SAN", leafDER(t, ca, 5), trusted, errURISANs},
		{"two URI SANs", leafDER(t, ca, 6, clientID, webID), trusted, errURISANs},
		{"two URI SANs, the same twice", leafDER(t, ca, 7, clientID, clientID), trusted, errURISANs},
		{"not spiffe", leafDER(t, ca, 8, "https://"+testTD+"/ns/default/dc/dc1/svc/client"), trusted, errNotSPIFFE},
		{"no trust domain", leafDER(t, ca, 9, "spiffe:///ns/default/dc/dc1/svc/client"), trusted, errNotSPIFFE},
		{"query", leafDER(t, ca, 10, clientID+"?x=1"), trusted, errNotSPIFFE},
		{"another trust domain", leafDER(t, ca, 11, "spiffe://22222222-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/client"), trusted, errTrustDomain},
		{"trust domain in upper case", leafDER(t, ca, 12, "spiffe://"+strings.ToUpper(testTD)+"/ns/default/dc/dc1/svc/client"), trusted, errTrustDomain},
		{"agent identity", leafDER(t, ca, 13, "spiffe://"+testTD+"/agent/client/dc/dc1/id/node-1"), trusted, errNotService},
		{"mesh gateway identity", leafDER(t, ca, 14, "spiffe://"+testTD+"/gateway/mesh/dc/dc1"), trusted, errNotService},
		{"service path with a trailing part", leafDER(t, ca, 15, clientID+"/x"), trusted, errNotService},
		{"trust domain only", leafDER(t, ca, 16, "spiffe://"+testTD+"/"), trusted, errNotService},
		{"another CA", leafDER(t, other, 17, clientID), trusted, errChain},
		{"leaf of an intermediate Consul does not list", leafDER(t, inter, 18, clientID), trusted, errChain},
		{"server auth only", serverOnly, trusted, errChain},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, cert, err := parseIdentity(tt.der)
			if err != nil {
				t.Fatal(err)
			}
			// The same outcome whether HAProxy's verification is relied
			// on or not (served.go): what the agent skips then is only
			// a signature check HAProxy made.
			for _, handshake := range []bool{false, true} {
				got := checkCert(cert, newRemembered(id, cert, certs.ParseSPIFFE).svcErr, tt.trust, time.Now(), handshake, nil)
				if !errors.Is(got, tt.want) || (got == nil) != (tt.want == nil) {
					t.Errorf("checkCert (handshake verified: %v): %v, want %v", handshake, got, tt.want)
				}
			}
		})
	}
}

// TestRefusalsAreCachedAndLogged: a refused certificate is denied without
// a Consul call, the deny is cached for that certificate, and the log line
// and the counter name the reason.
func TestRefusalsAreCachedAndLogged(t *testing.T) {
	ca := testCA()
	core, logs := observer.New(zapcore.DebugLevel)
	f := &fakeDecider{allowed: map[string]bool{clientID: true}}
	a := New("web", f, zap.New(core))
	t.Cleanup(func() { a.Close() })
	agentID := "spiffe://" + testTD + "/agent/client/dc/dc1/id/node-1"
	otherTD := "spiffe://other.consul/ns/default/dc/dc1/svc/client"
	certs := map[string][]byte{
		"agent":        leafDER(t, ca, 1, agentID),
		"trust_domain": leafDER(t, ca, 2, otherTD),
		"uri_sans":     leafDER(t, ca, 3, clientID, webID),
		"chain":        leafDER(t, testenv.NewCA(t, "other"), 4, clientID),
		"allowed":      leafDER(t, ca, 5, clientID),
	}
	// No roots yet: undecided, nothing cached, nobody asked.
	if d := a.decide(certs["allowed"], nil); !d.undecided || !errors.Is(d.err, errNoRoots) {
		t.Fatalf("before the roots: %+v, want undecided (%v)", d, errNoRoots)
	}
	if err := a.SetRoots(testTD, []*x509.Certificate{ca.Cert}, nil); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		cert       string
		wantSource string
		wantReason string
		allowed    bool
	}{
		{"agent", agentID, "SPIFFE ID is not a service identity", false},
		{"trust_domain", otherTD, "SPIFFE ID of another trust domain: \"other.consul\", the cluster's is \"" + testTD + "\"", false},
		{"uri_sans", noSource, "not exactly one URI SAN: 2 (" + clientID + ", " + webID + ")", false},
		{"chain", clientID, "certificate does not verify against the CA roots", false},
		{"allowed", clientID, "Matched L4 intention", true},
	}
	for round, how := range []origin{originCall, originCache} {
		for _, tt := range tests {
			logs.TakeAll()
			d := a.decide(certs[tt.cert], nil)
			if d.allowed != tt.allowed || d.undecided || d.err != nil || d.how != how || d.source != tt.wantSource || !strings.HasPrefix(d.reason, tt.wantReason) {
				t.Errorf("round %d, %s: %+v; want allowed=%v from %v, source %q, reason %q...", round, tt.cert, d, tt.allowed, how, tt.wantSource, tt.wantReason)
			}
			entries := logs.FilterMessage("inbound connection decision").All()
			if len(entries) != 1 || !strings.HasPrefix(entries[0].ContextMap()["reason"].(string), tt.wantReason) {
				t.Errorf("round %d, %s: log lines %v, want one with reason %q...", round, tt.cert, entries, tt.wantReason)
			}
		}
	}
	if n := f.nCalls(); n != 1 {
		t.Errorf("%d Consul calls, want 1 (the allowed certificate's)", n)
	}
	st := a.Stats()
	want := map[string]uint64{"uri_sans": 2, "not_spiffe": 0, "trust_domain": 2, "not_service": 2, "chain": 2}
	if diff := cmp.Diff(want, st.Refused); diff != "" {
		t.Errorf("refused counters (-want +got):\n%s", diff)
	}
	if st.CacheEntries != 5 {
		t.Errorf("%d cache entries, want 5", st.CacheEntries)
	}
}

// TestSetRoots: a change of the roots or the trust domain drops the cache;
// the same roots again do not; bad input is refused and the trust stays.
func TestSetRoots(t *testing.T) {
	ca, other := testCA(), testenv.NewCA(t, "other")
	f := &fakeDecider{allowed: map[string]bool{clientID: true}}
	a := newTest(t, f)
	der := leafDER(t, ca, 1, clientID)
	steps := []struct {
		name      string
		td        string
		roots     []*x509.Certificate
		wantErr   bool
		wantGen   uint64
		wantAllow bool
	}{
		{"same roots", testTD, []*x509.Certificate{ca.Cert}, false, 0, true},
		{"a second root", testTD, []*x509.Certificate{ca.Cert, other.Cert}, false, 1, true},
		{"the first root removed", testTD, []*x509.Certificate{other.Cert}, false, 2, false},
		{"no roots", testTD, nil, true, 2, false},
		{"bad trust domain", "a b\n", []*x509.Certificate{ca.Cert}, true, 2, false},
		{"a leaf as root", testTD, []*x509.Certificate{mustParse(t, der)}, true, 2, false},
		{"back, under another trust domain", "other.consul", []*x509.Certificate{ca.Cert}, false, 3, false},
	}
	a.decide(der, nil)
	for _, s := range steps {
		err := a.SetRoots(s.td, s.roots, nil)
		if (err != nil) != s.wantErr {
			t.Errorf("%s: SetRoots: %v, want error %v", s.name, err, s.wantErr)
		}
		if g := a.Generation(); g != s.wantGen {
			t.Errorf("%s: generation %d, want %d", s.name, g, s.wantGen)
		}
		if d := a.decide(der, nil); d.allowed != s.wantAllow {
			t.Errorf("%s: %+v, want allowed=%v", s.name, d, s.wantAllow)
		}
	}
}

func mustParse(t *testing.T, der []byte) *x509.Certificate {
	t.Helper()
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
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

// newTest is an Authorizer for "web" that trusts testCA in testTD.
func newTest(t *testing.T, d Decider, opts ...Option) *Authorizer {
	t.Helper()
	a := New("web", d, zaptest.NewLogger(t), opts...)
	t.Cleanup(func() { a.Close() })
	if err := a.SetRoots(testTD, []*x509.Certificate{testCA().Cert}, nil); err != nil {
		t.Fatal(err)
	}
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
	ca := testCA()
	client := leafDER(t, ca, 100, clientID)
	client2 := leafDER(t, ca, 101, clientID) // renewed leaf: new serial, new key
	other := leafDER(t, ca, 102, "spiffe://"+testTD+"/ns/default/dc/dc1/svc/other")
	agentID := "spiffe://" + testTD + "/agent/client/dc/dc1/id/n1"
	agent := leafDER(t, ca, 104, agentID)

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
		{name: "deny from consul", der: other, want: result{Source: "spiffe://" + testTD + "/ns/default/dc/dc1/svc/other", How: originCall}, wantCalls: 3},
		{name: "deny is cached", der: other, want: result{Source: "spiffe://" + testTD + "/ns/default/dc/dc1/svc/other", How: originCache}, wantCalls: 3},
		{name: "no cert asks nobody", der: nil, argErr: errNoCert, want: result{Source: "-", Err: "no client certificate"}, wantCalls: 3},
		{name: "garbage asks nobody", der: []byte{0x30, 0x03, 1, 2, 3}, want: result{Source: "-", Err: "unparsable client certificate"}, wantCalls: 3},
		{name: "no URI asks nobody", der: leafDER(t, ca, 103), want: result{Source: "-", How: originCall}, wantCalls: 3},
		{name: "agent identity asks nobody", der: agent, want: result{Source: agentID, How: originCall}, wantCalls: 3},
		{name: "and is cached", der: agent, want: result{Source: agentID, How: originCache}, wantCalls: 3},
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
	wantStats := Stats{Allowed: 4, Denied: 8, Undecided: 1, CacheHits: 3, ConsulCalls: 6, Errors: 3, Invalidations: 2, Generation: 2, CacheEntries: 1, ChainVerifications: 3,
		Refused: map[string]uint64{"uri_sans": 1, "not_spiffe": 0, "trust_domain": 0, "not_service": 2, "chain": 0}}
	if diff := cmp.Diff(wantStats, a.Stats()); diff != "" {
		t.Errorf("stats (-want +got):\n%s", diff)
	}
	if want := "web " + clientID + " 64"; f.calls[0] != want {
		t.Errorf("first call %q, want %q", f.calls[0], want)
	}
}

func TestSingleFlight(t *testing.T) {
	ca := testCA()
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
	ca := testCA()
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
	ca := testCA()
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
	ca := testCA()
	a := newTest(t, &fakeDecider{panics: true})
	if d := a.decide(leafDER(t, ca, 1, clientID), nil); d.allowed || !d.undecided || d.err == nil {
		t.Errorf("got %+v, want undecided with an error", d)
	}
}

func TestCacheBound(t *testing.T) {
	ca := testCA()
	f := &fakeDecider{allowed: map[string]bool{}}
	a := newTest(t, f, WithCacheSize(3))
	var ders [][]byte
	for i := range 10 {
		id := fmt.Sprintf("spiffe://"+testTD+"/ns/default/dc/dc1/svc/s%d", i)
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
	ca := testCA()
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
	ca := testCA()
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

// authorizeMessage encodes a NOTIFY payload holding one authorize
// message with the client certificate der.
func authorizeMessage(der []byte) []byte {
	b := append(putString(nil, authzgen.Message), 1)
	return putString(append(putString(b, authzgen.ArgCert), typeBinary), string(der))
}

// httpAuthorizeMessage is authorizeMessage as an HTTP listener sends it
// (authzgen.ArgL7 true).
func httpAuthorizeMessage(der []byte) []byte {
	b := append(putString(nil, authzgen.Message), 2)
	b = append(putString(b, authzgen.ArgL7), typeBool|flagTrue)
	return putString(append(putString(b, authzgen.ArgCert), typeBinary), string(der))
}

// namedAuthorizeMessage is authorizeMessage as a tcp listener with a
// sources map sends it: authzgen.ArgNamed carries the name the map holds,
// NULL for none.
func namedAuthorizeMessage(der []byte, name string) []byte {
	b := append(putString(nil, authzgen.Message), 2)
	b = putString(append(putString(b, authzgen.ArgCert), typeBinary), string(der))
	b = putString(b, authzgen.ArgNamed)
	if name == "" {
		return append(b, typeNull)
	}
	return putTypedString(b, name)
}

// TestSourceHook: an allow whose listener's sources map has no name for
// the certificate hands its SHA-256 and SPIFFE ID to the hook (the
// controller adds the name); an allow the map names already, a deny, a
// certificate that cannot be read, and a listener without such a map (an
// HTTP listener's own rules write it) do not.
func TestSourceHook(t *testing.T) {
	ca := testCA()
	allowed := leafDER(t, ca, 1, clientID)
	denied := leafDER(t, ca, 2, "spiffe://"+testTD+"/ns/default/dc/dc1/svc/intruder")
	type named struct {
		cert   [32]byte
		source string
	}
	var got []named
	a := newTest(t, &fakeDecider{allowed: map[string]bool{clientID: true}},
		WithSourceHook(func(cert [32]byte, source string) { got = append(got, named{cert, source}) }))
	for _, tt := range []struct {
		name    string
		payload []byte
		want    []named
	}{
		{"allow, unnamed", namedAuthorizeMessage(allowed, ""), []named{{sha256.Sum256(allowed), clientID}}},
		{"allow from the cache, unnamed", namedAuthorizeMessage(allowed, ""), []named{{sha256.Sum256(allowed), clientID}}},
		{"allow, named", namedAuthorizeMessage(allowed, clientID), nil},
		{"deny, unnamed", namedAuthorizeMessage(denied, ""), nil},
		{"unreadable certificate", namedAuthorizeMessage([]byte("garbage"), ""), nil},
		{"no sources map (tcp)", authorizeMessage(allowed), nil},
		{"http listener", httpAuthorizeMessage(allowed), nil},
	} {
		got = nil
		a.handle(tt.payload)
		if diff := cmp.Diff(tt.want, got, cmp.AllowUnexported(named{})); diff != "" {
			t.Errorf("%s: hook calls (-want +got):\n%s", tt.name, diff)
		}
	}
}

// TestDecisionTime: every message the agent answers is timed in
// haproxy_connect_authz_decision_seconds, cached, uncached, refused and
// L7 alike; a message it does not handle is not.
func TestDecisionTime(t *testing.T) {
	ca := testCA()
	der := leafDER(t, ca, 1, clientID)
	a := newTest(t, &fakeDecider{allowed: map[string]bool{clientID: true}})
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(a.Collector())
	samples := func() uint64 {
		t.Helper()
		f, err := scrape.Gather(reg)
		if err != nil {
			t.Fatal(err)
		}
		bs, err := f.Histogram("haproxy_connect_authz_decision_seconds")
		if err != nil {
			t.Fatal(err)
		}
		// The +Inf bucket counts every sample; the last finite one no more.
		n, last := bs[len(bs)-1].Count, bs[len(bs)-2].Count
		if last > n {
			t.Errorf("last bucket %v above the sample count %v", last, n)
		}
		return uint64(n)
	}
	for _, tt := range []struct {
		name    string
		payload []byte
		counted bool
	}{
		{"uncached", authorizeMessage(der), true},
		{"cached", authorizeMessage(der), true},
		{"unreadable certificate", authorizeMessage([]byte("garbage")), true},
		{"l7 request", l7Message(clientID, "GET", "/", hdrsBin()), true},
		{"another message", append(putString(nil, "not-ours"), 0), false},
	} {
		before := samples()
		a.handle(tt.payload)
		if got := samples() - before; got != map[bool]uint64{true: 1}[tt.counted] {
			t.Errorf("%s: %d samples added, want counted=%v", tt.name, got, tt.counted)
		}
	}
}

// TestRaiseGeneration: after adopting a HAProxy that holds generation 7,
// the agent publishes and decides above it, drops what it cached, and a
// floor below its own generation changes nothing.
func TestRaiseGeneration(t *testing.T) {
	ca := testCA()
	der := leafDER(t, ca, 1, clientID)
	var published []uint64
	a := newTest(t, &fakeDecider{allowed: map[string]bool{clientID: true}},
		WithInvalidateHook(func(gen uint64) { published = append(published, gen) }))
	a.Invalidate() // the first intentions answer
	if d := a.decide(der, nil); d.gen != 1 || d.how != originCall {
		t.Fatalf("first decision: gen %d how %v", d.gen, d.how)
	}
	a.RaiseGeneration(7)
	if d := a.decide(der, nil); d.gen != 8 || d.how != originCall {
		t.Errorf("after the raise: gen %d how %v, want 8 from a new call", d.gen, d.how)
	}
	a.RaiseGeneration(3)
	a.Invalidate()
	if diff := cmp.Diff([]uint64{1, 8, 9}, published); diff != "" {
		t.Errorf("published generations (-want +got):\n%s", diff)
	}
}
