package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// TestInboundRefusesForeignIdentities: client certificates that HAProxy's
// handshake accepts (signed by the cluster's CA) but that carry no service
// identity of this cluster are refused by the agent, each with its reason
// in the sidecar's log and /metrics, while a service's leaf keeps getting
// through. Consul runs with a CA whose key the test holds, so it can mint
// the certificates a compromised or misused issuer could. Intentions
// allow everything: each refusal is the agent's own.
func TestInboundRefusesForeignIdentities(t *testing.T) {
	w := startInboundWeb(t)
	td, s := w.td, w.sidecar
	cert := func(uris ...string) tls.Certificate { return w.leaf(t, uris...) }
	// call opens a connection to the public listener with c and returns
	// the line the application wrote, or the error that ended it.
	call := func(c tls.Certificate) (string, error) {
		line, _, err := w.call(&tls.Config{Certificates: []tls.Certificate{c}})
		return line, err
	}
	service := cert("spiffe://" + td + "/ns/default/dc/dc1/svc/client")
	allowed := func() error {
		if line, err := call(service); line != "hello from web" {
			return fmt.Errorf("service leaf: got %q, %v", line, err)
		}
		return nil
	}
	// The agent's roots watch may answer after /readyz: until then it
	// decides nothing, and HAProxy refuses.
	eventually(t, 10*time.Second, "a service leaf gets through", allowed)
	// The intention watch's first answer drops the cache once; past it,
	// the service leaf's decision stays cached.
	eventually(t, 10*time.Second, "the intention watch answered", func() error {
		if v, err := s.metric("haproxy_connect_authz_intentions_index"); err != nil || v == 0 {
			return fmt.Errorf("intentions index %v, %v", v, err)
		}
		return nil
	})
	if err := allowed(); err != nil {
		t.Fatal(err)
	}
	callsBefore, err := s.metric("haproxy_connect_authz_local_decisions_total")
	if err != nil {
		t.Fatal(err)
	}

	otherTD := "spiffe://22222222-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/client"
	agentID := "spiffe://" + td + "/agent/client/dc/dc1/id/node-1"
	tests := []struct {
		name   string
		cert   tls.Certificate
		reason string // the metric's label
		log    string // in the decision's log line
	}{
		{"another trust domain", cert(otherTD), "trust_domain", `"source": "` + otherTD + `", "serial": `},
		{"agent identity", cert(agentID), "not_service", `"source": "` + agentID + `", "serial": `},
		{"two URI SANs", cert("spiffe://"+td+"/ns/default/dc/dc1/svc/client", "spiffe://"+td+"/ns/default/dc/dc1/svc/web"), "uri_sans", `"source": "-", "serial": `},
	}
	reasons := map[string]string{
		"trust_domain": `"reason": "SPIFFE ID of another trust domain: \"22222222-2222-3333-4444-555555555555.consul\", the cluster's is \"` + td + `\""`,
		"not_service":  `"reason": "SPIFFE ID is not a service identity: \"` + agentID + `\""`,
		"uri_sans":     `"reason": "not exactly one URI SAN: 2 (spiffe://` + td + `/ns/default/dc/dc1/svc/client, spiffe://` + td + `/ns/default/dc/dc1/svc/web)"`,
	}
	const rounds = 3 // the first decides, the others come from the cache
	for round := range rounds {
		for _, tt := range tests {
			if line, err := call(tt.cert); line != "" || err == nil {
				t.Errorf("round %d, %s: got %q, %v; want the connection refused", round, tt.name, line, err)
			}
			// Traffic from a real service keeps flowing between them.
			if err := allowed(); err != nil {
				t.Errorf("round %d, after %s: %v", round, tt.name, err)
			}
		}
	}
	out := s.out.String()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got, err := s.metric("haproxy_connect_authz_refused_total", "reason", tt.reason); err != nil || got != rounds {
				t.Errorf("refused{%s} = %v, %v; want %d", tt.reason, got, err, rounds)
			}
			var lines []string
			for _, l := range strings.Split(out, "\n") {
				if strings.Contains(l, "inbound connection decision") && strings.Contains(l, tt.log) {
					lines = append(lines, l)
				}
			}
			// One line per connection: info for the decision, debug
			// for each cached repeat.
			if len(lines) != rounds || !strings.Contains(lines[0], reasons[tt.reason]) || !strings.Contains(lines[0], `"cached": false`) {
				t.Errorf("decision log lines for %s:\n%s\nwant %d, the first with %s", tt.name, strings.Join(lines, "\n"), rounds, reasons[tt.reason])
			}
		})
	}
	if got, err := s.metric("haproxy_connect_authz_local_decisions_total"); err != nil || got != callsBefore {
		t.Errorf("uncached decisions = %v, %v; want %v: a refusal decides nothing from intentions, and the service leaf's decision is cached", got, err, callsBefore)
	}
}

