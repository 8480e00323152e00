package spoa

import (
	"crypto/sha256"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/haproxy-connect/haproxy-connect/certs"
)

// The roots HAProxy verifies client certificates against, and when the
// agent may rely on that verification.
//
// The public listener is rendered with "verify required" and the CA file
// the controller writes from Consul's roots, and without crt-ignore-err or
// ca-ignore-err (bootstrap pins this): a certificate HAProxy sends the agent
// has been verified at the handshake against those roots, signature and
// validity included. When every root any HAProxy process may be using is
// also one the agent trusts, the agent's own chain verification would
// repeat that check: it costs one ECDSA signature verification, most of a
// first decision's time. The agent then checks only that the certificate
// names an issuer it trusts (its AuthorityKeyId is the SubjectKeyId of a
// root or intermediate Consul lists), that it is valid now and usable for
// client authentication.
//
// Otherwise (the served roots are unknown, or HAProxy may still trust a
// root Consul has since removed) the agent verifies the chain itself, as
// before: a root that was removed, for example after a compromise, is not
// trusted on HAProxy's word while an old worker may still hold it.
//
// What HAProxy serves is told by the controller (RootsServed) before each
// start and reload and after an adoption. A reload leaves the old worker
// running with the old CA file until it exits, at most the hard-stop-after
// later: roots it alone holds count as served for that grace.

// DefaultServedRootsGrace is how long roots a reload replaced count as
// still served (HAProxy's hard-stop-after, the sidecar's default).
const DefaultServedRootsGrace = 5 * time.Minute

// WithServedRootsGrace sets how long roots replaced by a reload count as
// still served: the hard-stop-after HAProxy runs with.
func WithServedRootsGrace(d time.Duration) Option {
	return func(a *Authorizer) {
		if d > 0 {
			a.served.grace = d
		}
	}
}

// servedRoots is what HAProxy's processes may verify client certificates
// against.
type servedRoots struct {
	mu    sync.Mutex
	grace time.Duration
	// known: some process's roots were announced; until then (and until
	// unknownUntil after an adoption) the agent verifies every chain.
	known        bool
	unknownUntil time.Time
	current      map[[32]byte]bool
	// replaced are roots only old workers may hold, until their deadline.
	replaced map[[32]byte]time.Time
	// relying is the last answer of handshakeVerified that was logged
	// (0: none yet, 1: relying on HAProxy, 2: verifying).
	relying atomic.Int32
}

// changed reports whether relying differs from the last answer seen, and
// records it: the agent logs each switch once.
func (s *servedRoots) changed(relying bool) bool {
	v := int32(2)
	if relying {
		v = 1
	}
	return s.relying.Swap(v) != v
}

// RootsServed tells the agent the CA roots (PEM) HAProxy verifies client
// certificates against from now on. fresh means no other HAProxy process
// runs (a first start, or a start after HAProxy exited): nothing else is
// served. Otherwise (a reload, an adoption) the roots served before stay
// counted for the grace, and after an adoption so does whatever the
// adopted processes' old workers may hold. A PEM that does not parse is
// an error and leaves the agent verifying every chain itself.
func (a *Authorizer) RootsServed(rootsPEM string, fresh bool) error {
	sums, err := pemSums(rootsPEM)
	if err != nil {
		a.served.forget()
		return fmt.Errorf("served CA roots: %w", err)
	}
	a.served.announce(sums, fresh, time.Now())
	return nil
}

// forget makes the served roots unknown until the next fresh announce.
func (s *servedRoots) forget() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.known = false
}

func (s *servedRoots) announce(sums map[[32]byte]bool, fresh bool, now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.grace <= 0 {
		s.grace = DefaultServedRootsGrace
	}
	switch {
	case fresh:
		clear(s.replaced)
		s.unknownUntil = time.Time{}
	case !s.known:
		// Adopted, or first announced by a reload: older workers may
		// hold roots never announced.
		s.unknownUntil = now.Add(s.grace)
	}
	if s.replaced == nil {
		s.replaced = map[[32]byte]time.Time{}
	}
	for sum := range s.current {
		if !sums[sum] && !fresh {
			s.replaced[sum] = now.Add(s.grace)
		}
	}
	for sum := range sums {
		delete(s.replaced, sum)
	}
	s.current, s.known = sums, true
}

// handshakeVerified reports whether every root an HAProxy process may
// verify client certificates against is one of t's.
func (s *servedRoots) handshakeVerified(t *trust, now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.known || len(s.current) == 0 || now.Before(s.unknownUntil) {
		return false
	}
	for sum := range s.current {
		if !t.rootSums[sum] {
			return false
		}
	}
	for sum, until := range s.replaced {
		if !now.Before(until) {
			delete(s.replaced, sum)
			continue
		}
		if !t.rootSums[sum] {
			return false
		}
	}
	return true
}

// pemSums is the SHA-256 of each certificate in a PEM bundle.
func pemSums(b string) (map[[32]byte]bool, error) {
	cs, err := certs.ParsePEM(b)
	if err != nil {
		return nil, err
	}
	sums := map[[32]byte]bool{}
	for _, c := range cs {
		sums[sha256.Sum256(c.Raw)] = true
	}
	return sums, nil
}

// issuedByTrusted is the agent's check of a certificate HAProxy verified
// against roots the agent trusts (see handshakeVerified): it names a
// trusted issuer and may authenticate a client. Its validity period is
// not checked here: HAProxy checked it at the handshake (see checkCert). A
// false answer sends the certificate to the full chain verification, which
// then says why it fails. l is the certificate as parseLeaf reads it, or
// leafOf x509's parse.
func issuedByTrusted(l leaf, t *trust) bool {
	if len(l.authorityKeyID) == 0 || !t.skids[string(l.authorityKeyID)] {
		return false
	}
	return l.clientAuth
}
