package spoa

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"math/big"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/cryptobyte"
	cbasn1 "golang.org/x/crypto/cryptobyte/asn1"

	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// checkLeafAgainstX509 is the contract of parseLeaf (leaf.go), on one DER
// input: when parseLeaf reads it, x509.ParseCertificate accepts it too and
// parses the same fields; and the agent's check of the certificate
// (checkRemembered, on what readCert remembers) answers what checkCert
// answers on x509's parse, whether HAProxy's verification is relied on or
// not. It reports whether parseLeaf read der.
func checkLeafAgainstX509(t *testing.T, der []byte, tr *trust, now time.Time) bool {
	t.Helper()
	l, ok := parseLeaf(der)
	cert, err := x509.ParseCertificate(der)
	if !ok {
		if l.uri != "" || l.serial != nil || l.authorityKeyID != nil {
			t.Errorf("declined, but fields set: %+v", l)
		}
		return false
	}
	if err != nil {
		t.Fatalf("parseLeaf read a certificate x509 refuses (%v): %+v", err, l)
	}
	want := leafOf(cert)
	if !bytes.Equal(l.serial, want.serial) || l.uri != want.uri || l.host != want.host ||
		!bytes.Equal(l.authorityKeyID, want.authorityKeyID) || !l.notBefore.Equal(want.notBefore) ||
		!l.notAfter.Equal(want.notAfter) || l.clientAuth != want.clientAuth {
		t.Fatalf("parseLeaf read\n%+v\nx509 parsed\n%+v", l, want)
	}
	if len(cert.UnhandledCriticalExtensions) > 0 {
		t.Fatalf("parseLeaf read a certificate with unhandled critical extensions %v", cert.UnhandledCriticalExtensions)
	}
	sum := sha256.Sum256(der)
	r, err := readCert(der, sum, certs.ParseSPIFFE)
	if err != nil || r.leaf == nil || r.cert != nil {
		t.Fatalf("readCert: %v, leaf %v, x509 parse %v: want the leaf read", err, r.leaf, r.cert)
	}
	id, _, err := parseIdentitySum(der, sum)
	if err != nil || id != r.id {
		t.Fatalf("identity %+v, x509's %+v (%v)", r.id, id, err)
	}
	for _, fast := range []bool{false, true} {
		got := checkRemembered(r, tr, now, fast, nil)
		want := checkCert(cert, newRemembered(id, cert, certs.ParseSPIFFE).svcErr, tr, now, fast, nil)
		if (got == nil) != (want == nil) || (got != nil && got.Error() != want.Error()) {
			t.Fatalf("handshake verified %v: checked from the leaf read: %v; from x509's parse: %v", fast, got, want)
		}
	}
	return true
}

