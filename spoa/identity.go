package spoa

import (
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/haproxy-connect/haproxy-connect/certs"
)

// Reasons a client certificate gives no identity. Each one is a deny, not
// cached (there is nothing to key it on).
var (
	errNoCert  = errors.New("no client certificate")
	errBadCert = errors.New("unparsable client certificate")
)

// Reasons a parsed client certificate is refused without asking Consul.
// Each one is a deny, cached like Consul's answers, logged with its reason
// and counted (Stats.Refused).
var (
	errURISANs     = errors.New("not exactly one URI SAN")
	errNotSPIFFE   = errors.New("URI SAN is not a SPIFFE ID")
	errTrustDomain = errors.New("SPIFFE ID of another trust domain")
	errNotService  = errors.New("SPIFFE ID is not a service identity")
	errChain       = errors.New("certificate does not verify against the CA roots")
)

// errNoRoots leaves a connection undecided: the agent has not learned the
// CA roots yet, and asking again later can succeed.
var errNoRoots = errors.New("CA roots not known yet")

// identity is what Consul needs from a client leaf, and what keys its
// cached decision.
type identity struct {
	uri    string // the certificate's only URI SAN; "" if it has not one
	serial string // colon-hex, as Consul writes it (connect.HexString)
	// sum is the SHA-256 of the DER certificate: a cached decision holds
	// for this very certificate, not for any other claiming the same URI
	// and serial (the agent checks the chain itself once per certificate).
	sum [32]byte
}

// parseIdentity parses a DER leaf. What the certificate claims is checked
// later (checkCert), on a cache miss.
func parseIdentity(der []byte) (identity, *x509.Certificate, error) {
	return parseIdentitySum(der, sha256.Sum256(der))
}

// parseIdentitySum is parseIdentity for a caller that has the DER's
// SHA-256 already (the decision path looks the certificate up by it).
func parseIdentitySum(der []byte, sum [32]byte) (identity, *x509.Certificate, error) {
	if len(der) == 0 {
		return identity{}, nil, errNoCert
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return identity{}, nil, fmt.Errorf("%w: %v", errBadCert, err)
	}
	id := identity{serial: hexSerial(cert.SerialNumber.Bytes()), sum: sum}
	if len(cert.URIs) == 1 {
		id.uri = cert.URIs[0].String()
	}
	return id, cert, nil
}

// readCert reads a client certificate the agent has not seen (sum is its
// DER's SHA-256): with parseLeaf, or with x509 when parseLeaf declines it.
// Its URI is parsed with spiffe (see newRemembered).
func readCert(der []byte, sum [32]byte, spiffe func(string) (certs.ID, error)) (rememberedCert, error) {
	if l, ok := parseLeaf(der); ok {
		r := newRemembered(identity{uri: l.uri, serial: hexSerial(l.serial), sum: sum}, nil, spiffe)
		r.leaf, r.der = &l, der
		return r, nil
	}
	id, cert, err := parseIdentitySum(der, sum)
	if err != nil {
		return rememberedCert{}, err
	}
	return newRemembered(id, cert, spiffe), nil
}

// trust is what client certificates are checked against: the cluster's
// current trust domain and CA roots, from Consul's
// /v1/agent/connect/ca/roots. Immutable once published.
type trust struct {
	domain        string
	roots         *x509.CertPool
	intermediates *x509.CertPool
	// key identifies the content (trust domain, then the sorted SHA-256
	// of every root and intermediate): a change invalidates the cache.
	key string
	// rootSums are the roots' SHA-256; skids the SubjectKeyIds of the
	// roots and intermediates (see issuedByTrusted).
	rootSums map[[32]byte]bool
	skids    map[string]bool
}