// TestInboundResumption: a caller that resumes TLS sessions (not a
// haproxy-connect sidecar: those never resume) still does, on TLS 1.3, and
// a resumed connection is authorized from the certificate of the session
// it resumes. The listener keeps sessions in its cache and hands out
// references to them, not stateless tickets that seal the whole session
// (no-tls-tickets in bootstrap): the ticket a caller gets back is short.
func TestInboundResumption(t *testing.T) {
	w := startInboundWeb(t)
	leaf := w.leaf(t, "spiffe://"+w.td+"/ns/default/dc/dc1/svc/client")
	cache := &recordingCache{ClientSessionCache: tls.NewLRUClientSessionCache(4)}
	// call returns the application's line and whether the connection
	// resumed a session. Reading the line also takes in the tickets the
	// listener sends after the handshake.
	call := func() (string, bool, error) {
		line, cs, err := w.call(&tls.Config{
			Certificates:       []tls.Certificate{leaf},
			ClientSessionCache: cache,
			MinVersion:         tls.VersionTLS13,
		})
		return line, cs.DidResume, err
	}
	// The agent's roots watch may answer after /readyz.
	eventually(t, 10*time.Second, "a service leaf gets through", func() error {
		if line, _, err := call(); line != "hello from web" {
			return fmt.Errorf("got %q, %v", line, err)
		}
		return nil
	})
	for i := range 3 {
		line, resumed, err := call()
		if line != "hello from web" || !resumed {
			t.Fatalf("call %d: got %q, resumed %v, %v; want the line over a resumed session", i, line, resumed, err)
		}
	}
	if n := cache.longest.Load(); n == 0 || n > 64 {
		t.Errorf("longest ticket %d bytes: want a session cache reference (OpenSSL's are 32 bytes), not a sealed session", n)
	}
}

// inboundWeb is "web", a tcp app that writes one line to each connection,
// behind its sidecar, in a Consul whose CA key the test holds.
type inboundWeb struct {
	ca      *testenv.CA
	td      string // the cluster's trust domain
	port    int    // the sidecar's public listener
	sidecar *sidecar
}

func startInboundWeb(t *testing.T) *inboundWeb {
	t.Helper()
	ca := testenv.NewCA(t, "cluster root")
	consul := testenv.Consul(t, testenv.ConsulOptions{CA: ca})
	roots, _, err := consul.Client.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	port := testenv.FreePorts(t, 1)[0]
	register(t, consul.Client, "web", tcpApp(t, "hello from web"), port, map[string]any{"protocol": "tcp"})
	return &inboundWeb{ca: ca, td: roots.TrustDomain, port: port, sidecar: startSidecar(t, consul, "web")}
}

// leaf is a certificate of the cluster's CA with uris as its URI SANs.
func (w *inboundWeb) leaf(t *testing.T, uris ...string) tls.Certificate {
	t.Helper()
	c, k, err := w.ca.IssueLeafURIs(uris...)
	if err != nil {
		t.Fatal(err)
	}
	kp, err := tls.X509KeyPair([]byte(c), []byte(k))
	if err != nil {
		t.Fatal(err)
	}
	return kp
}