// TestParseLeafMatchesX509: which certificates parseLeaf reads (a real
// Consul leaf among them: the fast path is the common one) and which it
// leaves to x509, and that what it reads is x509's parse.
func TestParseLeafMatchesX509(t *testing.T) {
	ca := testCA()
	inter := ca.Intermediate(t, "intermediate")
	consulLeaf := pemDER(t, readFile(t, "testdata/consul-leaf.pem"))
	consulRoot, err := x509.ParseCertificate(pemDER(t, readFile(t, "testdata/consul-root.pem")))
	if err != nil {
		t.Fatal(err)
	}
	consulLike := pemDER(t, func() string { c, _ := ca.Leaf(t, clientID); return c }())
	leaf := leafDER(t, ca, 7, clientID)
	tmpl := func(mod func(*x509.Certificate)) []byte { return issue(t, ca, mod) }
	tests := []struct {
		name string
		der  []byte
		// read: parseLeaf reads it; x509: x509.ParseCertificate does.
		read, x509 bool
	}{
		{"Consul 1.22 leaf", consulLeaf, true, true},
		{"Consul-like leaf", consulLike, true, true},
		{"test leaf", leaf, true, true},
		{"serial is colon hex", leafDER(t, ca, 0x0a1b2c, clientID), true, true},
		{"serial with the high bit set", leafDER(t, ca, 0x80, clientID), true, true},
		{"serial of 20 bytes", tmpl(func(c *x509.Certificate) { c.SerialNumber = new(big.Int).SetBytes(bytes.Repeat([]byte{0xfe}, 20)) }), true, true},
		{"serial zero", editTBS(t, leaf, func(tbs, exts [][]byte) ([][]byte, [][]byte) { return put(tbs, 1, tlv(0x02, 0)), exts }), true, true},
		{"partition", leafDER(t, ca, 2, "spiffe://"+testTD+"/ap/team/ns/default/dc/dc1/svc/client"), true, true},
		{"leaf of an intermediate", leafDER(t, inter, 3, clientID), true, true},
		{"server auth only", tmpl(func(c *x509.Certificate) { c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth} }), true, true},
		{"no extended key usage", tmpl(func(c *x509.Certificate) { c.ExtKeyUsage = nil }), true, true},
		{"any extended key usage", tmpl(func(c *x509.Certificate) { c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageAny} }), true, true},
		{"empty extended key usage", editExt(t, leaf, 0x25, func([]byte) []byte { return ext(0x25, false, seq()) }), true, true},
		{"key usage, basic constraints, key ids", tmpl(func(c *x509.Certificate) {
			c.KeyUsage, c.BasicConstraintsValid, c.SubjectKeyId = x509.KeyUsageDigitalSignature, true, []byte{1, 2, 3}
		}), true, true},
		{"P-384 key", tmpl(func(c *x509.Certificate) { c.PublicKey = mustKey(t, elliptic.P384()).Public() }), true, true},
		{"not after 2050: GeneralizedTime", tmpl(func(c *x509.Certificate) { c.NotAfter = time.Date(2051, 1, 2, 3, 4, 5, 0, time.UTC) }), true, true},
		{"not before 1999", tmpl(func(c *x509.Certificate) { c.NotBefore = time.Date(1999, 1, 2, 3, 4, 5, 0, time.UTC) }), true, true},
		{"critical marked FALSE explicitly", editExt(t, leaf, 0x25, func(e []byte) []byte { return withCritical(t, e, 0x00) }), true, true},

		// Left to x509, which accepts them.
		{"CA certificate (no SAN)", ca.Cert.Raw, false, true},
		{"Consul root", consulRoot.Raw, false, true},
		{"no URI SAN", leafDER(t, ca, 5), false, true},
		{"two URI SANs", leafDER(t, ca, 6, clientID, webID), false, true},
		{"DNS SAN besides the URI", tmpl(func(c *x509.Certificate) { c.DNSNames = []string{"web.example"} }), false, true},
		{"trust domain in upper case", leafDER(t, ca, 12, "spiffe://"+strings.ToUpper(testTD)+"/ns/default/dc/dc1/svc/client"), false, true},
		{"URI with a query", leafDER(t, ca, 10, clientID+"?x=1"), false, true},
		{"URI with an escape", leafDER(t, ca, 10, clientID+"%2f"), false, true},
		{"URI without a host", leafDER(t, ca, 9, "spiffe:///ns/default/dc/dc1/svc/client"), false, true},
		{"URI without a path", leafDER(t, ca, 9, "spiffe://"+testTD), false, true},
		{"https URI", leafDER(t, ca, 8, "https://"+testTD+"/ns/default/dc/dc1/svc/client"), false, true},
		{"code signing usage", tmpl(func(c *x509.Certificate) { c.ExtKeyUsage = append(c.ExtKeyUsage, x509.ExtKeyUsageCodeSigning) }), false, true},
		{"unknown usage", tmpl(func(c *x509.Certificate) { c.UnknownExtKeyUsage = []asn1.ObjectIdentifier{{1, 2, 3}} }), false, true},
		{"unknown critical extension", tmpl(func(c *x509.Certificate) {
			c.ExtraExtensions = []pkix.Extension{{Id: asn1.ObjectIdentifier{1, 2, 3, 4}, Critical: true, Value: []byte{5, 0}}}
		}), false, true},
		{"unknown extension", tmpl(func(c *x509.Certificate) {
			c.ExtraExtensions = []pkix.Extension{{Id: asn1.ObjectIdentifier{1, 2, 3, 4}, Value: []byte{5, 0}}}
		}), false, true},
		{"certificate policies", tmpl(func(c *x509.Certificate) { c.Policies = []x509.OID{mustOID(t, "1.2.3")} }), false, true},
		{"RSA key", tmpl(func(c *x509.Certificate) { c.PublicKey = rsaKey(t).Public() }), false, true},
		{"subject with an IA5String", tmpl(func(c *x509.Certificate) {
			c.Subject.ExtraNames = []pkix.AttributeTypeAndValue{{Type: asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 9, 1}, Value: "a@b"}}
		}), false, true},
		{"authority key id with issuer and serial", editExt(t, leaf, 0x23, func([]byte) []byte { return ext(0x23, false, seq(tlv(0x80, 1, 2), tlv(0x82, 5))) }), false, true},
		{"basic constraints with a path length", withExt(t, leaf, 0x13, true, seq(tlv(0x01, 0xff), tlv(0x02, 0))), false, true},
		{"trailing bytes in the TBS", editTBS(t, leaf, func(tbs, exts [][]byte) ([][]byte, [][]byte) { return tbs, append(exts, nil) }), false, true},
		{"version 1", editTBS(t, leaf, func(tbs, _ [][]byte) ([][]byte, [][]byte) { return tbs[1:], nil }), false, true},
		{"unique identifier", editTBS(t, leaf, func(tbs, exts [][]byte) ([][]byte, [][]byte) { return append(tbs, tlv(0x81, 0, 1)), exts }), false, true},

		// Refused by both.
		{"duplicate extended key usage", withExt(t, leaf, 0x25, false, seq(tlv(0x06, ekuClientAuth...))), false, false},
		{"duplicate SAN", withExt(t, leaf, 0x11, false, seq(tlv(0x86, []byte(webID)...))), false, false},
		{"critical authority key id", editExt(t, leaf, 0x23, func(e []byte) []byte { return withCritical(t, e, 0xff) }), false, false},
		{"critical subject key id", withExt(t, leaf, 0x0e, true, tlv(0x04, 1, 2, 3)), false, false},
		{"critical encoded as 0x01", editExt(t, leaf, 0x25, func(e []byte) []byte { return withCritical(t, e, 0x01) }), false, false},
		{"empty", nil, false, false},
		{"truncated", leaf[:len(leaf)/2], false, false},
		{"one byte short", leaf[:len(leaf)-1], false, false},
		{"trailing byte", append(bytes.Clone(leaf), 0), false, false},
		{"serial as an OCTET STRING", editTBS(t, leaf, func(tbs, exts [][]byte) ([][]byte, [][]byte) { return put(tbs, 1, tlv(0x04, 7)), exts }), false, false},
		{"negative serial", editTBS(t, leaf, func(tbs, exts [][]byte) ([][]byte, [][]byte) { return put(tbs, 1, tlv(0x02, 0xf9)), exts }), false, false},
		{"serial not minimal", editTBS(t, leaf, func(tbs, exts [][]byte) ([][]byte, [][]byte) { return put(tbs, 1, tlv(0x02, 0, 7)), exts }), false, false},
		{"version 4", editTBS(t, leaf, func(tbs, exts [][]byte) ([][]byte, [][]byte) { return put(tbs, 0, tlv(0xa0, tlv(0x02, 3)...)), exts }), false, false},
		{"public key off the curve", editTBS(t, leaf, func(tbs, exts [][]byte) ([][]byte, [][]byte) {
			spki := bytes.Clone(tbs[6])
			spki[len(spki)-1] ^= 1
			return put(tbs, 6, spki), exts
		}), false, false},
		{"bad PrintableString in the issuer", editTBS(t, leaf, func(tbs, exts [][]byte) ([][]byte, [][]byte) {
			return put(tbs, 3, seq(tlv(0x31, seq(tlv(0x06, 0x55, 0x04, 0x03), tlv(0x13, '<'))...))), exts
		}), false, false},
		{"bad UTCTime", editTBS(t, leaf, func(tbs, exts [][]byte) ([][]byte, [][]byte) {
			return put(tbs, 4, seq(tlv(0x17, []byte("261399000000Z")...), tlv(0x17, []byte("270101000000Z")...))), exts
		}), false, false},
		{"SAN not a SEQUENCE", editExt(t, leaf, 0x11, func([]byte) []byte { return ext(0x11, true, tlv(0x31, tlv(0x86, []byte(clientID)...)...)) }), false, false},
		{"URI SAN not IA5", editExt(t, leaf, 0x11, func([]byte) []byte { return ext(0x11, true, seq(tlv(0x86, []byte(clientID+"\xc3\xa9")...))) }), false, false},
		{"outer signature algorithm differs", func() []byte {
			var c cryptobyte.String = leaf
			var body, tbs, alg cryptobyte.String
			c.ReadASN1(&body, cbasn1.SEQUENCE)
			body.ReadASN1Element(&tbs, cbasn1.SEQUENCE)
			body.ReadASN1Element(&alg, cbasn1.SEQUENCE)
			return seq(tbs, seq(tlv(0x06, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03)), body)
		}(), false, false},
	}
	tr, err := newTrust(testTD, []*x509.Certificate{ca.Cert}, []*x509.Certificate{inter.Cert})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := x509.ParseCertificate(tt.der); (err == nil) != tt.x509 {
				t.Fatalf("x509: %v, want accepted %v", err, tt.x509)
			}
			if got := checkLeafAgainstX509(t, tt.der, tr, time.Now()); got != tt.read {
				t.Fatalf("parseLeaf read it: %v, want %v", got, tt.read)
			}
		})
	}
}

