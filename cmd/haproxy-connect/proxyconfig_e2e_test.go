package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// Issue 14's proxy config keys and registration features, end to end: a
// real Consul agent, the built binary, real HAProxy.

// holdApp is an HTTP application whose /hold requests wait until release
// is closed, counting how many it holds at once; /slow never answers
// before its client gives up; anything else answers at once.
type holdApp struct {
	inFlight, maxInFlight atomic.Int64
	release               chan struct{}
}

func newHoldApp(t *testing.T) (*holdApp, int) {
	a := &holdApp{release: make(chan struct{})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/hold":
			n := a.inFlight.Add(1)
			for m := a.maxInFlight.Load(); n > m && !a.maxInFlight.CompareAndSwap(m, n); m = a.maxInFlight.Load() {
			}
			select {
			case <-a.release:
			case <-r.Context().Done():
			}
			a.inFlight.Add(-1)
		case "/slow":
			<-r.Context().Done()
			return
		}
		fmt.Fprintln(w, "hello from server")
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return a, ln.Addr().(*net.TCPAddr).Port
}

// masterCommand sends one command to the sidecar's HAProxy master socket
// and returns the reply.
func (s *sidecar) masterCommand(cmd string) (string, error) {
	c, err := net.DialTimeout("unix", filepath.Join(s.stateDir, "master.sock"), 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, cmd+"\n"); err != nil {
		return "", err
	}
	// The master answers once the client is done.
	_ = c.(*net.UnixConn).CloseWrite()
	b, err := io.ReadAll(c)
	return string(b), err
}

// backendQueue is the current queue length (qcur) of backend in the
// sidecar's current worker.
func (s *sidecar) backendQueue(backend string) (int, error) {
	out, err := s.masterCommand("@1 show stat -1 2 -1")
	if err != nil {
		return 0, err
	}
	rows, err := statRows(out)
	if err != nil {
		return 0, err
	}
	for _, r := range rows {
		if r["pxname"] == backend && r["svname"] == "BACKEND" {
			return strconv.Atoi(r["qcur"])
		}
	}
	return 0, fmt.Errorf("no backend %s in show stat", backend)
}

// getPath is GET http://127.0.0.1:port<path> on a new connection, with
// timeout.
func getPath(port int, path string, timeout time.Duration) (int, string, error) {
	c := &http.Client{Timeout: timeout, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d%s", port, path))
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b)), err
}

