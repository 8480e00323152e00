package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// chainMesh is a client whose upstream "server" (protocol http) is
// shaped by discovery chain entries, and the instances of "server" and
// of other services, each behind its own sidecar.
type chainMesh struct {
	consul   *testenv.ConsulProc
	c        *api.Client
	client   *sidecar
	upstream int // the client's upstream port for "server"
}

// addInstance registers instance id of service with tags and an app
// answering "hello from <id>", and starts its sidecar. handler, when
// set, serves instead.
func (m *chainMesh) addInstance(t *testing.T, service, id string, tags []string, handler http.Handler) *sidecar {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if handler == nil {
		handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintf(w, "hello from %s\n", id) })
	}
	srv := &http.Server{Handler: handler}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	if err := m.c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: id, Name: service, Tags: tags, Port: ln.Addr().(*net.TCPAddr).Port, Address: "127.0.0.1", Checks: passing(),
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
			Port: testenv.FreePort(t), Address: "127.0.0.1", Checks: passing(),
			Proxy: &api.AgentServiceConnectProxyConfig{Config: map[string]any{"protocol": "http"}},
		}},
	}); err != nil {
		t.Fatal(err)
	}
	return startSidecar(t, m.consul, id)
}

// setEntry writes a config entry.
func (m *chainMesh) setEntry(t *testing.T, e api.ConfigEntry) {
	t.Helper()
	if _, _, err := m.c.ConfigEntries().Set(e, nil); err != nil {
		t.Fatalf("config entry %s/%s: %v", e.GetKind(), e.GetName(), err)
	}
}

// startChainMesh starts Consul with service-defaults protocol=http for
// services, and the client with its upstream "server".
func startChainMesh(t *testing.T, services ...string) *chainMesh {
	t.Helper()
	m := &chainMesh{consul: testenv.Consul(t, testenv.ConsulOptions{})}
	m.c = m.consul.Client
	for _, s := range services {
		m.setEntry(t, &api.ServiceConfigEntry{Kind: api.ServiceDefaults, Name: s, Protocol: "http"})
	}
	ports := testenv.FreePorts(t, 3)
	m.upstream = ports[2]
	register(t, m.c, "client", ports[0], ports[1], nil,
		api.Upstream{DestinationName: "server", LocalBindPort: m.upstream, Config: map[string]any{"protocol": "http"}})
	return m
}

// versionSubsets is a resolver of "server" with subsets v1 and v2 by tag.
func versionSubsets() *api.ServiceResolverConfigEntry {
	return &api.ServiceResolverConfigEntry{Kind: api.ServiceResolver, Name: "server", DefaultSubset: "v1",
		Subsets: map[string]api.ServiceResolverSubset{
			"v1": {Filter: "Service.Tags contains v1"},
			"v2": {Filter: "Service.Tags contains v2"},
		}}
}

func split(v1, v2 float32) *api.ServiceSplitterConfigEntry {
	return &api.ServiceSplitterConfigEntry{Kind: api.ServiceSplitter, Name: "server", Splits: []api.ServiceSplit{
		{Weight: v1, ServiceSubset: "v1"}, {Weight: v2, ServiceSubset: "v2"},
	}}
}

// share sends n requests on new connections and returns the fraction
// "hello from <id>" answered, and the first failure.
func share(port, n int, id string) (float64, error) {
	hits := 0
	for range n {
		code, body, err := get(port)
		if err != nil || code != 200 {
			return 0, fmt.Errorf("%d %q %v", code, body, err)
		}
		if body == "hello from "+id {
			hits++
		}
	}
	return float64(hits) / float64(n), nil
}

// waitLog waits until the sidecar's output holds line n times or more.
func (s *sidecar) waitLog(t *testing.T, d time.Duration, line string, n int) {
	t.Helper()
	eventually(t, d, "log line "+line, func() error {
		if c := strings.Count(s.out.String(), line); c < n {
			return fmt.Errorf("%d times", c)
		}
		return nil
	})
}

