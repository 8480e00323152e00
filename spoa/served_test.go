package spoa

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"math/big"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/haproxy-connect/haproxy-connect/intentions"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// TestServedRoots: when the agent may rely on HAProxy's verification of a
// client certificate, through starts, reloads and adoptions.
func TestServedRoots(t *testing.T) {
	a, b := testCA(), testenv.NewCA(t, "second")
	sum := func(c *testenv.CA) [32]byte { return sha256.Sum256(c.Cert.Raw) }
	set := func(cs ...*testenv.CA) map[[32]byte]bool {
		m := map[[32]byte]bool{}
		for _, c := range cs {
			m[sum(c)] = true
		}
		return m
	}
	trustOf := func(cs ...*testenv.CA) *trust {
		var roots []*x509.Certificate
		for _, c := range cs {
			roots = append(roots, c.Cert)
		}
		tr, err := newTrust(testTD, roots, nil)
		if err != nil {
			t.Fatal(err)
		}
		return tr
	}
	t0 := time.Unix(1_800_000_000, 0)
	const grace = time.Minute
	type announce struct {
		roots map[[32]byte]bool
		fresh bool
		at    time.Duration // after t0
	}
	tests := []struct {
		name      string
		announces []announce
		trust     *trust
		at        time.Duration
		want      bool
	}{
		{"nothing announced", nil, trustOf(a), 0, false},
		{"started with the agent's roots", []announce{{set(a), true, 0}}, trustOf(a), 0, true},
		{"started with a subset of the agent's roots", []announce{{set(a), true, 0}}, trustOf(a, b), 0, true},
		{"HAProxy holds a root the agent does not trust", []announce{{set(a, b), true, 0}}, trustOf(a), 0, false},
		{"reload added a root", []announce{{set(a), true, 0}, {set(a, b), false, 0}}, trustOf(a, b), 0, true},
		{"reload removed a root: the old worker may hold it", []announce{{set(a, b), true, 0}, {set(b), false, 0}}, trustOf(b), grace - time.Second, false},
		{"reload removed a root: the old worker is gone", []announce{{set(a, b), true, 0}, {set(b), false, 0}}, trustOf(b), grace, true},
		{"root back before the old worker left", []announce{{set(a, b), true, 0}, {set(b), false, 0}, {set(a, b), false, time.Second}}, trustOf(a, b), 2 * time.Second, true},
		{"adopted: older workers unknown", []announce{{set(a), false, 0}}, trustOf(a), grace - time.Second, false},
		{"adopted, after the grace", []announce{{set(a), false, 0}}, trustOf(a), grace, true},
		{"restarted after a crash: nothing else runs", []announce{{set(a), false, 0}, {set(a), true, time.Second}}, trustOf(a), time.Second, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := servedRoots{grace: grace}
			for _, an := range tt.announces {
				s.announce(an.roots, an.fresh, t0.Add(an.at))
			}
			if got := s.handshakeVerified(tt.trust, t0.Add(tt.at)); got != tt.want {
				t.Errorf("handshakeVerified = %v, want %v", got, tt.want)
			}
		})
	}
}

// TestHandshakeVerifiedDecisions: with HAProxy's roots announced, a
// certificate never seen is decided without the agent verifying its chain;
// one from an issuer the agent does not trust is still verified (and
// refused); a PEM that does not parse puts the agent back on verifying
// every chain.
func TestHandshakeVerifiedDecisions(t *testing.T) {
	ca, other := testCA(), testenv.NewCA(t, "other")
	a := New("web", nil, nil)
	defer a.Close()
	if err := a.SetRoots(testTD, []*x509.Certificate{ca.Cert}, nil); err != nil {
		t.Fatal(err)
	}
	set, _ := intentions.New(destination("web"), nil, intentions.Default{Allow: true, Reason: "default allow"})
	a.SetIntentions(set)
	verifications := func() uint64 { return a.Stats().ChainVerifications }
	decide := func(der []byte) decision {
		t.Helper()
		return a.decide(der, nil)
	}

	if d := decide(leafDER(t, ca, 1, clientID)); !d.allowed || verifications() != 1 {
		t.Fatalf("nothing announced: %+v, %d verifications; want allowed after 1", d, verifications())
	}
	if err := a.RootsServed(ca.CertPEM, true); err != nil {
		t.Fatal(err)
	}
	if d := decide(leafDER(t, ca, 2, clientID)); !d.allowed || verifications() != 1 {
		t.Fatalf("roots announced: %+v, %d verifications; want allowed with none more", d, verifications())
	}
	if d := decide(leafDER(t, other, 3, clientID)); d.allowed || !strings.Contains(d.reason, errChain.Error()) || verifications() != 2 {
		t.Fatalf("another issuer: %+v, %d verifications; want refused (chain) after a verification", d, verifications())
	}
	// A certificate of another CA naming the trusted root as its issuer
	// is HAProxy's to refuse at the handshake: the agent, relying on that
	// verification, does not check the signature. This pins the trade.
	forged := forgedIssuerDER(t, other, ca, 4)
	if d := decide(forged); !d.allowed || verifications() != 2 {
		t.Fatalf("forged issuer with handshake verification relied on: %+v, %d verifications", d, verifications())
	}
	if err := a.RootsServed("not a PEM", true); err == nil {
		t.Fatal("a bad PEM was accepted")
	}
	if d := decide(forgedIssuerDER(t, other, ca, 5)); d.allowed || verifications() != 3 {
		t.Fatalf("forged issuer, served roots unknown: %+v, %d verifications; want refused after a verification", d, verifications())
	}
}

// forgedIssuerDER is a leaf signed by signer whose AuthorityKeyId names
// named's key.
func forgedIssuerDER(t *testing.T, signer, named *testenv.CA, serial int64) []byte {
	t.Helper()
	u, _ := url.Parse(clientID)
	parent := *signer.Cert
	parent.SubjectKeyId = named.Cert.SubjectKeyId
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		URIs: []*url.URL{u}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, &parent, signer.Cert.PublicKey, signer.Key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil || string(c.AuthorityKeyId) != string(named.Cert.SubjectKeyId) || len(c.AuthorityKeyId) == 0 {
		t.Fatalf("forged leaf: %v, AKI %x", err, c.AuthorityKeyId)
	}
	return der
}
