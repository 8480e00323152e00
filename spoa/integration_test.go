package spoa_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap/zaptest"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/spoa"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// sidecar is the inbound half of a sidecar for service "web": real Consul
// (default deny), real HAProxy running the rendered config, the agent.
type sidecar struct {
	consul  *testenv.ConsulProc
	h       *testenv.HAProxyProc
	a       *spoa.Authorizer
	pubAddr string
	roots   *x509.CertPool
	served  chan error // Serve's result
}

func startSidecar(t *testing.T) *sidecar {
	t.Helper()
	c := testenv.Consul(t, testenv.ConsulOptions{DefaultDeny: true})
	dir := testenv.ShortTempDir(t)

	roots, _, err := c.Client.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	var rootsPEM strings.Builder
	pool := x509.NewCertPool()
	for _, r := range roots.Roots {
		rootsPEM.WriteString(strings.TrimSpace(r.RootCertPEM) + "\n")
		pool.AppendCertsFromPEM([]byte(r.RootCertPEM))
	}
	leaf, _, err := c.Client.Agent().ConnectCALeaf("web", nil)
	if err != nil {
		t.Fatal(err)
	}
	ports := testenv.FreePorts(t, 2)
	spec := bootstrap.Spec{
		Service:       "web",
		LeafFile:      testenv.WriteFile(t, dir, "leaf.pem", strings.TrimSpace(leaf.CertPEM)+"\n"+leaf.PrivateKeyPEM),
		RootsFile:     testenv.WriteFile(t, dir, "roots.pem", rootsPEM.String()),
		SPOEFile:      filepath.Join(dir, "spoe.cfg"),
		AuthzMap:      filepath.Join(dir, "authz.map"),
		CrtList:       filepath.Join(dir, "public.crtlist"),
		SNI:           "web.default.dc1.internal.t.consul",
		SPOASocket:    filepath.Join(dir, "spoa.sock"),
		HardStopAfter: 5 * time.Second,
		Public: bootstrap.Public{BindAddr: "127.0.0.1", BindPort: ports[1],
			LocalAddr: "127.0.0.1", LocalPort: okServer(t)},
	}
	cfg, files, err := bootstrap.RenderFiles(spec, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		testenv.WriteFile(t, filepath.Dir(f.Path), filepath.Base(f.Path), f.Content)
	}
	if strings.Contains(cfg, "nbthread") {
		t.Fatal("the rendered config sets nbthread: this test must run HAProxy's default (one thread per core)")
	}

	a := spoa.New("web", nil, zaptest.NewLogger(t))
	ln, err := net.Listen("unix", spec.SPOASocket)
	if err != nil {
		t.Fatal(err)
	}
	s := &sidecar{consul: c, a: a, pubAddr: fmt.Sprintf("127.0.0.1:%d", ports[1]), roots: pool, served: make(chan error, 1)}
	go func() { s.served <- a.Serve(ln) }()

	ctx, cancel := context.WithCancel(context.Background())
	watched, rooted := make(chan error, 1), make(chan error, 1)
	go func() { watched <- a.WatchIntentions(ctx, c.Client) }()
	go func() { rooted <- a.WatchRoots(ctx, c.Client) }()
	t.Cleanup(func() {
		cancel()
		if err := <-watched; err != nil {
			t.Errorf("WatchIntentions: %v", err)
		}
		if err := <-rooted; err != nil {
			t.Errorf("WatchRoots: %v", err)
		}
		a.Close()
	})

	s.h, err = testenv.StartHAProxy(t, dir, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// okServer is the local application: it writes "ok\n" and closes.
func okServer(t *testing.T) int {
	t.Helper()
	return testenv.ServeTCP(t, func(c net.Conn) { fmt.Fprint(c, "ok\n") })
}

// clientCert returns a TLS certificate for service name from Consul.
func (s *sidecar) clientCert(t *testing.T, name string) (tls.Certificate, *api.LeafCert) {
	t.Helper()
	leaf, _, err := s.consul.Client.Agent().ConnectCALeaf(name, nil)
	if err != nil {
		t.Fatal(err)
	}
	kp, err := tls.X509KeyPair([]byte(leaf.CertPEM), []byte(leaf.PrivateKeyPEM))
	if err != nil {
		t.Fatal(err)
	}
	return kp, leaf
}

// outcome of one inbound connection.
type outcome int

const (
	served   outcome = iota // the app answered "ok"
	refused                 // TLS accepted, then closed by HAProxy without data
	tlsError                // the handshake failed (a TLS alert)
)

func (o outcome) String() string {
	return [...]string{"served", "refused", "tls error"}[o]
}

// dial opens one inbound connection with cert and reports what happened.
// The server's leaf is checked against the Consul roots and its SPIFFE ID,
// as a Connect client does (no DNS SAN, so no hostname verification).
func (s *sidecar) dial(cert tls.Certificate) (outcome, error) {
	cfg := &tls.Config{
		// Offer cert whatever CAs the server names: Go's default only
		// sends a certificate issued by one of them.
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil },
		InsecureSkipVerify:   true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			leaf := cs.PeerCertificates[0]
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: s.roots, Intermediates: inter}); err != nil {
				return err
			}
			if len(leaf.URIs) != 1 || !strings.HasSuffix(leaf.URIs[0].Path, "/svc/web") {
				return fmt.Errorf("server is %v, want web", leaf.URIs)
			}
			return nil
		},
	}
	d := &net.Dialer{Timeout: 2 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", s.pubAddr, cfg)
	if err != nil {
		return tlsError, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	switch {
	case err == nil && line == "ok\n":
		return served, nil
	case err == nil:
		return served, fmt.Errorf("unexpected answer %q", line)
	case errors.As(err, new(tls.AlertError)), strings.Contains(err.Error(), "tls:"):
		// TLS 1.3: a rejected client certificate shows on the first read.
		return tlsError, err
	case errors.Is(err, net.ErrClosed), errors.As(err, new(net.Error)) && err.(net.Error).Timeout():
		return refused, fmt.Errorf("no answer: %w", err)
	default:
		return refused, nil // EOF or reset: HAProxy rejected the connection
	}
}

func (s *sidecar) expect(t *testing.T, what string, cert tls.Certificate, want outcome) {
	t.Helper()
	got, err := s.dial(cert)
	if got != want || err != nil && want != tlsError {
		t.Fatalf("%s: %v (%v), want %v", what, got, err, want)
	}
}

// pollUntil dials every 10 ms until the outcome is want or limit passes,
// and returns how long it took from start.
func (s *sidecar) pollUntil(cert tls.Certificate, want outcome, start time.Time, limit time.Duration) (time.Duration, bool) {
	for {
		got, err := s.dial(cert)
		if got == want && err == nil {
			return time.Since(start), true
		}
		if time.Since(start) > limit {
			return time.Since(start), false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestInboundIntentions(t *testing.T) {
	s := startSidecar(t)
	client, clientLeaf := s.clientCert(t, "client")
	intentions := s.consul.Client.Connect()

	s.expect(t, "default deny", client, refused)
	st := s.a.Stats()
	if st.Denied == 0 || st.LocalDecisions == 0 || st.Errors != 0 {
		t.Fatalf("after a default deny: %+v, want a denial from the intentions held", st)
	}

	start := time.Now()
	if _, err := intentions.IntentionUpsert(&api.Intention{SourceName: "client", DestinationName: "web", Action: api.IntentionActionAllow}, nil); err != nil {
		t.Fatal(err)
	}
	took, ok := s.pollUntil(client, served, start, 5*time.Second)
	if !ok {
		t.Fatalf("allow intention not effective after %s; stats %+v", took, s.a.Stats())
	}
	t.Logf("allow effective after %s", took)

	// Many new connections at once: every one is served, with HAProxy's
	// default nbthread (2 here) spreading them over threads and agent
	// connections. An ACK sent on another thread's connection would be
	// ignored by HAProxy, and that connection refused after the 1 s
	// processing timeout. (Durations include the client's TLS handshake,
	// slow under -race, so they are logged, not bounded.)
	t.Run("burst", func(t *testing.T) {
		s.a.Invalidate()
		before := s.a.Stats()
		// What is checked is that no connection is lost between threads
		// and agent connections, not capacity: under the race detector,
		// 200 handshakes on two cores outlast HAProxy's 1 s SPOE
		// processing timeout, which refuses them (fail closed).
		n := 200
		if raceEnabled {
			n = 50
		}
		var (
			wg      sync.WaitGroup
			mu      sync.Mutex
			slowest time.Duration
		)
		errs := make(chan error, n)
		for i := range n {
			wg.Go(func() {
				t0 := time.Now()
				got, err := s.dial(client)
				took := time.Since(t0)
				if got != served || err != nil {
					errs <- fmt.Errorf("connection %d: %v (%v) after %s", i, got, err, took)
				}
				mu.Lock()
				slowest = max(slowest, took)
				mu.Unlock()
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		t.Logf("%d concurrent connections served, slowest %s", n, slowest)
		after := s.a.Stats()
		if calls := after.LocalDecisions - before.LocalDecisions; calls != 1 {
			t.Errorf("%d decisions for %d connections of one new source, want 1 (stats %+v)", calls, n, after)
		}
	})

	// The deny must refuse new connections within 1 s of the write.
	start = time.Now()
	if _, err := intentions.IntentionUpsert(&api.Intention{SourceName: "client", DestinationName: "web", Action: api.IntentionActionDeny}, nil); err != nil {
		t.Fatal(err)
	}
	wrote := time.Since(start)
	took, ok = s.pollUntil(client, refused, start, time.Second)
	t.Logf("deny effective %s after the write began (the write itself took %s)", took, wrote)
	if !ok {
		t.Fatalf("deny intention not effective within 1s (%s); stats %+v", took, s.a.Stats())
	}
	// And it stays so.
	for range 5 {
		s.expect(t, "after deny", client, refused)
	}

	t.Run("serial matches Consul", func(t *testing.T) {
		// What the agent sends as ClientCertSerial is Consul's format.
		cert, err := x509.ParseCertificate(client.Certificate[0])
		if err != nil {
			t.Fatal(err)
		}
		want := clientLeaf.SerialNumber
		var b strings.Builder
		for i, c := range cert.SerialNumber.Bytes() {
			if i > 0 {
				b.WriteByte(':')
			}
			fmt.Fprintf(&b, "%02x", c)
		}
		if b.String() != want {
			t.Errorf("serial %s, Consul says %s", b.String(), want)
		}
	})

	t.Run("other CA refused at TLS", func(t *testing.T) {
		ca := testenv.NewCA(t, "impostor")
		certPEM, keyPEM := ca.Leaf(t, clientLeaf.ServiceURI)
		kp, err := tls.X509KeyPair([]byte(certPEM), []byte(keyPEM))
		if err != nil {
			t.Fatal(err)
		}
		before := s.a.Stats()
		got, err := s.dial(kp)
		if got != tlsError {
			t.Fatalf("impostor leaf: %v (%v), want a TLS error", got, err)
		}
		t.Logf("impostor refused: %v", err)
		if after := s.a.Stats(); after.Allowed+after.Denied+after.Undecided != before.Allowed+before.Denied+before.Undecided {
			t.Errorf("the agent was asked about a connection TLS refused")
		}
	})

	t.Run("watch shares the authorize cache entry", func(t *testing.T) {
		// Authorize for a destination nobody watched yet creates the
		// agent-cache entry; the watch's query must then hit that
		// very entry, or it could see a change before authorize does.
		if _, err := s.consul.Client.Agent().ConnectAuthorize(&api.AgentAuthorizeParams{
			Target: "fresh", ClientCertURI: clientLeaf.ServiceURI, ClientCertSerial: clientLeaf.SerialNumber,
		}); err != nil {
			t.Fatal(err)
		}
		_, meta, err := s.consul.Client.Connect().IntentionMatch(
			&api.IntentionMatch{By: api.IntentionMatchDestination, Names: []string{spoa.WatchName("fresh")}},
			&api.QueryOptions{UseCache: true})
		if err != nil {
			t.Fatal(err)
		}
		if !meta.CacheHit {
			t.Errorf("the watch query missed the agent cache entry authorize filled")
		}
	})

	t.Run("agent stopped fails closed", func(t *testing.T) {
		if _, err := intentions.IntentionUpsert(&api.Intention{SourceName: "client", DestinationName: "web", Action: api.IntentionActionAllow}, nil); err != nil {
			t.Fatal(err)
		}
		if took, ok := s.pollUntil(client, served, time.Now(), 5*time.Second); !ok {
			t.Fatalf("allowed again: not served after %s", took)
		}
		s.a.Close()
		if err := <-s.served; err != nil {
			t.Errorf("Serve after Close: %v", err)
		}
		for i := range 5 {
			t0 := time.Now()
			s.expect(t, fmt.Sprintf("agent stopped, connection %d", i), client, refused)
			t.Logf("refused after %s", time.Since(t0))
		}
	})
	t.Logf("stats: %+v", s.a.Stats())
}