// TestChainSplitRuntime: a 90/10 split by tag subsets is served within 5
// points over 2000 requests; moved to 50/50 under load, it takes no
// reload and fails no request, kept-alive or new.
func TestChainSplitRuntime(t *testing.T) {
	m := startChainMesh(t, "server")
	m.setEntry(t, versionSubsets())
	m.setEntry(t, split(90, 10))
	m.addInstance(t, "server", "server-1", []string{"v1"}, nil)
	m.addInstance(t, "server", "server-2", []string{"v2"}, nil)
	m.client = startSidecar(t, m.consul, "client")
	eventually(t, 20*time.Second, "v2 served", func() error {
		for range 50 {
			if _, body, _ := get(m.upstream); body == "hello from server-2" {
				return nil
			}
		}
		return fmt.Errorf("no answer from server-2")
	})
	got, err := share(m.upstream, 2000, "server-2")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("90/10: v2 answered %.1f%%", 100*got)
	if got < 0.05 || got > 0.15 {
		t.Fatalf("v2 answered %.1f%% of 2000 requests, want 10 +- 5", 100*got)
	}

	reloads := m.client.reloads(t)
	applied := strings.Count(m.client.out.String(), "discovery chain applied at run time")
	tr := &http.Transport{MaxIdleConnsPerHost: 4}
	t.Cleanup(tr.CloseIdleConnections)
	kept, reused := keptAlive(t, tr, fmt.Sprintf("http://127.0.0.1:%d/", m.upstream))
	var keptOK atomic.Int64
	stopKept := load(func() error {
		code, err := kept()
		if err == nil && code != 200 {
			err = fmt.Errorf("status %d", code)
		}
		if err == nil {
			keptOK.Add(1)
		}
		return err
	})
	stopNew := loadN(2, get200(m.upstream))
	m.setEntry(t, split(50, 50))
	m.client.waitLog(t, 20*time.Second, "discovery chain applied at run time", applied+1)
	got, err = share(m.upstream, 2000, "server-2")
	okK, failedK, errK := stopKept()
	okN, failedN, errN := stopNew()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("50/50: v2 answered %.1f%%; during the change %d kept-alive and %d new-connection requests", 100*got, okK, okN)
	if got < 0.45 || got > 0.55 {
		t.Fatalf("v2 answered %.1f%% of 2000 requests, want 50 +- 5", 100*got)
	}
	if failedK+failedN > 0 {
		t.Fatalf("%d kept-alive and %d new-connection requests failed: %v %v", failedK, failedN, errK, errN)
	}
	if okK == 0 || !reused.Load() {
		t.Fatalf("no request reused a kept-alive connection (%d ok)", okK)
	}
	if r := m.client.reloads(t); r != reloads {
		t.Fatalf("reloads %d -> %d: a weight change must not reload", reloads, r)
	}
}

// request sends method path with headers to the upstream port on a new
// connection and returns the status, the body and the response headers.
func request(port int, path string, hdr map[string]string) (int, string, http.Header, error) {
	req, err := http.NewRequest("GET", fmt.Sprintf("http://127.0.0.1:%d%s", port, path), nil)
	if err != nil {
		return 0, "", nil, err
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := noKeepAlive.Do(req)
	if err != nil {
		return 0, "", nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b)), resp.Header, err
}

