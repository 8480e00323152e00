package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// impostor is a TLS server holding a real Consul leaf of another service,
// requiring a mesh client certificate, as a compromised workload or the
// new holder of a reused address would. It answers every request with
// "hello from impostor" and counts what reaches it.
type impostor struct {
	port int
	// handshakes counts completed mTLS handshakes; bytes the bytes read
	// after them (request bytes).
	handshakes, bytes atomic.Int64
}

func startImpostor(t *testing.T, c *api.Client, service string) *impostor {
	t.Helper()
	cert := meshCert(t, c, service)
	roots, _, err := c.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	for _, r := range roots.Roots {
		pool.AppendCertsFromPEM([]byte(r.RootCertPEM))
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
		NextProtos:   []string{"http/1.1"},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	imp := &impostor{port: ln.Addr().(*net.TCPAddr).Port}
	go testenv.Serve(ln, func(conn net.Conn) {
		if err := conn.(*tls.Conn).Handshake(); err != nil {
			return
		}
		imp.handshakes.Add(1)
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			imp.bytes.Add(int64(n))
			if n > 0 {
				fmt.Fprint(conn, "HTTP/1.1 200 OK\r\nContent-Length: 19\r\n\r\nhello from impostor")
			}
			if err != nil {
				return
			}
		}
	})
	return imp
}

// logCount counts the sidecar's log lines that contain every one of parts.
func (s *sidecar) logCount(parts ...string) int {
	n := 0
	for _, l := range strings.Split(s.out.String(), "\n") {
		all := true
		for _, p := range parts {
			all = all && strings.Contains(l, p)
		}
		if all {
			n++
		}
	}
	return n
}

// TestImpostorGetsNothing: an instance registered for the upstream "server"
// but holding a valid leaf of another service ("other") never gets a slot:
// it reads zero request bytes, no caller ever gets its answer, calls on
// new and kept-alive connections keep reaching the real instance without
// one failure, and the client sidecar logs and counts the mismatch, naming
// the instance and the identity it showed, each time it verifies again.
// A real new instance registered afterwards goes into service.
func TestImpostorGetsNothing(t *testing.T) {
	m, otherID := startIdentityMesh(t)
	c, ports, client := m.c, m.ports, m.client

	// Traffic on new connections and on one kept-alive connection, both
	// through the whole event; any answer but the real one fails.
	stopNew := load(serves(ports[3], "hello from server"))
	tr := &http.Transport{MaxIdleConnsPerHost: 1}
	t.Cleanup(tr.CloseIdleConnections)
	keptClient := &http.Client{Timeout: 5 * time.Second, Transport: tr}
	stopKept := load(func() error {
		resp, err := keptClient.Get(fmt.Sprintf("http://127.0.0.1:%d/", ports[3]))
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if got := strings.TrimSpace(string(body)); err == nil && (resp.StatusCode != 200 || got != "hello from server") {
			err = fmt.Errorf("%d %q", resp.StatusCode, got)
		}
		return err
	})

	imp := startImpostor(t, c, "other")
	if err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: "impostor", Name: "server-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Port: imp.port, Address: "127.0.0.1",
		Checks: passing(), Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "server", DestinationServiceID: "server"},
	}); err != nil {
		t.Fatal(err)
	}
	mismatch := func(n int) func() error {
		return func() error {
			if got := client.logCount("presents another identity", `"instance": "impostor"`, otherID); got < n {
				return fmt.Errorf("%d mismatch log lines naming the impostor and %s, want %d", got, otherID, n)
			}
			return nil
		}
	}
	eventually(t, 10*time.Second, "the mismatch is logged", mismatch(1))
	// It is verified again after a backoff (5 s), and refused again;
	// traffic flows all along.
	eventually(t, 15*time.Second, "the mismatch is logged again", mismatch(2))

	// The counter has the upstream alone as label; the log lines above
	// name the instance and the identity.
	if v, err := client.metric("haproxy_connect_upstream_identity_mismatches_total", "upstream", "up_server"); err != nil || v < 2 {
		t.Errorf("identity mismatches of up_server = %v %v, want 2 or more", v, err)
	}
	if err := client.inBackend("up_server", imp.port)(); err == nil {
		t.Errorf("the impostor is in service")
	}

	// A real new instance (a relay to the server's sidecar) goes into
	// service once verified, while the impostor stays registered.
	extra := addServerEndpoint(t, c, "server-extra", ports[0])
	eventually(t, 10*time.Second, "the real new instance is in service", client.inBackend("up_server", extra))

	okNew, failedNew, firstNew := stopNew()
	okKept, failedKept, firstKept := stopKept()
	if okNew == 0 || failedNew > 0 {
		t.Errorf("new connections: %d of %d calls failed; first: %v", failedNew, okNew+failedNew, firstNew)
	}
	if okKept == 0 || failedKept > 0 {
		t.Errorf("kept-alive connection: %d of %d calls failed; first: %v", failedKept, okKept+failedKept, firstKept)
	}
	if n := imp.bytes.Load(); n != 0 {
		t.Errorf("the impostor read %d request bytes, want 0", n)
	}
	if n := imp.handshakes.Load(); n != 0 {
		t.Errorf("the impostor completed %d mTLS handshakes, want 0 (the verifier stops at its certificate)", n)
	}
	t.Logf("%d calls on new connections, %d on a kept-alive one; the impostor read %d bytes",
		okNew, okKept, imp.bytes.Load())
	sum, _ := client.metric("haproxy_connect_upstream_verification_seconds_sum")
	n, _ := client.metric("haproxy_connect_upstream_verification_seconds_count")
	if n > 0 {
		t.Logf("%.0f verifications, %.2f ms each on average (connect and mTLS handshake, against HAProxy, the impostor and relays)", n, sum/n*1000)
	}
}

