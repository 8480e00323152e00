package verify

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

const (
	webID    = "spiffe://td.consul/ns/default/dc/dc1/svc/web"
	otherID  = "spiffe://td.consul/ns/default/dc/dc1/svc/other"
	clientID = "spiffe://td.consul/ns/default/dc/dc1/svc/client"
)

// server is a TLS server holding cert that requires a client certificate
// from roots, as the other sidecar's public listener does. It counts the
// bytes it reads after the handshake and records the ALPN list offered.
type server struct {
	addr      string
	bytesRead atomic.Int64
	alpn      atomic.Value  // []string
	curves    atomic.Value  // []tls.CurveID offered
	handshake atomic.Int64  // completed handshakes
	ended     chan struct{} // one per connection the server is done with
}

// waitEnded waits until the server is done with n connections: its
// counts are final for them.
func (s *server) waitEnded(t *testing.T, n int) {
	t.Helper()
	for range n {
		select {
		case <-s.ended:
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: a connection did not end", s.addr)
		}
	}
}

func serve(t testing.TB, cert tls.Certificate, roots *x509.CertPool) *server {
	t.Helper()
	s := &server{ended: make(chan struct{}, 64)}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    roots,
		GetConfigForClient: func(hi *tls.ClientHelloInfo) (*tls.Config, error) {
			s.alpn.Store(hi.SupportedProtos)
			s.curves.Store(hi.SupportedCurves)
			return nil, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	s.addr = ln.Addr().String()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer func() {
					select {
					case s.ended <- struct{}{}:
					default:
					}
				}()
				defer c.Close()
				if err := c.(*tls.Conn).Handshake(); err != nil {
					return
				}
				s.handshake.Add(1)
				n, _ := io.Copy(io.Discard, c)
				s.bytesRead.Add(n)
			}()
		}
	}()
	return s
}

// leafOf issues a leaf of ca for id as a tls.Certificate.
func leafOf(t testing.TB, ca *testenv.CA, id string) tls.Certificate {
	t.Helper()
	c, k := ca.Leaf(t, id)
	return keyPair(t, c, k)
}

func keyPair(t testing.TB, certPEM, keyPEM string) tls.Certificate {
	t.Helper()
	c, err := tls.X509KeyPair([]byte(certPEM), []byte(keyPEM))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// twoURIs issues a leaf of ca with two URI SANs.
func twoURIs(t testing.TB, ca *testenv.CA) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u1, _ := url.Parse(webID)
	u2, _ := url.Parse(otherID)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		NotBefore:    time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		URIs:        []*url.URL{u1, u2},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	return keyPair(t, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})))
}

func TestEndpoint(t *testing.T) {
	ca := testenv.NewCA(t, "mesh root")
	foreign := testenv.NewCA(t, "foreign root")
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	clientCert, clientKey := ca.Leaf(t, clientID)
	cfg, err := NewConfig(clientCert+clientKey, ca.CertPEM)
	if err != nil {
		t.Fatal(err)
	}
	cfg.ALPN = []string{"h2", "http/1.1"}

	web := serve(t, leafOf(t, ca, webID), roots)
	other := serve(t, leafOf(t, ca, otherID), roots)
	untrusted := serve(t, leafOf(t, foreign, webID), roots)
	double := serve(t, twoURIs(t, ca), roots)
	closed := testenv.FreePort(t) // nothing listens there

	tests := []struct {
		name    string
		addr    string
		wantErr error // nil, a sentinel, or errAny for a network error
		wantID  string
	}{
		{"the destination", web.addr, nil, webID},
		{"another service's valid leaf", other.addr, ErrMismatch, otherID},
		{"a leaf of another CA", untrusted.addr, ErrUntrusted, ""},
		{"two URI SANs", double.addr, ErrUntrusted, ""},
		{"nothing listening", net.JoinHostPort("127.0.0.1", itoa(closed)), errAny, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := Endpoint(context.Background(), cfg, tt.addr, webID)
			switch {
			case tt.wantErr == nil && err != nil:
				t.Fatalf("err = %v, want nil", err)
			case tt.wantErr == errAny && (err == nil || errors.Is(err, ErrMismatch) || errors.Is(err, ErrUntrusted)):
				t.Fatalf("err = %v, want a network error", err)
			case tt.wantErr != nil && tt.wantErr != errAny && !errors.Is(err, tt.wantErr):
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if res.ID != tt.wantID {
				t.Errorf("presented ID = %q, want %q", res.ID, tt.wantID)
			}
		})
	}
	// The destination saw a full mTLS handshake with the ALPN offered, and
	// no application byte, from the verifier; the impostor not even that.
	web.waitEnded(t, 1)
	other.waitEnded(t, 1)
	if web.handshake.Load() != 1 || web.bytesRead.Load() != 0 {
		t.Errorf("destination: %d handshakes, %d bytes read; want 1 and 0", web.handshake.Load(), web.bytesRead.Load())
	}
	if got, _ := web.alpn.Load().([]string); len(got) != 2 || got[0] != "h2" {
		t.Errorf("ALPN offered %v, want [h2 http/1.1]", got)
	}
	if other.bytesRead.Load() != 0 {
		t.Errorf("the impostor read %d bytes", other.bytesRead.Load())
	}
}