// TestLimitsAndRequestTimeout: max_connections 2 and max_pending_requests
// 1 on the server's sidecar. Two held requests reach the application, the
// third waits in HAProxy's queue (the application never sees three), the
// fourth is refused with a 503 while the third waits; released, the queued
// one is served. Then local_request_timeout_ms is added to the
// registration: one reload, named by the key, and a request the
// application does not answer gets a 504, while others keep their 200s.
func TestLimitsAndRequestTimeout(t *testing.T) {
	app, appPort := newHoldApp(t)
	consul := testenv.Consul(t, testenv.ConsulOptions{})
	c := consul.Client
	ports := testenv.FreePorts(t, 4) // server sidecar, client app, client sidecar, upstream
	// A queued request waits at most "timeout queue", which is "timeout
	// connect" (local_connect_timeout_ms): long enough for the test.
	serverCfg := map[string]any{"protocol": "http", "max_connections": 2, "max_pending_requests": 1, "local_connect_timeout_ms": 30000}
	register(t, c, "server", appPort, ports[0], serverCfg)
	register(t, c, "client", ports[1], ports[2], nil,
		api.Upstream{DestinationName: "server", LocalBindPort: ports[3], Config: map[string]any{"protocol": "http"}})
	server := startSidecar(t, consul, "server")
	startSidecar(t, consul, "client")
	up := ports[3]
	eventually(t, 20*time.Second, "the upstream serves", serves(up, "hello from server"))

	type result struct {
		code int
		err  error
	}
	held := make(chan result, 3)
	hold := func() {
		code, _, err := getPath(up, "/hold", 30*time.Second)
		held <- result{code, err}
	}
	go hold()
	go hold()
	eventually(t, 10*time.Second, "two requests held by the application", func() error {
		if n := app.inFlight.Load(); n != 2 {
			return fmt.Errorf("%d in flight", n)
		}
		return nil
	})
	go hold()
	eventually(t, 10*time.Second, "the third request queued in local_app", func() error {
		q, err := server.backendQueue("local_app")
		if err == nil && q != 1 {
			err = fmt.Errorf("queue %d", q)
		}
		return err
	})
	if code, body, err := getPath(up, "/", 5*time.Second); err != nil || code != 503 {
		t.Errorf("a request past max_pending_requests: %d %q %v, want 503", code, body, err)
	}
	if n := app.inFlight.Load(); n != 2 {
		t.Errorf("the application holds %d requests, want 2 (max_connections)", n)
	}
	close(app.release)
	for range 3 {
		if r := <-held; r.err != nil || r.code != 200 {
			t.Errorf("a held or queued request: %d %v, want 200", r.code, r.err)
		}
	}
	if m := app.maxInFlight.Load(); m != 2 {
		t.Errorf("the application saw %d requests at once, want 2", m)
	}

	// local_request_timeout_ms: a registration change, so a reload whose
	// reason names the key.
	reloads := server.reloads(t)
	stop := loadN(2, get200(up))
	serverCfg["local_request_timeout_ms"] = 300
	register(t, c, "server", appPort, ports[0], serverCfg)
	eventually(t, 20*time.Second, "a reload for the new key", func() error {
		if server.reloads(t) == reloads {
			return fmt.Errorf("no reload yet")
		}
		return nil
	})
	if !strings.Contains(server.out.String(), "public listener changed (local_request_timeout_ms)") {
		t.Errorf("the reload reason does not name local_request_timeout_ms")
	}
	eventually(t, 10*time.Second, "a 504 from an application that does not answer", func() error {
		code, _, err := getPath(up, "/slow", 10*time.Second)
		if err == nil && code != 504 {
			err = fmt.Errorf("status %d", code)
		}
		return err
	})
	// Traffic keeps flowing after the change, on new and kept-alive
	// connections.
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	call, reused := keptAlive(t, tr, fmt.Sprintf("http://127.0.0.1:%d/", up))
	for range 50 {
		if code, err := call(); err != nil || code != 200 {
			t.Fatalf("kept-alive request after the change: %d %v", code, err)
		}
	}
	if !reused.Load() {
		t.Errorf("no connection was reused")
	}
	okN, failed, first := stop()
	if failed > 0 || okN == 0 {
		t.Errorf("load across the change: %d ok, %d failed, first %v", okN, failed, first)
	}
}

