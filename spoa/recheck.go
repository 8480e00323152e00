package spoa

import (
	"crypto/x509"
	"fmt"
	"sync"

	"github.com/haproxy-connect/haproxy-connect/certs"
)

// Deciding again for connections already established. HAProxy records each
// tcp connection with the SHA-256 of its client certificate (package
// authzgen, the connections table); the agent remembers the certificate
// behind each SHA-256 it was asked about, so that after an intentions
// change the sidecar can ask, per established connection, whether its
// source is still allowed (Recheck), and close the ones that are not.

// MaxRememberedCerts bounds the client certificates the agent remembers
// for Recheck. Past it, one arbitrary certificate is forgotten per new
// one; a connection whose certificate was forgotten cannot be decided
// again (RecheckUnknown) and stays open.
const MaxRememberedCerts = 16384

// WithSwitchHook calls f with the new generation each time the agent has
// switched to it (Invalidate, after the hook of WithInvalidateHook
// returned and the cache was dropped): from then on decisions, Recheck's
// too, are made under the new intentions. f must not block.
func WithSwitchHook(f func(gen uint64)) Option { return func(a *Authorizer) { a.onSwitch = f } }

// certMemory maps the SHA-256 of client certificates the agent was asked
// about to their identity and parsed certificate.
type certMemory struct {
	mu        sync.Mutex
	m         map[[32]byte]rememberedCert
	forgotten uint64
}

type rememberedCert struct {
	id identity
	// cert is x509's parse of the certificate; nil when parseLeaf read it
	// (leaf; der is the certificate, parsed by x509 only if the agent
	// must verify its chain: see checkOnce).
	cert *x509.Certificate
	leaf *leaf
	der  []byte
	// svc is the certificate's URI parsed as a Consul service SPIFFE ID,
	// or why it is not one (svcErr): parsed once per certificate.
	svc    certs.ID
	svcErr error
}

// newRemembered parses what the agent needs of cert (whose identity is
// id), its URI with spiffe (certs.ParseSPIFFE, or the agent's memo of it).
func newRemembered(id identity, cert *x509.Certificate, spiffe func(string) (certs.ID, error)) rememberedCert {
	r := rememberedCert{id: id, cert: cert, svcErr: errNotService}
	if id.uri != "" {
		r.svc, r.svcErr = spiffe(id.uri)
	}
	return r
}

// full is x509's parse of r's certificate.
func (r rememberedCert) full() (*x509.Certificate, error) {
	if r.cert != nil {
		return r.cert, nil
	}
	cert, err := x509.ParseCertificate(r.der)
	if err != nil {
		// parseLeaf accepts only what x509 accepts: not expected.
		return nil, fmt.Errorf("%w: %v", errBadCert, err)
	}
	return cert, nil
}

// remember records r unless its certificate is known already.
func (c *certMemory) remember(r rememberedCert) {
	id := r.id
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.m[id.sum]; ok {
		return
	}
	if c.m == nil {
		c.m = map[[32]byte]rememberedCert{}
	}
	if len(c.m) >= MaxRememberedCerts {
		for k := range c.m {
			delete(c.m, k)
			c.forgotten++
			break
		}
	}
	c.m[id.sum] = r
}

func (c *certMemory) get(sum [32]byte) (rememberedCert, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r, ok := c.m[sum]
	return r, ok
}

// RecheckResult is the outcome of Recheck.
type RecheckResult int

const (
	// RecheckAllowed: the source is allowed under the current intentions.
	RecheckAllowed RecheckResult = iota
	// RecheckDenied: the source is denied now (by an intention, or the
	// certificate no longer passes the agent's own checks).
	RecheckDenied
	// RecheckUnknown: the agent does not know the certificate (it was
	// never asked about it, e.g. since a restart, or forgot it).
	RecheckUnknown
	// RecheckUndecided: no decision could be had now (Consul failed).
	RecheckUndecided
)

func (r RecheckResult) String() string {
	switch r {
	case RecheckAllowed:
		return "allowed"
	case RecheckDenied:
		return "denied"
	case RecheckUnknown:
		return "unknown"
	case RecheckUndecided:
		return "undecided"
	}
	return "invalid"
}

// Recheck decides again, under the current intentions generation, for the
// client certificate whose DER has SHA-256 sum: as a new connection with
// that certificate would be decided (the same cache, checks and Decider).
// source is the certificate's SPIFFE ID ("-" when unknown).
func (a *Authorizer) Recheck(sum [32]byte) (source string, r RecheckResult, reason string) {
	rc, ok := a.certs.get(sum)
	if !ok {
		return noSource, RecheckUnknown, "certificate not known to the agent"
	}
	source = rc.id.uri
	if source == "" {
		source = noSource
	}
	v, _, _, err := a.lookup(rc)
	switch {
	case err != nil:
		return source, RecheckUndecided, err.Error()
	case v.allowed:
		return source, RecheckAllowed, v.reason
	}
	return source, RecheckDenied, v.reason
}

// RememberedCerts is the number of client certificates Recheck can
// decide for, and how many were forgotten to stay under
// MaxRememberedCerts.
func (a *Authorizer) RememberedCerts() (n int, forgotten uint64) {
	a.certs.mu.Lock()
	defer a.certs.mu.Unlock()
	return len(a.certs.m), a.certs.forgotten
}