var errAny = errors.New("any network error")

func itoa(n int) string { return big.NewInt(int64(n)).String() }

func TestServiceID(t *testing.T) {
	tests := []struct {
		td, ap, ns, dc, svc, want string
	}{
		{"td.consul", "", "", "dc1", "web", "spiffe://td.consul/ns/default/dc/dc1/svc/web"},
		{"td.consul", "default", "team", "dc2", "db", "spiffe://td.consul/ns/team/dc/dc2/svc/db"},
		{"td.consul", "eu", "team", "dc2", "db", "spiffe://td.consul/ap/eu/ns/team/dc/dc2/svc/db"},
	}
	for _, tt := range tests {
		if got := ServiceID(tt.td, tt.ap, tt.ns, tt.dc, tt.svc); got != tt.want {
			t.Errorf("ServiceID(%q, %q, %q, %q, %q) = %q, want %q", tt.td, tt.ap, tt.ns, tt.dc, tt.svc, got, tt.want)
		}
	}
}

// webServer is a server of webID under a new mesh CA, and the Config of a
// client of that mesh.
func webServer(tb testing.TB) (Config, *server) {
	tb.Helper()
	ca := testenv.NewCA(tb, "mesh root")
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	clientCert, clientKey := ca.Leaf(tb, clientID)
	cfg, err := NewConfig(clientCert+clientKey, ca.CertPEM)
	if err != nil {
		tb.Fatal(err)
	}
	return cfg, serve(tb, leafOf(tb, ca, webID), roots)
}

// TestEndpointClassicKeyExchange: a proof offers no post-quantum key
// share (it protects nothing that is sent, and costs an ML-KEM key per
// proof), and still completes with a server that would take one.
func TestEndpointClassicKeyExchange(t *testing.T) {
	cfg, web := webServer(t)
	if _, err := Endpoint(context.Background(), cfg, web.addr, webID); err != nil {
		t.Fatal(err)
	}
	offered, _ := web.curves.Load().([]tls.CurveID)
	if len(offered) == 0 {
		t.Fatal("no key exchange offered")
	}
	for _, c := range offered {
		if c == tls.X25519MLKEM768 {
			t.Errorf("offered %v, with a post-quantum key share", offered)
		}
	}
}

// BenchmarkVerify is the cost of one verification: connect, an mTLS
// handshake with ECDSA P-256 leaves (Consul's default), chain and SAN check,
// close, against a Go TLS server on loopback.
func BenchmarkVerify(b *testing.B) {
	cfg, web := webServer(b)
	b.ResetTimer()
	for b.Loop() {
		if _, err := Endpoint(context.Background(), cfg, web.addr, webID); err != nil {
			b.Fatal(err)
		}
	}
}