// TestExposeCheck: the service's HTTP check goes through the sidecar's
// expose listener (Expose.Checks): Consul rewrites it to the port it
// allocates, so it is critical until the sidecar serves that port, then
// passing. The expose listener serves that path alone.
func TestExposeCheck(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{})
	c := consul.Client
	appPort := httpApp(t, "server")
	sidecarPort := testenv.FreePort(t)
	err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: "web", Name: "web", Port: appPort, Address: "127.0.0.1",
		Checks: api.AgentServiceChecks{{CheckID: "web-http", Name: "http", HTTP: fmt.Sprintf("http://127.0.0.1:%d/health", appPort), Interval: "500ms"}},
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
			Port: sidecarPort, Address: "127.0.0.1", Checks: passing(),
			Proxy: &api.AgentServiceConnectProxyConfig{Config: map[string]any{"protocol": "http"}, Expose: api.ExposeConfig{Checks: true}},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	// Consul gives the check a port of its expose range and runs it
	// against the proxy there.
	checks, err := c.Agent().Checks()
	if err != nil {
		t.Fatal(err)
	}
	expose := checks["web-http"].ExposedPort
	if expose == 0 {
		t.Fatalf("Consul did not expose the check: %+v", checks["web-http"])
	}
	check := func(want string) func() error {
		return func() error {
			checks, err := c.Agent().Checks()
			if err != nil {
				return err
			}
			ch := checks["web-http"]
			if ch == nil || ch.Status != want {
				return fmt.Errorf("check: %+v", ch)
			}
			if !strings.Contains(ch.Output, fmt.Sprintf(":%d/health", expose)) {
				return fmt.Errorf("the check does not go through the expose port %d: %q", expose, ch.Output)
			}
			return nil
		}
	}
	eventually(t, 20*time.Second, "the check critical without the sidecar", check(api.HealthCritical))
	s := startSidecar(t, consul, "web")
	eventually(t, 20*time.Second, "the check passing through the sidecar", check(api.HealthPassing))
	if code, body, err := getPath(expose, "/health", 5*time.Second); err != nil || code != 200 || body != "hello from server" {
		t.Errorf("GET /health on the expose port: %d %q %v", code, body, err)
	}
	if code, _, err := getPath(expose, "/secret", 5*time.Second); err != nil || code != 404 {
		t.Errorf("GET /secret on the expose port: %d %v, want 404", code, err)
	}
	if strings.Contains(s.out.String(), "Expose.Paths") {
		t.Errorf("an expose path was refused:\n%s", failureLog(s.out.String(), 50, 0))
	}
}

// TestUnixSockets: the server's application listens on a unix socket
// (local_service_socket_path) and the client's upstream is a unix socket
// (local_bind_socket_path, mode 0600): requests pass end to end, on new
// and kept-alive connections.
func TestUnixSockets(t *testing.T) {
	dir := testenv.ShortTempDir(t)
	appSock, upSock := filepath.Join(dir, "app.sock"), filepath.Join(dir, "up.sock")
	ln, err := net.Listen("unix", appSock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "hello from server") })}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	consul := testenv.Consul(t, testenv.ConsulOptions{})
	c := consul.Client
	ports := testenv.FreePorts(t, 3)
	err = c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: "server", Name: "server", SocketPath: appSock, Checks: passing(),
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
			Port: ports[0], Address: "127.0.0.1", Checks: passing(),
			Proxy: &api.AgentServiceConnectProxyConfig{Config: map[string]any{"protocol": "http"}, LocalServiceSocketPath: appSock},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	// A refused value and an unknown key beside the sockets: each is
	// logged once, by name, and the rest applies.
	register(t, c, "client", ports[1], ports[2], map[string]any{"max_inbound_connections": "lots", "made_up_key": true}, api.Upstream{DestinationName: "server", LocalBindSocketPath: upSock,
		LocalBindSocketMode: "0600", Config: map[string]any{"protocol": "http"}})
	startSidecar(t, consul, "server")
	client := startSidecar(t, consul, "client")

	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", upSock)
	}}
	defer tr.CloseIdleConnections()
	viaSocket := func(keepAlive bool) error {
		cl := &http.Client{Timeout: 5 * time.Second, Transport: tr}
		req, _ := http.NewRequest("GET", "http://server/", nil)
		req.Close = !keepAlive
		resp, err := cl.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err == nil && (resp.StatusCode != 200 || strings.TrimSpace(string(b)) != "hello from server") {
			err = fmt.Errorf("%d %q", resp.StatusCode, b)
		}
		return err
	}
	eventually(t, 20*time.Second, "the upstream socket serves", func() error { return viaSocket(false) })
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 100 {
				if err := viaSocket(i%2 == 0); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Errorf("%d of 400 requests through the sockets failed, first: %v", len(errs), errs[0])
	}
	out := client.out.String()
	if strings.Contains(out, "upstream rejected") {
		t.Errorf("an upstream was rejected:\n%s", failureLog(out, 50, 0))
	}
	for _, want := range []string{
		`proxy registration: value refused; the rest keeps working	{"proxy_id": "client-sidecar-proxy", "key": "config max_inbound_connections"`,
		`proxy registration: not supported, not applied	{"proxy_id": "client-sidecar-proxy", "key": "config made_up_key"`,
	} {
		if n := strings.Count(out, want); n != 1 {
			t.Errorf("logged %d times, want once: %s", n, want)
		}
	}
}