// TestChainRoutes: a path route to a second service (with a prefix
// rewrite and header changes), a header route and a query parameter plus
// method route to a subset, and a route
// whose request timeout answers 504; then that timeout raised at run
// time, with no reload.
func TestChainRoutes(t *testing.T) {
	m := startChainMesh(t, "server", "admin")
	m.setEntry(t, versionSubsets())
	slow := func(id string) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/slow" {
				time.Sleep(1500 * time.Millisecond)
			}
			fmt.Fprintf(w, "hello from %s\n", id)
		})
	}
	router := func(timeout time.Duration) *api.ServiceRouterConfigEntry {
		return &api.ServiceRouterConfigEntry{Kind: api.ServiceRouter, Name: "server", Routes: []api.ServiceRoute{
			{
				Match: &api.ServiceRouteMatch{HTTP: &api.ServiceRouteHTTPMatch{PathPrefix: "/admin"}},
				Destination: &api.ServiceRouteDestination{Service: "admin", PrefixRewrite: "/api",
					RequestHeaders:  &api.HTTPHeaderModifiers{Set: map[string]string{"x-route": "admin"}, Remove: []string{"x-secret"}},
					ResponseHeaders: &api.HTTPHeaderModifiers{Add: map[string]string{"x-served-by": "admin route"}}},
			},
			{
				Match:       &api.ServiceRouteMatch{HTTP: &api.ServiceRouteHTTPMatch{Header: []api.ServiceRouteHTTPMatchHeader{{Name: "x-canary", Exact: "1"}}}},
				Destination: &api.ServiceRouteDestination{ServiceSubset: "v2"},
			},
			{
				Match: &api.ServiceRouteMatch{HTTP: &api.ServiceRouteHTTPMatch{
					QueryParam: []api.ServiceRouteHTTPMatchQueryParam{{Name: "canary", Exact: "yes"}}, Methods: []string{"GET"}}},
				Destination: &api.ServiceRouteDestination{ServiceSubset: "v2"},
			},
			{
				Match:       &api.ServiceRouteMatch{HTTP: &api.ServiceRouteHTTPMatch{PathExact: "/slow"}},
				Destination: &api.ServiceRouteDestination{ServiceSubset: "v1", RequestTimeout: timeout},
			},
		}}
	}
	m.setEntry(t, router(500*time.Millisecond))
	m.addInstance(t, "server", "server-1", []string{"v1"}, slow("server-1"))
	m.addInstance(t, "server", "server-2", []string{"v2"}, nil)
	m.addInstance(t, "admin", "admin-1", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "admin saw %s x-route=%s x-secret=%s\n", r.URL.Path, r.Header.Get("x-route"), r.Header.Get("x-secret"))
	}))
	m.client = startSidecar(t, m.consul, "client")

	eventually(t, 20*time.Second, "admin route", func() error {
		code, body, h, err := request(m.upstream, "/admin/users", map[string]string{"x-secret": "s", "x-route": "forged"})
		if err != nil || code != 200 || body != "admin saw /api/users x-route=admin x-secret=" || h.Get("x-served-by") != "admin route" {
			return fmt.Errorf("%d %q %v %v", code, body, h, err)
		}
		return nil
	})
	for _, tt := range []struct {
		path string
		hdr  map[string]string
		code int
		body string
	}{
		{"/", nil, 200, "hello from server-1"},
		{"/", map[string]string{"x-canary": "1"}, 200, "hello from server-2"},
		{"/", map[string]string{"x-canary": "2"}, 200, "hello from server-1"},
		{"/other", map[string]string{"x-canary": "1"}, 200, "hello from server-2"},
		{"/?canary=yes", nil, 200, "hello from server-2"},
		{"/?canary=no", nil, 200, "hello from server-1"},
		{"/slow", nil, 504, ""},
	} {
		for range 5 {
			code, body, _, err := request(m.upstream, tt.path, tt.hdr)
			if err != nil || code != tt.code || (tt.body != "" && body != tt.body) {
				t.Fatalf("GET %s %v: %d %q %v; want %d %q", tt.path, tt.hdr, code, body, err, tt.code, tt.body)
			}
		}
	}

	reloads := m.client.reloads(t)
	applied := strings.Count(m.client.out.String(), "discovery chain applied at run time")
	m.setEntry(t, router(5*time.Second))
	m.client.waitLog(t, 20*time.Second, "discovery chain applied at run time", applied+1)
	if code, body, _, err := request(m.upstream, "/slow", nil); err != nil || code != 200 || body != "hello from server-1" {
		t.Fatalf("GET /slow after the timeout was raised: %d %q %v", code, body, err)
	}
	if r := m.client.reloads(t); r != reloads {
		t.Fatalf("reloads %d -> %d: a request timeout change must not reload", reloads, r)
	}
}

// checksOf sets every check of the service instance id to status.
func (m *chainMesh) checksOf(t *testing.T, id, status string) {
	t.Helper()
	checks, err := m.c.Agent().Checks()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for cid, c := range checks {
		if c.ServiceID != id {
			continue
		}
		n++
		if err := m.c.Agent().UpdateTTL(cid, "test", status); err != nil {
			t.Fatal(err)
		}
	}
	if n == 0 {
		t.Fatalf("no checks for %s", id)
	}
}

