// Package verify proves an upstream endpoint's workload identity before it
// carries traffic: it makes its own mTLS handshake to the endpoint, with the
// sidecar's leaf and the mesh's CA roots, and checks that the server presents
// exactly the destination's SPIFFE ID. It knows neither Consul's API types
// nor HAProxy; the controller decides what to do with the answer.
//
// Why the sidecar does this itself: a Consul leaf carries only a URI SAN (no
// DNS SAN, an empty subject), so HAProxy's verifyhost has nothing to match,
// and HAProxy 2.6 has no URI-SAN matcher at the handshake. Its "verify
// required" proves only that the server holds some leaf of the mesh.
package verify

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"time"
)

// ErrMismatch is returned when the endpoint proved an identity, but not the
// one asked for: it holds a valid leaf of another workload.
var ErrMismatch = errors.New("endpoint presents another identity")

// ErrUntrusted is returned when the endpoint's certificate does not chain to
// the roots, or does not carry exactly one URI SAN.
var ErrUntrusted = errors.New("endpoint certificate not trusted")

// DefaultTimeout bounds one verification (connect and handshake) when
// Config.Timeout is zero.
const DefaultTimeout = 3 * time.Second

// Config is what a verification presents and trusts.
type Config struct {
	// Leaf is the sidecar's own certificate chain and key: the other
	// sidecar requires a mesh client certificate, as it does of HAProxy.
	Leaf tls.Certificate
	// Roots are the mesh's CA roots.
	Roots *x509.CertPool
	// ALPN is offered as HAProxy offers it for the upstream's protocol
	// (none for tcp), so the other sidecar sees the same kind of client.
	ALPN []string
	// Timeout bounds connect and handshake (DefaultTimeout when zero).
	Timeout time.Duration
}

// NewConfig builds a Config from PEM: leafPEM holds the leaf, its
// intermediates and its key (as certs.Bundle.PEM does); rootsPEM every
// trusted root.
func NewConfig(leafPEM, rootsPEM string) (Config, error) {
	leaf, err := tls.X509KeyPair([]byte(leafPEM), []byte(leafPEM))
	if err != nil {
		return Config{}, fmt.Errorf("verify: leaf: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(rootsPEM)) {
		return Config{}, errors.New("verify: no CA root in the roots PEM")
	}
	return Config{Leaf: leaf, Roots: pool}, nil
}

// Result is what the endpoint showed.
type Result struct {
	// ID is the URI SAN of a certificate that chains to the roots; empty
	// when the chain or the SAN did not verify.
	ID string
	// Serial is that certificate's serial number, hex.
	Serial string
	// Took is how long the connect and handshake took.
	Took time.Duration
}

// Endpoint connects to addr (host:port), completes an mTLS handshake and
// closes: no application byte is sent. It returns nil when the server's
// certificate chains to cfg.Roots for server authentication and carries
// exactly one URI SAN, equal to want; ErrMismatch (with Result.ID set) when
// it carries another; ErrUntrusted when it does not verify; and the network
// or TLS error when no handshake completed.
func Endpoint(ctx context.Context, cfg Config, addr, want string) (Result, error) {
	timeout := cfg.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var res Result
	var idErr error
	tc := &tls.Config{
		Certificates: []tls.Certificate{cfg.Leaf},
		NextProtos:   cfg.ALPN,
		MinVersion:   tls.VersionTLS12, // as HAProxy's ssl-default-server-options
		// Classic key exchange only. A proof sends no byte after the
		// handshake, so a post-quantum key share protects nothing here,
		// and Go's default offers X25519MLKEM768: generating its ML-KEM
		// key was a seventh of the sidecar's CPU in a burst of new
		// endpoints (meshbench churn -profile), for a share the other
		// sidecar's OpenSSL 3.0 does not even take.
		CurvePreferences: []tls.CurveID{tls.X25519, tls.CurveP256},
		// The chain and the URI SAN are checked in VerifyConnection below:
		// Go's own verification would match a host name, and the leaf has
		// none.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			id, serial, err := Check(cs.PeerCertificates, cfg.Roots)
			res.ID, res.Serial = id, serial
			if err != nil {
				return err
			}
			if id != want {
				idErr = fmt.Errorf("%w: %s, want %s", ErrMismatch, id, want)
				return idErr
			}
			return nil
		},
	}
	start := time.Now()
	d := tls.Dialer{NetDialer: &net.Dialer{}, Config: tc}
	conn, err := d.DialContext(ctx, "tcp", addr)
	res.Took = time.Since(start)
	if idErr != nil {
		return res, idErr // the handshake error wraps it as a string only
	}
	if err != nil {
		var untrusted *untrustedError
		if errors.As(err, &untrusted) {
			return res, fmt.Errorf("%w: %s", ErrUntrusted, untrusted.reason)
		}
		return res, fmt.Errorf("handshake with %s: %w", addr, err)
	}
	_ = conn.Close()
	return res, nil
}

type untrustedError struct{ reason string }

func (e *untrustedError) Error() string { return e.reason }

// Check verifies a peer chain (leaf first) against roots for server
// authentication and returns the leaf's one URI SAN and its serial. A
// certificate with no URI SAN, or with more than one, is refused: which one
// would be the identity?
func Check(chain []*x509.Certificate, roots *x509.CertPool) (id, serial string, err error) {
	if len(chain) == 0 {
		return "", "", &untrustedError{"no certificate presented"}
	}
	leaf := chain[0]
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		return "", "", &untrustedError{"chain: " + err.Error()}
	}
	if len(leaf.URIs) != 1 {
		return "", "", &untrustedError{fmt.Sprintf("%d URI SANs, want exactly 1", len(leaf.URIs))}
	}
	return leaf.URIs[0].String(), hex.EncodeToString(leaf.SerialNumber.Bytes()), nil
}

// ServiceID is the SPIFFE ID Consul gives the leaves of service in a
// namespace, partition and datacenter (consul agent/connect
// SpiffeIDService.URI): spiffe://<trust domain>[/ap/<partition>]/ns/<ns>/dc/<dc>/svc/<service>,
// the partition segment only for a partition other than "default".
// Empty namespace and partition mean "default".
func ServiceID(trustDomain, partition, namespace, datacenter, service string) string {
	if namespace == "" {
		namespace = "default"
	}
	ap := ""
	if partition != "" && partition != "default" {
		ap = "/ap/" + partition
	}
	return "spiffe://" + trustDomain + ap + "/ns/" + namespace + "/dc/" + datacenter + "/svc/" + service
}