// TestPassiveHealthCheck: an upstream with two instances, one of whose
// application answers 500. With passive_health_check (max_failures 3) the
// client's sidecar marks that server down after its errors, and while it
// is down every request is served by the other instance.
func TestPassiveHealthCheck(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{})
	c := consul.Client
	ports := testenv.FreePorts(t, 5) // good sidecar, bad sidecar, client app, client sidecar, upstream
	badApp := testenv.FreePort(t)
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", badApp))
	if err != nil {
		t.Fatal(err)
	}
	bad := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { http.Error(w, "broken", 500) })}
	go bad.Serve(ln)
	t.Cleanup(func() { bad.Close() })
	register(t, c, "server", httpApp(t, "server"), ports[0], map[string]any{"protocol": "http"})
	err = c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: "server-bad", Name: "server", Port: badApp, Address: "127.0.0.1", Checks: passing(),
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
			Port: ports[1], Address: "127.0.0.1", Checks: passing(),
			Proxy: &api.AgentServiceConnectProxyConfig{Config: map[string]any{"protocol": "http"}},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	register(t, c, "client", ports[2], ports[3], nil, api.Upstream{DestinationName: "server", LocalBindPort: ports[4],
		Config: map[string]any{"protocol": "http", "passive_health_check": map[string]any{"interval": "5s", "max_failures": 3}}})
	startSidecar(t, consul, "server")
	startSidecar(t, consul, "server-bad")
	client := startSidecar(t, consul, "client")
	up := ports[4]
	eventually(t, 20*time.Second, "both instances in up_server", func() error {
		if err := client.inBackend("up_server", ports[0])(); err != nil {
			return err
		}
		return client.inBackend("up_server", ports[1])()
	})
	servedWhileDown(t, client, "up_server", fmt.Sprintf("127.0.0.1:%d", ports[1]), up, "hello from server")
}

// holdHandler answers "hello from <id>" at once, except /hold, which
// waits until release is closed; inFlight counts the /hold requests it
// holds, hits the others.
func holdHandler(id string, release chan struct{}, inFlight, hits *atomic.Int64) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hold" {
			inFlight.Add(1)
			defer inFlight.Add(-1)
			select {
			case <-release:
			case <-r.Context().Done():
				return
			}
		} else {
			hits.Add(1)
		}
		fmt.Fprintf(w, "hello from %s\n", id)
	})
}