// call opens a connection to the public listener with cfg and returns the
// line the application wrote, or the error that ended it, and the
// connection's TLS state. It sets cfg.InsecureSkipVerify: the sidecar's
// leaf has only a URI SAN, and what is under test is the client side.
func (w *inboundWeb) call(cfg *tls.Config) (string, tls.ConnectionState, error) {
	cfg.InsecureSkipVerify = true
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", fmt.Sprintf("127.0.0.1:%d", w.port), cfg)
	if err != nil {
		return "", tls.ConnectionState{}, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	return strings.TrimSpace(line), conn.ConnectionState(), err
}

// recordingCache records the length of the longest ticket put in it.
type recordingCache struct {
	tls.ClientSessionCache
	longest atomic.Int64
}

func (c *recordingCache) Put(key string, cs *tls.ClientSessionState) {
	if cs != nil {
		if ticket, _, err := cs.ResumptionState(); err == nil && int64(len(ticket)) > c.longest.Load() {
			c.longest.Store(int64(len(ticket)))
		}
	}
	c.ClientSessionCache.Put(key, cs)
}

// TestPublicListenerLog: an HTTP public listener logs each request and
// each failed handshake, and nothing for a connection that carries no
// request: the calling sidecar's identity proof of this endpoint (a
// handshake, then close), and a connect-and-close probe such as Consul's
// TCP check. Without "option dontlognull" each of those wrote a line.
func TestPublicListenerLog(t *testing.T) {
	m := startMesh(t, testenv.ConsulOptions{}, "http")
	public := fmt.Sprintf("127.0.0.1:%d", m.ports[0])
	// The client sidecar placed the server only after proving it: a
	// full handshake with the public listener, closed without a request.
	eventually(t, 10*time.Second, "a request through both sidecars", get200(m.ports[3]))

	for range 3 {
		c, err := net.Dial("tcp", public)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	// A caller without a client certificate: TLS 1.3 completes its side
	// of the handshake, then the listener refuses it.
	conn, err := tls.Dial("tcp", public, &tls.Config{InsecureSkipVerify: true})
	if err == nil {
		_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
		_, err = conn.Read(make([]byte, 1))
		conn.Close()
	}
	if err == nil {
		t.Fatal("a connection without a client certificate was served")
	}
	// HAProxy writes each line as the connection ends, in order: once the
	// refused handshake's line and a later request's are there, the
	// probes' and the proof's would be too.
	eventually(t, 10*time.Second, "the refused handshake is logged", func() error {
		if !strings.Contains(m.server.out.String(), "public_listener/1: SSL handshake failure") {
			return fmt.Errorf("no handshake failure line yet")
		}
		return nil
	})
	if err := get200(m.ports[3])(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "two requests logged", func() error {
		if n := strings.Count(m.server.out.String(), " GET / 200 "); n < 2 {
			return fmt.Errorf("%d request lines", n)
		}
		return nil
	})
	for _, l := range strings.Split(m.server.out.String(), "\n") {
		if strings.Contains(l, "public_listener/1: ") && !strings.Contains(l, "SSL handshake failure") {
			t.Errorf("a line for a connection that carried no request: %s", l)
		}
		if strings.Contains(l, "<BADREQ>") {
			t.Errorf("a line for a connection that carried no request: %s", l)
		}
	}
}

// TestHTTPRemembersAllows: an HTTP listener remembers an allow per client
// certificate and intentions generation, as a tcp listener does. New
// connections with a certificate allowed before are served with no agent
// round trip, and the access log still names their caller (from the
// sources map); a deny moves the generation, so the next new connection
// is refused, and so is the next request of a kept-alive connection whose
// verdict came from the remembered allow: it carries the generation it was
// remembered under.
func TestHTTPRemembersAllows(t *testing.T) {
	// No intentions and no ACLs: Consul's default allows.
	consul := testenv.Consul(t, testenv.ConsulOptions{})
	c := consul.Client
	port := testenv.FreePort(t)
	register(t, c, "server", httpApp(t, "server"), port, map[string]any{"protocol": "http"})
	server := startSidecar(t, consul, "server")
	tlsCfg := &tls.Config{Certificates: []tls.Certificate{meshCert(t, c, "other")}, InsecureSkipVerify: true}
	url := fmt.Sprintf("https://127.0.0.1:%d/", port)
	fresh := freshCaller(tlsCfg, url)
	eventually(t, 10*time.Second, "a new connection is served", func() error {
		if code, err := fresh(); err != nil || code != 200 {
			return fmt.Errorf("%d %v", code, err)
		}
		return nil
	})
	allows := func() float64 {
		v, err := server.metric("haproxy_connect_authz_decisions_total", "result", "allow")
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	before := allows()
	for i := range 50 {
		if code, err := fresh(); err != nil || code != 200 {
			t.Fatalf("new connection %d with a remembered allow: %d %v", i, code, err)
		}
	}
	if after := allows(); after != before {
		t.Errorf("the agent was asked %v more times for 50 connections with a remembered allow, want 0", after-before)
	}
	// Every request names its caller, the first decided by the agent and
	// the 50 others from the remembered allow.
	roots, _, err := c.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	named := strings.Count(server.out.String(), " src=spiffe://"+roots.TrustDomain+"/ns/default/dc/dc1/svc/other ")
	if named < 51 || strings.Contains(server.out.String(), "src=cached") || strings.Contains(server.out.String(), "src=- ") {
		t.Errorf("%d access log lines name the caller, want 51 or more and none without it:\n%s", named, server.out.String())
	}
	// What an operator sees with socat: one entry, the certificate's
	// SHA-256 and the caller. Cleared (the controller's prune), the next
	// new connection asks the agent once, and the caller is named again.
	sources := filepath.Join(server.stateDir, "sources.map")
	showSources := func() []runtime.MapEntry {
		entries, err := server.rt.Map(context.Background(), sources)
		if err != nil {
			t.Fatal(err)
		}
		return entries
	}
	other := "spiffe://" + roots.TrustDomain + "/ns/default/dc/dc1/svc/other"
	if e := showSources(); len(e) != 1 || len(e[0].Key) != 64 || e[0].Value != other {
		t.Errorf("sources map %v, want one entry naming %s", e, other)
	}
	clear, err := runtime.ClearMap(sources)
	if err != nil {
		t.Fatal(err)
	}
	if rs, err := server.rt.Exec(context.Background(), clear); err != nil || rs.Err() != nil {
		t.Fatalf("clear map: %v %v", err, rs.Err())
	}
	if code, err := fresh(); err != nil || code != 200 {
		t.Fatalf("new connection after the sources map was cleared: %d %v", code, err)
	}
	if after := allows(); after != before+1 {
		t.Errorf("the agent was asked %v times for a certificate missing from the sources map, want 1", after-before)
	}
	if e := showSources(); len(e) != 1 || e[0].Value != other {
		t.Errorf("sources map after the next connection %v, want one entry naming %s", e, other)
	}
	before = allows()

	// Its verdict is the remembered one: the agent is not asked for it.
	kept, reused := keptAlive(t, &http.Transport{MaxIdleConnsPerHost: 1, TLSClientConfig: tlsCfg}, url)
	if code, err := kept(); err != nil || code != 200 {
		t.Fatalf("kept-alive connection's first request: %d %v", code, err)
	}
	if after := allows(); after != before {
		t.Errorf("the agent was asked for a kept-alive connection with a remembered allow")
	}

	index := intention(t, c, "other", "server", api.IntentionActionDeny)
	eventually(t, 10*time.Second, "the server sidecar sees the deny", server.sawIntentions(index))
	eventually(t, 10*time.Second, "the kept-alive connection is refused", func() error {
		code, err := kept()
		if err != nil || code != 403 || !reused.Load() {
			return fmt.Errorf("%d %v (reused %v), want 403 on the same connection", code, err, reused.Load())
		}
		return nil
	})
	for i := range 20 {
		if code, err := fresh(); err != nil || code != 403 {
			t.Fatalf("new connection %d after the deny: %d %v, want 403", i, code, err)
		}
	}
}

// freshCaller returns a call of url on a new connection each time.
func freshCaller(tlsCfg *tls.Config, url string) func() (int, error) {
	return func() (int, error) {
		tr := &http.Transport{TLSClientConfig: tlsCfg, DisableKeepAlives: true}
		defer tr.CloseIdleConnections()
		resp, err := (&http.Client{Timeout: 5 * time.Second, Transport: tr}).Get(url)
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		return resp.StatusCode, nil
	}
}