// TestChainFailover: when every instance of the primary subset fails its
// checks, requests go to the failover subset, and back when they pass;
// traffic flows throughout without a failed request.
func TestChainFailover(t *testing.T) {
	m := startChainMesh(t, "server")
	r := versionSubsets()
	r.Failover = map[string]api.ServiceResolverFailover{"v1": {ServiceSubset: "v2"}}
	m.setEntry(t, r)
	m.addInstance(t, "server", "server-1", []string{"v1"}, nil)
	m.addInstance(t, "server", "server-2", []string{"v2"}, nil)
	m.client = startSidecar(t, m.consul, "client")
	eventually(t, 20*time.Second, "v1 serves", serves(m.upstream, "hello from server-1"))

	stop := loadN(2, get200(m.upstream))
	m.checksOf(t, "server-1-sidecar-proxy", api.HealthCritical)
	took := eventually(t, 20*time.Second, "failover to v2", serves(m.upstream, "hello from server-2"))
	for range 200 {
		if err := serves(m.upstream, "hello from server-2")(); err != nil {
			t.Fatalf("after failover: %v", err)
		}
	}
	m.checksOf(t, "server-1-sidecar-proxy", api.HealthPassing)
	back := eventually(t, 20*time.Second, "back to v1", serves(m.upstream, "hello from server-1"))
	for range 200 {
		if err := serves(m.upstream, "hello from server-1")(); err != nil {
			t.Fatalf("after the primary came back: %v", err)
		}
	}
	ok, failed, first := stop()
	t.Logf("failover after %s, back after %s; %d requests during, %d failed", took, back, ok, failed)
	if failed > 0 {
		t.Fatalf("%d of %d requests failed: %v", failed, ok+failed, first)
	}
}

// TestChainRetries: next to a good instance, one answers 503 to every
// request: requests fail until a router's RetryOnStatusCodes [503]
// (NumRetries 3), after which none does, under load. Then that instance
// is replaced by one that resets every connection: still none fails (its
// sidecar closes the stream without a response, which is retried
// elsewhere, "retry-on empty-response", with or without a router).
//
// Two instances, not three: a retry goes to another server than the one
// that failed (option redispatch), not to one that never failed, so with
// two bad instances of three a request can meet bad ones four times in a
// row; Envoy's retries, without a host predicate, have the same limit.
func TestChainRetries(t *testing.T) {
	m := startChainMesh(t, "server")
	m.addInstance(t, "server", "server-1", nil, nil)
	m.addInstance(t, "server", "server-503", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	m.client = startSidecar(t, m.consul, "client")
	var codes map[int]int
	eventually(t, 20*time.Second, "the 503 instance placed", func() error {
		codes = map[int]int{}
		for range 30 {
			code, _, err := get(m.upstream)
			if err != nil {
				return err
			}
			codes[code]++
		}
		if codes[503] == 0 {
			return fmt.Errorf("no 503 yet: %v", codes)
		}
		return nil
	})
	t.Logf("without retries: status counts %v", codes)
	m.setEntry(t, &api.ServiceRouterConfigEntry{Kind: api.ServiceRouter, Name: "server", Routes: []api.ServiceRoute{{
		Match:       &api.ServiceRouteMatch{HTTP: &api.ServiceRouteHTTPMatch{PathPrefix: "/"}},
		Destination: &api.ServiceRouteDestination{NumRetries: 3, RetryOnConnectFailure: true, RetryOnStatusCodes: []uint32{503}},
	}}})
	m.client.waitLog(t, 20*time.Second, "discovery chain target up_server:server::dc1 added", 1)
	eventually(t, 20*time.Second, "retries in place", func() error {
		for range 30 {
			if code, body, err := get(m.upstream); err != nil || code != 200 {
				return fmt.Errorf("%d %q %v", code, body, err)
			}
		}
		return nil
	})
	stop := loadN(2, get200(m.upstream))
	for range 300 {
		if code, body, err := get(m.upstream); err != nil || code != 200 || body != "hello from server-1" {
			t.Fatalf("%d %q %v", code, body, err)
		}
	}
	// One bad instance at a time (see above).
	if err := m.c.Agent().ServiceDeregister("server-503"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, "the 503 instance gone", m.client.inBackendCount("up_server:server::dc1", 1))
	m.addInstance(t, "server", "server-reset", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			if tc, ok := c.(*net.TCPConn); ok {
				_ = tc.SetLinger(0) // RST
			}
			c.Close()
		}
	}))
	eventually(t, 20*time.Second, "the resetting instance placed", m.client.inBackendCount("up_server:server::dc1", 2))
	for range 300 {
		if code, body, err := get(m.upstream); err != nil || code != 200 || body != "hello from server-1" {
			t.Fatalf("%d %q %v", code, body, err)
		}
	}
	ok, failed, first := stop()
	t.Logf("with retries: %d requests under load, %d failed", ok, failed)
	if failed > 0 {
		t.Fatalf("%d of %d requests failed with retries: %v", failed, ok+failed, first)
	}
}