// TestVerificationFailsClosed: an instance that cannot be reached for
// verification (nothing listens at its port) is not placed, and calls keep
// reaching the real instance.
func TestVerificationFailsClosed(t *testing.T) {
	m := startMesh(t, testenv.ConsulOptions{}, "http")
	c, ports, client := m.c, m.ports, m.client
	eventually(t, 10*time.Second, "mesh serves", serves(ports[3], "hello from server"))
	stop := load(serves(ports[3], "hello from server"))
	dead := testenv.FreePort(t)
	if err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: "dead", Name: "server-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Port: dead, Address: "127.0.0.1",
		Checks: passing(), Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "server", DestinationServiceID: "server"},
	}); err != nil {
		t.Fatal(err)
	}
	// Retried with backoff (1 s, 2 s): two failures logged.
	eventually(t, 10*time.Second, "the unreachable instance is logged twice", func() error {
		if n := client.logCount("not reachable for verification", `"instance": "dead"`); n < 2 {
			return errors.New("not yet")
		}
		return nil
	})
	ok, failed, first := stop()
	if err := client.inBackend("up_server", dead)(); err == nil {
		t.Errorf("the unverified instance is in service")
	}
	if ok == 0 || failed > 0 {
		t.Errorf("%d of %d calls failed; first: %v", failed, ok+failed, first)
	}
}

// handover is an address whose holder changes: a relay to target that,
// on Switch, closes its connections (the old holder is gone) and sends new
// ones to another target.
type handover struct {
	port   int
	mu     sync.Mutex
	target string
	conns  map[net.Conn]struct{}
}

func newHandover(t *testing.T, target string) *handover {
	h := &handover{target: target, conns: map[net.Conn]struct{}{}}
	h.port = testenv.ServeTCP(t, func(c net.Conn) {
		h.mu.Lock()
		target := h.target
		h.conns[c] = struct{}{}
		h.mu.Unlock()
		testenv.Pipe(c, target)
		h.mu.Lock()
		delete(h.conns, c)
		h.mu.Unlock()
	})
	return h
}

func (h *handover) Switch(target string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.target = target
	for c := range h.conns {
		c.Close()
	}
}

// TestAddressChangesHands is the residual window: an endpoint proven to be
// the destination, whose address then passes to a workload holding another
// service's valid leaf (a reused address). HAProxy's own check of the
// server's URI SAN on each response refuses that workload's answers (a
// 502), which it counts; the controller sees the count, verifies the
// address again within seconds, and parks it. No caller ever gets the
// other workload's answer, and calls succeed again once it is parked.
func TestAddressChangesHands(t *testing.T) {
	m, otherID := startIdentityMesh(t)
	c, ports, client := m.c, m.ports, m.client
	imp := startImpostor(t, c, "other")
	h := newHandover(t, fmt.Sprintf("127.0.0.1:%d", ports[0]))
	if err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: "server-2", Name: "server-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Port: h.port, Address: "127.0.0.1",
		Checks: passing(), Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "server", DestinationServiceID: "server"},
	}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the second instance is in service", client.inBackend("up_server", h.port))

	var okN, denied, impostorAnswers, otherFailures atomic.Int64
	var firstOther atomic.Value
	stop := loadN(2, func() error {
		code, body, err := get(ports[3])
		switch {
		case err == nil && code == 200 && body == "hello from server":
			okN.Add(1)
		case strings.Contains(body, "impostor"):
			impostorAnswers.Add(1)
		case err == nil && code == 502:
			denied.Add(1)
		default:
			otherFailures.Add(1)
			firstOther.CompareAndSwap(nil, fmt.Sprintf("%d %q %v", code, body, err))
		}
		return nil
	})
	h.Switch(fmt.Sprintf("127.0.0.1:%d", imp.port))
	eventually(t, 20*time.Second, "the new holder is found out", func() error {
		if client.logCount("presents another identity", `"instance": "server-2"`, otherID) == 0 {
			return errors.New("no mismatch logged")
		}
		if client.inBackend("up_server", h.port)() == nil {
			return errors.New("still in service")
		}
		return nil
	})
	stop()
	for i := range 200 {
		if err := serves(ports[3], "hello from server")(); err != nil {
			t.Fatalf("call %d after the address was parked: %v", i, err)
		}
	}
	if n := impostorAnswers.Load(); n != 0 {
		t.Errorf("%d callers got the new holder's answer", n)
	}
	if n := otherFailures.Load(); n != 0 {
		t.Errorf("%d calls failed other than by a refused answer; first: %v", n, firstOther.Load())
	}
	if client.logCount("verifying it again") == 0 {
		t.Errorf("the re-verification was not triggered by HAProxy's counters")
	}
	t.Logf("window: %d answers refused (502), %d calls ok; the new holder read %d request bytes before it was parked",
		denied.Load(), okN.Load(), imp.bytes.Load())
}

// startIdentityMesh starts the http mesh, waits until it serves, and
// returns it with the SPIFFE ID of a service "other" in its trust domain:
// the identity an impostor shows.
func startIdentityMesh(t *testing.T) (*mesh, string) {
	t.Helper()
	m := startMesh(t, testenv.ConsulOptions{}, "http")
	eventually(t, 10*time.Second, "mesh serves", serves(m.ports[3], "hello from server"))
	roots, _, err := m.c.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	return m, fmt.Sprintf("spiffe://%s/ns/default/dc/dc1/svc/other", roots.TrustDomain)
}