// trustDomainRE is the shape of a Consul trust domain ("<cluster
// uuid>.consul"): a lower-case DNS name.
var trustDomainRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$`)

// newTrust builds a trust from Consul's roots answer.
func newTrust(domain string, roots, intermediates []*x509.Certificate) (*trust, error) {
	if len(domain) > 253 || !trustDomainRE.MatchString(domain) {
		return nil, fmt.Errorf("trust domain %q is not a lower-case DNS name", domain)
	}
	if len(roots) == 0 {
		return nil, errors.New("no CA roots")
	}
	t := &trust{domain: domain, roots: x509.NewCertPool(), intermediates: x509.NewCertPool(),
		rootSums: map[[32]byte]bool{}, skids: map[string]bool{}}
	var sums []string
	for _, c := range roots {
		if !c.IsCA {
			return nil, fmt.Errorf("CA root %q is not a CA certificate", c.Subject)
		}
		t.roots.AddCert(c)
		sum := sha256.Sum256(c.Raw)
		t.rootSums[sum] = true
		sums = append(sums, fmt.Sprintf("r%x", sum))
	}
	for _, c := range append(slices.Clip(roots), intermediates...) {
		if len(c.SubjectKeyId) > 0 {
			t.skids[string(c.SubjectKeyId)] = true
		}
	}
	for _, c := range intermediates {
		t.intermediates.AddCert(c)
		sums = append(sums, fmt.Sprintf("i%x", sha256.Sum256(c.Raw)))
	}
	slices.Sort(sums)
	t.key = domain + " " + strings.Join(sums, " ")
	return t, nil
}

// checkCert decides what the agent can decide alone about a client leaf
// that HAProxy has already verified: a non-nil error is a deny with that
// reason, except errNoRoots. Consul's leaves carry exactly one URI SAN,
// spiffe://<trust domain>/[ap/<partition>/]ns/<ns>/dc/<dc>/svc/<service>,
// with the cluster's trust domain; an agent's leaf
// (spiffe://<td>/agent/client/dc/<dc>/id/<node>) or a mesh gateway's is
// not a service and may not open a connection to one. The chain is
// verified here too, against the roots and intermediates Consul lists
// (HAProxy sends only the leaf), for client authentication, unless
// handshakeVerified (HAProxy verified it against roots the agent trusts;
// see served.go) and the certificate names a trusted issuer: defence in
// depth, should HAProxy's ca-file ever hold more than Consul's roots.
// verified counts the full verifications.
//
// The certificate's validity period is HAProxy's to check, at the
// handshake that authenticated the connection (verify required), and the
// chain is verified at a time within it (now, unless the leaf has expired
// or is not yet valid): the agent also decides again for connections made
// earlier (an intentions change, see Recheck), and for TLS sessions
// resumed from an earlier handshake, whose leaf may have expired since.
// Refusing those would close a kept-alive tcp connection, and answer 403
// on every request of a pooled HTTP connection, once the client has
// renewed the leaf it opened them with and that leaf has run out.
//
// svcErr says why the URI is not a Consul service SPIFFE ID, nil if it is
// (certs.ParseSPIFFE, parsed once per certificate).
func checkCert(cert *x509.Certificate, svcErr error, t *trust, now time.Time, handshakeVerified bool, verified *atomic.Uint64) error {
	if t == nil {
		return errNoRoots
	}
	if n := len(cert.URIs); n != 1 {
		uris := make([]string, n)
		for i, u := range cert.URIs {
			uris[i] = u.String()
		}
		return fmt.Errorf("%w: %d (%s)", errURISANs, n, strings.Join(uris, ", "))
	}
	u := cert.URIs[0]
	// url.Parse lower-cases the scheme.
	if u.Scheme != "spiffe" || u.Host == "" || u.Opaque != "" || u.User != nil ||
		!strings.HasPrefix(u.Path, "/") || u.RawQuery != "" || u.Fragment != "" {
		return fmt.Errorf("%w: %q", errNotSPIFFE, u.String())
	}
	if u.Host != t.domain {
		return fmt.Errorf("%w: %q, the cluster's is %q", errTrustDomain, u.Host, t.domain)
	}
	if svcErr != nil {
		return fmt.Errorf("%w: %q", errNotService, u.String())
	}
	if handshakeVerified && issuedByTrusted(leafOf(cert), t) {
		return nil
	}
	if verified != nil {
		verified.Add(1)
	}
	at := now
	if at.After(cert.NotAfter) {
		at = cert.NotAfter
	}
	if at.Before(cert.NotBefore) {
		at = cert.NotBefore
	}
	_, err := cert.Verify(x509.VerifyOptions{
		Roots:         t.roots,
		Intermediates: t.intermediates,
		CurrentTime:   at,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return fmt.Errorf("%w: %v", errChain, err)
	}
	return nil
}

// checkRemembered is checkCert for r's certificate. One
// parseLeaf read (r.leaf), with HAProxy's verification relied on (fast),
// is passed from what parseLeaf read when that is enough: checkCert would
// pass it too, since parseLeaf reads the same fields as x509 and only a
// URI of the shape spiffe://<host>/<path>, which passes checkCert's URI
// checks. Every other case (a refusal included, for its reason) is
// checkCert's, on x509's parse.
func checkRemembered(r rememberedCert, t *trust, now time.Time, fast bool, verified *atomic.Uint64) error {
	if fast && t != nil && r.leaf != nil && r.leaf.host == t.domain && r.svcErr == nil && issuedByTrusted(*r.leaf, t) {
		return nil
	}
	cert, err := r.full()
	if err != nil {
		return err
	}
	return checkCert(cert, r.svcErr, t, now, fast, verified)
}

// refusals are the reasons checkCert refuses a certificate, with their
// metric names, in the order of Stats.Refused.
var refusals = []struct {
	err  error
	name string
}{{errURISANs, "uri_sans"}, {errNotSPIFFE, "not_spiffe"}, {errTrustDomain, "trust_domain"}, {errNotService, "not_service"}, {errChain, "chain"}}

// refusal returns the index in refusals of err's reason, or -1.
func refusal(err error) int {
	for i, r := range refusals {
		if errors.Is(err, r.err) {
			return i
		}
	}
	return -1
}

// hexSerial formats a serial number (its magnitude, big-endian, as
// big.Int.Bytes gives it) as Consul's connect.HexString does: lower-case
// hex bytes joined by colons ("0a:1b:...").
func hexSerial(b []byte) string {
	if len(b) == 0 {
		b = []byte{0}
	}
	var s strings.Builder
	s.Grow(3 * len(b))
	const digits = "0123456789abcdef"
	for i, c := range b {
		if i > 0 {
			s.WriteByte(':')
		}
		s.WriteByte(digits[c>>4])
		s.WriteByte(digits[c&0xf])
	}
	return s.String()
}

// checkOnce is checkCert of r's certificate, remembered per certificate
// (its SHA-256): the chain check, a signature verification (most of an
// uncached decision's time), is not repeated when an intention change
// drops the decision cache and every source is decided again. What it
// depends on is kept with it: the trust it was checked under (a roots
// change makes it stale). Refusals are not
// remembered here (the decision cache holds them). Bounded like the
// decision cache: a full map evicts one arbitrary entry.
func (a *Authorizer) checkOnce(r rememberedCert) error {
	sum := r.id.sum
	t, now := a.trust.Load(), time.Now()
	a.verifiedMu.Lock()
	v, ok := a.verified[sum]
	a.verifiedMu.Unlock()
	if ok && t != nil && v == t {
		return nil
	}
	fast := t != nil && a.served.handshakeVerified(t, now)
	if t != nil && a.served.changed(fast) {
		if fast {
			a.log.Info("client certificate chains: relying on HAProxy's verification, every root it may hold is one Consul lists")
		} else {
			a.log.Info("client certificate chains: the agent verifies each one itself (the roots HAProxy holds are unknown or not all Consul's)")
		}
	}
	if err := checkRemembered(r, t, now, fast, &a.stats.chainVerifications); err != nil {
		return err
	}
	a.verifiedMu.Lock()
	defer a.verifiedMu.Unlock()
	if _, ok := a.verified[sum]; !ok && len(a.verified) >= a.cacheSize {
		for old := range a.verified {
			delete(a.verified, old)
			break
		}
	}
	a.verified[sum] = t
	return nil
}