// inBackendCount is a check that backend has n servers not in
// maintenance.
func (s *sidecar) inBackendCount(backend string, n int) func() error {
	return func() error {
		st, err := s.rt.ServersState(context.Background(), backend)
		if err != nil {
			return err
		}
		up := 0
		for _, srv := range st {
			if !srv.Maint() {
				up++
			}
		}
		if up != n {
			return fmt.Errorf("%s: %d servers in service, want %d: %+v", backend, up, n, st)
		}
		return nil
	}
}

// TestChainAdoption: a controller killed with SIGKILL leaves HAProxy
// routing; the next one on the state directory adopts it with no reload
// (the configuration id leaves weights out, and adoption waits for the
// chains), and applies a weight change at run time.
func TestChainAdoption(t *testing.T) {
	m := startChainMesh(t, "server")
	m.setEntry(t, versionSubsets())
	m.setEntry(t, split(100, 0))
	m.addInstance(t, "server", "server-1", []string{"v1"}, nil)
	m.addInstance(t, "server", "server-2", []string{"v2"}, nil)
	m.client = startSidecar(t, m.consul, "client")
	eventually(t, 20*time.Second, "v1 serves", serves(m.upstream, "hello from server-1"))
	reloads := m.client.reloads(t)
	stop := loadN(2, get200(m.upstream))
	if err := m.client.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-m.client.done
	// Moved while no controller runs: the next one finds HAProxy on the
	// old weights, which are no part of the configuration's identity.
	m.setEntry(t, split(0, 100))
	next := launchSidecar(t, m.consul, "client", m.client.stateDir)
	next.waitReady(t)
	next.waitLog(t, 20*time.Second, "haproxy adopted", 1)
	next.waitLog(t, 20*time.Second, "discovery chain applied at run time", 1)
	eventually(t, 10*time.Second, "v2 serves", serves(m.upstream, "hello from server-2"))
	for range 200 {
		if err := serves(m.upstream, "hello from server-2")(); err != nil {
			t.Fatal(err)
		}
	}
	ok, failed, first := stop()
	if failed > 0 {
		t.Fatalf("%d of %d requests failed: %v", failed, ok+failed, first)
	}
	if strings.Contains(next.out.String(), "adopted haproxy runs another configuration") {
		t.Fatal("the adopted configuration looked foreign")
	}
	if r := next.reloads(t); r != reloads {
		t.Fatalf("reloads %d -> %d across the adoption and a weight change", reloads, r)
	}
}

// TestChainHashPolicy: a ring_hash resolver on a header keeps each value
// of the header on one instance, and spreads values over both.
func TestChainHashPolicy(t *testing.T) {
	m := startChainMesh(t, "server")
	m.setEntry(t, &api.ServiceResolverConfigEntry{Kind: api.ServiceResolver, Name: "server",
		LoadBalancer: &api.LoadBalancer{Policy: "ring_hash", HashPolicies: []api.HashPolicy{{Field: "header", FieldValue: "x-user"}}}})
	m.addInstance(t, "server", "server-1", nil, nil)
	m.addInstance(t, "server", "server-2", nil, nil)
	m.client = startSidecar(t, m.consul, "client")
	eventually(t, 20*time.Second, "both instances placed", m.client.inBackendCount("up_server:server::dc1", 2))
	served := map[string]string{}
	for u := range 20 {
		user := fmt.Sprintf("user-%d", u)
		for range 10 {
			code, body, _, err := request(m.upstream, "/", map[string]string{"x-user": user})
			if err != nil || code != 200 {
				t.Fatalf("%s: %d %q %v", user, code, body, err)
			}
			if prev, ok := served[user]; ok && prev != body {
				t.Fatalf("%s served by %q then %q", user, prev, body)
			}
			served[user] = body
		}
	}
	by := map[string]int{}
	for _, b := range served {
		by[b]++
	}
	t.Logf("20 users over instances: %v", by)
	if len(by) != 2 {
		t.Fatalf("20 users all on one instance: %v", by)
	}
}