// TestUpstreamLimits: an upstream's limits, on a plain upstream
// (max_connections) and on one routed by a 50/50 splitter over two
// subsets (max_concurrent_requests, counted over every target backend).
// Traffic flows on new and kept-alive connections; then n held requests
// fill the limit, and under load every other request, new or kept-alive,
// is refused with a 503 and none reaches an application; released, the
// held ones are answered and traffic flows again without a failure.
func TestUpstreamLimits(t *testing.T) {
	const n = 6
	for _, tt := range []struct {
		name   string
		limits map[string]any
		routed bool
	}{
		{"plain", map[string]any{"max_connections": n, "max_concurrent_requests": 100}, false},
		{"routed", map[string]any{"max_concurrent_requests": n}, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			m := &chainMesh{consul: testenv.Consul(t, testenv.ConsulOptions{})}
			m.c = m.consul.Client
			m.setEntry(t, &api.ServiceConfigEntry{Kind: api.ServiceDefaults, Name: "server", Protocol: "http"})
			if tt.routed {
				m.setEntry(t, versionSubsets())
				m.setEntry(t, split(50, 50))
			}
			ports := testenv.FreePorts(t, 3)
			m.upstream = ports[2]
			register(t, m.c, "client", ports[0], ports[1], nil, api.Upstream{DestinationName: "server", LocalBindPort: m.upstream,
				Config: map[string]any{"protocol": "http", "limits": tt.limits}})
			release := make(chan struct{})
			var inFlight, hits atomic.Int64
			m.addInstance(t, "server", "server-1", []string{"v1"}, holdHandler("server-1", release, &inFlight, &hits))
			m.addInstance(t, "server", "server-2", []string{"v2"}, holdHandler("server-2", release, &inFlight, &hits))
			m.client = startSidecar(t, m.consul, "client")
			backends := []string{"up_server"}
			if tt.routed {
				backends = []string{"up_server:server:v1:dc1", "up_server:server:v2:dc1"}
			}
			for _, be := range backends {
				eventually(t, 20*time.Second, "an instance in "+be, m.client.inBackendCount(be, map[bool]int{false: 2, true: 1}[tt.routed]))
			}

			// Before: traffic flows.
			okN, failedN, okK, failedK, errN, errK := hammer(t, m.upstream, 300)
			if failedN+failedK > 0 {
				t.Fatalf("before the limit: %d new-connection requests failed (%v), %d kept-alive (%v)", failedN, errN, failedK, errK)
			}
			t.Logf("before: %d new-connection and %d kept-alive requests", okN, okK)

			// n held requests fill the limit.
			held := make(chan error, n)
			for range n {
				go func() {
					code, body, err := getPath(m.upstream, "/hold", 60*time.Second)
					if err == nil && code != 200 {
						err = fmt.Errorf("%d %q", code, body)
					}
					held <- err
				}()
			}
			eventually(t, 10*time.Second, fmt.Sprintf("%d requests held", n), func() error {
				if h := inFlight.Load(); h != n {
					return fmt.Errorf("%d held", h)
				}
				return nil
			})
			// Under load, every other request is refused.
			hitsBefore := hits.Load()
			tr := &http.Transport{MaxIdleConnsPerHost: 4}
			kept, _ := keptAlive(t, tr, fmt.Sprintf("http://127.0.0.1:%d/", m.upstream))
			var sentN, sentK atomic.Int64
			want503 := func(sent *atomic.Int64, call func() (int, error)) func() error {
				return func() error {
					sent.Add(1)
					code, err := call()
					if err == nil && code != 503 {
						err = fmt.Errorf("status %d, want 503", code)
					}
					return err
				}
			}
			stopNew := loadN(2, want503(&sentN, func() (int, error) { code, _, err := get(m.upstream); return code, err }))
			stopKept := loadN(2, want503(&sentK, kept))
			eventually(t, 30*time.Second, "requests past the limit", func() error {
				if sentN.Load() < 500 || sentK.Load() < 500 {
					return fmt.Errorf("%d new-connection and %d kept-alive requests", sentN.Load(), sentK.Load())
				}
				return nil
			})
			refusedN, wrongN, firstN := stopNew()
			refusedK, wrongK, firstK := stopKept()
			t.Logf("at the limit: %d new-connection and %d kept-alive requests refused", refusedN, refusedK)
			if wrongN+wrongK > 0 {
				t.Errorf("at the limit: %d new-connection (%v) and %d kept-alive (%v) requests not refused", wrongN, firstN, wrongK, firstK)
			}
			if refusedN == 0 || refusedK == 0 {
				t.Errorf("no request of a kind was refused: %d new, %d kept-alive", refusedN, refusedK)
			}
			if h := hits.Load() - hitsBefore; h != 0 || inFlight.Load() != n {
				t.Errorf("past the limit, %d requests reached an application (held %d)", h, inFlight.Load())
			}

			// Released: the held requests are answered, and traffic
			// flows again.
			close(release)
			for range n {
				if err := <-held; err != nil {
					t.Errorf("a held request: %v", err)
				}
			}
			okN, failedN, okK, failedK, errN, errK = hammer(t, m.upstream, 300)
			if failedN+failedK > 0 {
				t.Fatalf("after the limit: %d new-connection requests failed (%v), %d kept-alive (%v)", failedN, errN, failedK, errK)
			}
			t.Logf("after: %d new-connection and %d kept-alive requests", okN, okK)
		})
	}
}