// TestConsulLeafFastPath: a real Consul leaf, with HAProxy's roots
// announced, is decided without x509's parse and without a chain
// verification.
func TestConsulLeafFastPath(t *testing.T) {
	root, err := x509.ParseCertificate(pemDER(t, readFile(t, "testdata/consul-root.pem")))
	if err != nil {
		t.Fatal(err)
	}
	der := pemDER(t, readFile(t, "testdata/consul-leaf.pem"))
	r, err := readCert(der, sha256.Sum256(der), certs.ParseSPIFFE)
	if err != nil || r.leaf == nil || r.svcErr != nil {
		t.Fatalf("readCert: %v, leaf read %v, service %v", err, r.leaf != nil, r.svcErr)
	}
	tr, err := newTrust(r.leaf.host, []*x509.Certificate{root}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var verified atomic.Uint64
	at := r.leaf.notBefore.Add(time.Minute) // the leaf is valid then
	if err := checkRemembered(r, tr, at, true, &verified); err != nil || verified.Load() != 0 {
		t.Fatalf("fast path: %v, %d verifications", err, verified.Load())
	}
	if err := checkRemembered(r, tr, at, false, &verified); err != nil || verified.Load() != 1 {
		t.Fatalf("verified by the agent: %v, %d verifications", err, verified.Load())
	}
	// Expired since the handshake HAProxy verified it: decided on its
	// identity, either way.
	for _, fast := range []bool{true, false} {
		if err := checkRemembered(r, tr, r.leaf.notAfter.Add(24*time.Hour), fast, &verified); err != nil {
			t.Fatalf("leaf expired since (handshake verified: %v): %v, want accepted", fast, err)
		}
	}
}

// FuzzParseLeaf holds parseLeaf to its contract (checkLeafAgainstX509) on
// hostile DER: truncated, with duplicate extensions, several URI SANs, a
// critical unknown extension, wrong tags.
func FuzzParseLeaf(f *testing.F) {
	ca := testCA()
	for _, der := range fuzzLeafSeeds(f, ca) {
		f.Add(der)
	}
	tr, err := newTrust(testTD, []*x509.Certificate{ca.Cert}, nil)
	if err != nil {
		f.Fatal(err)
	}
	now := time.Now()
	f.Fuzz(func(t *testing.T, der []byte) {
		checkLeafAgainstX509(t, der, tr, now)
	})
}

func fuzzLeafSeeds(f *testing.F, ca *testenv.CA) [][]byte {
	leaf := leafDER(f, ca, 7, clientID)
	seeds := [][]byte{
		leaf,
		pemDER(f, readFile(f, "testdata/consul-leaf.pem")),
		leaf[:len(leaf)/2],
		leafDER(f, ca, 6, clientID, webID),
		withExt(f, leaf, 0x25, false, seq(tlv(0x06, ekuClientAuth...))),
		withExt(f, leaf, 0x11, false, seq(tlv(0x86, []byte(webID)...))),
		withExt(f, leaf, 0x23, true, seq(tlv(0x80, 1, 2))),
		issue(f, ca, func(c *x509.Certificate) {
			c.ExtraExtensions = []pkix.Extension{{Id: asn1.ObjectIdentifier{1, 2, 3, 4}, Critical: true, Value: []byte{5, 0}}}
		}),
		editTBS(f, leaf, func(tbs, exts [][]byte) ([][]byte, [][]byte) { return put(tbs, 1, tlv(0x04, 7)), exts }),
		editTBS(f, leaf, func(tbs, exts [][]byte) ([][]byte, [][]byte) { return tbs, append(exts, tlv(0x30)) }),
	}
	return seeds
}

func readFile(t testing.TB, name string) string {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// issue makes a leaf of ca like leafDER's (clientID, client auth), changed
// by mod.
func issue(t testing.TB, ca *testenv.CA, mod func(*x509.Certificate)) []byte {
	t.Helper()
	u, _ := url.Parse(clientID)
	c := &x509.Certificate{SerialNumber: big.NewInt(42), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		URIs: []*url.URL{u}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, PublicKey: ca.Cert.PublicKey}
	mod(c)
	der, err := x509.CreateCertificate(rand.Reader, c, ca.Cert, c.PublicKey, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func mustKey(t testing.TB, c elliptic.Curve) crypto.Signer {
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

var rsaTestKey = sync.OnceValues(func() (*rsa.PrivateKey, error) { return rsa.GenerateKey(rand.Reader, 1024) })

func rsaKey(t testing.TB) *rsa.PrivateKey {
	k, err := rsaTestKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mustOID(t testing.TB, s string) x509.OID {
	o, err := x509.ParseOID(s)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

// DER assembly, for shapes x509.CreateCertificate does not make (the
// signatures of such certificates do not verify; parsing does not check).

// tlv is one DER element with a short-form or long-form length.
func tlv(tag byte, content ...byte) []byte {
	var b cryptobyte.Builder
	b.AddASN1(cbasn1.Tag(tag), func(c *cryptobyte.Builder) { c.AddBytes(content) })
	return b.BytesOrPanic()
}

func seq(elems ...[]byte) []byte { return tlv(0x30, bytes.Join(elems, nil)...) }

// put returns elems with elems[i] replaced by e.
func put(elems [][]byte, i int, e []byte) [][]byte {
	out := append([][]byte(nil), elems...)
	out[i] = e
	return out
}

// ext is an Extension with the OID 2.5.29.kind.
func ext(kind byte, critical bool, value []byte) []byte {
	parts := [][]byte{tlv(0x06, 0x55, 0x1d, kind)}
	if critical {
		parts = append(parts, tlv(0x01, 0xff))
	}
	return seq(append(parts, tlv(0x04, value...))...)
}

// editTBS rebuilds der with its TBS elements before the extensions and its
// extensions as edit returns them (extensions nil: none, not even the
// [3]; a nil element among them: one trailing zero-length NULL after the
// extensions' [3]).
func editTBS(t testing.TB, der []byte, edit func(tbs, exts [][]byte) ([][]byte, [][]byte)) []byte {
	t.Helper()
	var in cryptobyte.String = der
	var body, tbs, alg, sig cryptobyte.String
	if !in.ReadASN1(&body, cbasn1.SEQUENCE) || !body.ReadASN1(&tbs, cbasn1.SEQUENCE) ||
		!body.ReadASN1Element(&alg, cbasn1.SEQUENCE) || !body.ReadAnyASN1Element(&sig, new(cbasn1.Tag)) {
		t.Fatal("editTBS: not a certificate")
	}
	var elems, exts [][]byte
	for !tbs.Empty() {
		var e cryptobyte.String
		var tag cbasn1.Tag
		if !tbs.ReadAnyASN1Element(&e, &tag) {
			t.Fatal("editTBS: bad TBS")
		}
		if tag != cbasn1.Tag(3).Constructed().ContextSpecific() {
			elems = append(elems, e)
			continue
		}
		var x, list cryptobyte.String
		e.ReadASN1(&x, tag)
		x.ReadASN1(&list, cbasn1.SEQUENCE)
		for !list.Empty() {
			var one cryptobyte.String
			list.ReadASN1Element(&one, cbasn1.SEQUENCE)
			exts = append(exts, one)
		}
	}
	elems, exts = edit(elems, exts)
	var trailing []byte
	if n := len(exts); n > 0 && exts[n-1] == nil {
		exts, trailing = exts[:n-1], tlv(0x05)
	}
	parts := elems
	if exts != nil {
		parts = append(append([][]byte(nil), elems...), tlv(0xa3, seq(exts...)...))
	}
	if trailing != nil {
		parts = append(parts, trailing)
	}
	return seq(seq(parts...), alg, sig)
}

// withExt adds the extension 2.5.29.kind to der's.
func withExt(t testing.TB, der []byte, kind byte, critical bool, value []byte) []byte {
	return editTBS(t, der, func(tbs, exts [][]byte) ([][]byte, [][]byte) {
		return tbs, append(exts, ext(kind, critical, value))
	})
}

// editExt replaces der's extension 2.5.29.kind by edit's answer.
func editExt(t testing.TB, der []byte, kind byte, edit func(e []byte) []byte) []byte {
	t.Helper()
	found := false
	out := editTBS(t, der, func(tbs, exts [][]byte) ([][]byte, [][]byte) {
		for i, e := range exts {
			if bytes.HasPrefix(e[2:], []byte{0x06, 0x03, 0x55, 0x1d, kind}) {
				exts, found = put(exts, i, edit(e)), true
			}
		}
		return tbs, exts
	})
	if !found {
		t.Fatalf("no extension 2.5.29.%d", kind)
	}
	return out
}

// withCritical sets the critical field of the extension e to a BOOLEAN
// with the content byte b.
func withCritical(t testing.TB, e []byte, b byte) []byte {
	t.Helper()
	var in cryptobyte.String = e
	var body, oid, value cryptobyte.String
	if !in.ReadASN1(&body, cbasn1.SEQUENCE) || !body.ReadASN1Element(&oid, cbasn1.OBJECT_IDENTIFIER) {
		t.Fatal("withCritical: bad extension")
	}
	if body.PeekASN1Tag(cbasn1.BOOLEAN) {
		body.SkipASN1(cbasn1.BOOLEAN)
	}
	body.ReadASN1Element(&value, cbasn1.OCTET_STRING)
	return seq(oid, tlv(0x01, b), value)
}