// failingApp answers nothing: it reads each request and closes the
// connection, with a TCP RST when reset (SO_LINGER 0, then close), else
// with a FIN; it counts the requests it failed.
func failingApp(hits *atomic.Int64, reset bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		c, _, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		if tc, ok := c.(*net.TCPConn); ok && reset {
			_ = tc.SetLinger(0)
		}
		c.Close()
	})
}

// hammer sends requests to the upstream port on new connections (two
// loops) and on kept-alive ones (two loops, one transport) until each
// kind has sent n and 3 s have passed, and returns the counts and the
// first failure of each kind.
func hammer(t *testing.T, port, n int) (okNew, failedNew, okKept, failedKept int64, errNew, errKept error) {
	t.Helper()
	tr := &http.Transport{MaxIdleConnsPerHost: 4}
	kept, reused := keptAlive(t, tr, fmt.Sprintf("http://127.0.0.1:%d/", port))
	var newN, keptN atomic.Int64
	var keptReused atomic.Bool
	stopKept := loadN(2, func() error {
		keptN.Add(1)
		code, err := kept()
		if err == nil && reused.Load() {
			keptReused.Store(true)
		}
		if err == nil && code != 200 {
			err = fmt.Errorf("status %d", code)
		}
		return err
	})
	stopNew := loadN(2, func() error {
		newN.Add(1)
		return get200(port)()
	})
	start := time.Now()
	eventually(t, 2*time.Minute, fmt.Sprintf("%d requests of each kind", n), func() error {
		if newN.Load() < int64(n) || keptN.Load() < int64(n) || time.Since(start) < 3*time.Second {
			return fmt.Errorf("%d new-connection and %d kept-alive requests after %s", newN.Load(), keptN.Load(), time.Since(start))
		}
		return nil
	})
	okKept, failedKept, errKept = stopKept()
	okNew, failedNew, errNew = stopNew()
	if !keptReused.Load() {
		t.Fatalf("no kept-alive request reused a connection")
	}
	return
}

// TestRetriesResettingInstance: next to a good instance, one whose
// application resets (or closes without answering) every connection it
// reads a request on. First without a router, then with one (NumRetries
// 3, RetryOnConnectFailure): thousands of requests on new and kept-alive
// connections, for seconds, and none fails. The failing instance's
// sidecar closes the stream without a response, which the calling
// sidecar retries on another server ("retry-on empty-response", on every
// http upstream backend, with or without a router).
func TestRetriesResettingInstance(t *testing.T) {
	for _, tt := range []struct {
		name  string
		reset bool
	}{{"reset", true}, {"close", false}} {
		t.Run(tt.name, func(t *testing.T) {
			m := startChainMesh(t, "server")
			var failed atomic.Int64
			m.addInstance(t, "server", "server-1", nil, nil)
			m.addInstance(t, "server", "server-bad", nil, failingApp(&failed, tt.reset))
			m.client = startSidecar(t, m.consul, "client")
			eventually(t, 20*time.Second, "both instances placed", m.client.inBackendCount("up_server", 2))
			for _, phase := range []string{"without a router", "with a router"} {
				if phase == "with a router" {
					m.setEntry(t, &api.ServiceRouterConfigEntry{Kind: api.ServiceRouter, Name: "server", Routes: []api.ServiceRoute{{
						Match:       &api.ServiceRouteMatch{HTTP: &api.ServiceRouteHTTPMatch{PathPrefix: "/"}},
						Destination: &api.ServiceRouteDestination{NumRetries: 3, RetryOnConnectFailure: true},
					}}})
					m.client.waitLog(t, 20*time.Second, "discovery chain target up_server:server::dc1 added", 1)
					eventually(t, 20*time.Second, "both instances placed in the target", m.client.inBackendCount("up_server:server::dc1", 2))
				}
				before := failed.Load()
				okN, failedN, okK, failedK, errN, errK := hammer(t, m.upstream, 1500)
				bad := failed.Load() - before
				t.Logf("%s: new connections %d ok, %d failed; kept-alive %d ok, %d failed; the application failed %d requests",
					phase, okN, failedN, okK, failedK, bad)
				if bad == 0 {
					t.Fatalf("%s: the failing instance got no request", phase)
				}
				if failedN+failedK > 0 {
					t.Fatalf("%s: %d new-connection requests failed (first: %v), %d kept-alive (first: %v)", phase, failedN, errN, failedK, errK)
				}
			}
		})
	}
}

// TestChainPassiveHealthCheck: an upstream routed by a discovery chain
// (a resolver) with passive_health_check: the target backend's server of
// the instance whose application answers 500 is marked down, and while it
// is down every request is served by the other instance.
func TestChainPassiveHealthCheck(t *testing.T) {
	m := &chainMesh{consul: testenv.Consul(t, testenv.ConsulOptions{})}
	m.c = m.consul.Client
	m.setEntry(t, &api.ServiceConfigEntry{Kind: api.ServiceDefaults, Name: "server", Protocol: "http"})
	m.setEntry(t, &api.ServiceResolverConfigEntry{Kind: api.ServiceResolver, Name: "server", ConnectTimeout: 4 * time.Second})
	ports := testenv.FreePorts(t, 3)
	m.upstream = ports[2]
	register(t, m.c, "client", ports[0], ports[1], nil, api.Upstream{DestinationName: "server", LocalBindPort: m.upstream,
		Config: map[string]any{"protocol": "http", "passive_health_check": map[string]any{"interval": "5s", "max_failures": 3}}})
	m.addInstance(t, "server", "server-1", nil, nil)
	m.addInstance(t, "server", "server-bad", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { http.Error(w, "broken", 500) }))
	m.client = startSidecar(t, m.consul, "client")
	const target = "up_server:server::dc1"
	eventually(t, 20*time.Second, "both instances in the target backend", m.client.inBackendCount(target, 2))
	svc, _, err := m.c.Agent().Service("server-bad-sidecar-proxy", nil)
	if err != nil {
		t.Fatal(err)
	}
	servedWhileDown(t, m.client, target, fmt.Sprintf("127.0.0.1:%d", svc.Port), m.upstream, "hello from server-1")
}

// TestChainOnlyPassing: a chain target takes an instance whose check is
// a warning while its resolver leaves OnlyPassing false (Consul's
// default, as Envoy does), and leaves it out once a subset says
// OnlyPassing; traffic flows through the change without a failure.
func TestChainOnlyPassing(t *testing.T) {
	m := startChainMesh(t, "server")
	m.setEntry(t, &api.ServiceResolverConfigEntry{Kind: api.ServiceResolver, Name: "server", ConnectTimeout: 4 * time.Second})
	m.addInstance(t, "server", "server-1", []string{"v1"}, nil)
	m.addInstance(t, "server", "server-warn", []string{"v1"}, nil)
	m.checksOf(t, "server-warn-sidecar-proxy", api.HealthWarning)
	m.client = startSidecar(t, m.consul, "client")
	eventually(t, 20*time.Second, "the warning instance placed", m.client.inBackendCount("up_server:server::dc1", 2))
	eventually(t, 20*time.Second, "the warning instance serves", serves(m.upstream, "hello from server-warn"))

	stop := loadN(2, get200(m.upstream))
	m.setEntry(t, &api.ServiceResolverConfigEntry{Kind: api.ServiceResolver, Name: "server", ConnectTimeout: 4 * time.Second, DefaultSubset: "v1",
		Subsets: map[string]api.ServiceResolverSubset{"v1": {Filter: "Service.Tags contains v1", OnlyPassing: true}}})
	m.client.waitLog(t, 20*time.Second, "discovery chain target up_server:server:v1:dc1 added", 1)
	eventually(t, 20*time.Second, "only the passing instance in the OnlyPassing target", m.client.inBackendCount("up_server:server:v1:dc1", 1))
	for range 200 {
		if err := serves(m.upstream, "hello from server-1")(); err != nil {
			t.Fatalf("with OnlyPassing: %v", err)
		}
	}
	m.checksOf(t, "server-warn-sidecar-proxy", api.HealthPassing)
	eventually(t, 20*time.Second, "the instance back once passing", m.client.inBackendCount("up_server:server:v1:dc1", 2))
	ok, failed, first := stop()
	t.Logf("%d requests through the change, %d failed", ok, failed)
	if failed > 0 {
		t.Fatalf("%d of %d requests failed: %v", failed, ok+failed, first)
	}
}
