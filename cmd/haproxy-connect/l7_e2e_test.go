package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"regexp"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// httpServiceDefaults declares service's protocol http: Consul refuses
// an intention with Permissions for a destination that is not http.
func httpServiceDefaults(t *testing.T, c *api.Client, service string) {
	t.Helper()
	if _, _, err := c.ConfigEntries().Set(&api.ServiceConfigEntry{Kind: api.ServiceDefaults, Name: service, Protocol: "http"}, nil); err != nil {
		t.Fatal(err)
	}
}

// l7Intention sets the intentions of dst to one source, src, with perms.
func l7Intention(t *testing.T, c *api.Client, src, dst string, perms ...*api.IntentionPermission) {
	t.Helper()
	if _, _, err := c.ConfigEntries().Set(&api.ServiceIntentionsConfigEntry{
		Kind: api.ServiceIntentions, Name: dst,
		Sources: []*api.SourceIntention{{Name: src, Permissions: perms}},
	}, nil); err != nil {
		t.Fatal(err)
	}
}

func denyPrefix(p string) *api.IntentionPermission {
	return &api.IntentionPermission{Action: api.IntentionActionDeny, HTTP: &api.IntentionHTTPPermission{PathPrefix: p}}
}

func denyHeader(name string) *api.IntentionPermission {
	return &api.IntentionPermission{Action: api.IntentionActionDeny,
		HTTP: &api.IntentionHTTPPermission{Header: []api.IntentionHTTPHeaderPermission{{Name: name, Present: true}}}}
}

// denyHeaderValue denies requests whose header name has value v: a match
// on a value, which the agent decides (not the L7 map).
func denyHeaderValue(name, v string) *api.IntentionPermission {
	return &api.IntentionPermission{Action: api.IntentionActionDeny,
		HTTP: &api.IntentionHTTPPermission{Header: []api.IntentionHTTPHeaderPermission{{Name: name, Exact: v}}}}
}

func allowRest() *api.IntentionPermission {
	return &api.IntentionPermission{Action: api.IntentionActionAllow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/"}}
}

// keptAliveReq is keptAlive with a path and headers per call.
func keptAliveReq(t *testing.T, base string) (call func(path string, hdr ...string) (int, error), reused *atomic.Bool) {
	tr := &http.Transport{MaxIdleConnsPerHost: 1}
	t.Cleanup(tr.CloseIdleConnections)
	reused = new(atomic.Bool)
	ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
		GotConn: func(i httptrace.GotConnInfo) { reused.Store(i.Reused) },
	})
	client := &http.Client{Timeout: 5 * time.Second, Transport: tr}
	return func(path string, hdr ...string) (int, error) {
		return send(ctx, client, "GET", base+path, false, hdr...)
	}, reused
}

// send sends one request with headers hdr (name, value, ...), on a
// connection closed after it when closeConn, and returns its status.
func send(ctx context.Context, client *http.Client, method, url string, closeConn bool, hdr ...string) (int, error) {
	req, _ := http.NewRequestWithContext(ctx, method, url, nil)
	req.Close = closeConn
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}

// TestL7Permissions: an intention with Permissions (deny /admin, deny a
// request carrying X-Debug: 1, allow the rest) is enforced per request on
// the server's HTTP listener, the header match by the agent: 403 for the denied ones, 200 for the rest, on one
// kept-alive connection and on new ones; each 403 has an access-log line
// naming the source, the intention and the permission. An edit of the
// permissions applies with no reload (how long it took is logged).
func TestL7Permissions(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{DefaultDeny: true})
	c := consul.Client
	httpServiceDefaults(t, c, "server")
	ports := testenv.FreePorts(t, 4)
	register(t, c, "server", httpApp(t, "server"), ports[0], map[string]any{"protocol": "http"})
	register(t, c, "client", ports[1], ports[2], nil, api.Upstream{DestinationName: "server", LocalBindPort: ports[3], Config: map[string]any{"protocol": "http"}})
	l7Intention(t, c, "client", "server", denyPrefix("/admin"), denyHeaderValue("X-Debug", "1"), allowRest())
	server := startSidecar(t, consul, "server")
	startSidecar(t, consul, "client")
	base := fmt.Sprintf("http://127.0.0.1:%d", ports[3])

	call, reused := keptAliveReq(t, base)
	want := func(path string, code int, hdr ...string) func() error {
		return func() error {
			got, err := call(path, hdr...)
			if err != nil || got != code {
				return fmt.Errorf("GET %s %v: %d %v, want %d", path, hdr, got, err, code)
			}
			return nil
		}
	}
	eventually(t, 10*time.Second, "allowed path served", want("/", 200))
	cases := []struct {
		path string
		hdr  []string
		code int
	}{
		{"/admin/users", nil, 403},
		{"/", nil, 200},
		{"/", []string{"X-Debug", "1"}, 403},
		{"/api/items?x=/admin", nil, 200},
		{"/admin", nil, 403},
		{"/", []string{"X-Other", "1"}, 200},
		{"/", []string{"X-Debug", "2"}, 200},
	}
	for round := range 3 { // the same kept-alive connection, again and again
		for _, tc := range cases {
			if err := want(tc.path, tc.code, tc.hdr...)(); err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
			if !reused.Load() {
				t.Fatalf("round %d: GET %s did not reuse the kept-alive connection", round, tc.path)
			}
		}
	}
	// New connections, each: the same answers.
	for _, tc := range cases {
		req, _ := http.NewRequest("GET", base+tc.path, nil)
		for i := 0; i+1 < len(tc.hdr); i += 2 {
			req.Header.Set(tc.hdr[i], tc.hdr[i+1])
		}
		req.Close = true
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.code {
			t.Fatalf("new connection GET %s %v: %d, want %d", tc.path, tc.hdr, resp.StatusCode, tc.code)
		}
	}

	// One access-log line per denied request, naming who and why.
	for _, re := range []string{
		`src=spiffe://[^ ]+/svc/client .* GET /admin/users 403 .* intention=client perm=0:deny`,
		`src=spiffe://[^ ]+/svc/client .* GET / 403 .* intention=client perm=1:deny`,
		`src=spiffe://[^ ]+/svc/client .* GET / 200 .* intention=client perm=2:allow`,
		// The same request again: an allow HAProxy remembered.
		`src=spiffe://[^ ]+/svc/client .* GET / 200 .* intention=- perm=cached`,
	} {
		eventually(t, 5*time.Second, "access log "+re, func() error {
			if !regexp.MustCompile(re).MatchString(server.out.String()) {
				return errors.New("no such line")
			}
			return nil
		})
	}

	// HAProxy's L7 map decided the /admin denies (the first permission:
	// a path prefix), the agent the X-Debug ones (a match on a header's
	// value, which the map hands to the agent for every request past
	// /admin), and
	// fewer allows than were served: repeated requests were HAProxy's
	// remembered allows.
	denied, err := server.metric("haproxy_connect_authz_l7_requests_total", "result", "deny")
	if err != nil || denied < 3 || denied >= 3*3 {
		t.Fatalf("agent L7 denies %v (%v), want the 3 X-Debug ones at least, and none of the 6 /admin ones", denied, err)
	}
	allowed, err := server.metric("haproxy_connect_authz_l7_requests_total", "result", "allow")
	if err != nil || allowed < 1 || allowed >= 3*3 {
		t.Fatalf("agent L7 allows %v (%v), want fewer than the 9 allowed on the kept-alive connection", allowed, err)
	}

	// An edit: /admin allowed now, /internal and /api denied (/api
	// requests were allowed, and remembered, before). It applies on the
	// kept-alive connection, without a reload. How soon is logged, not
	// asserted (about 25 ms on an idle machine): the window only bounds
	// the wait. A full make test once went past a 1 s window here, on a
	// loaded machine.
	reloads := server.reloads(t)
	l7Intention(t, c, "client", "server", denyPrefix("/internal"), denyPrefix("/api"), allowRest())
	took := eventually(t, 10*time.Second, "edited permissions applied on the kept-alive connection", func() error {
		if err := want("/admin", 200)(); err != nil {
			return err
		}
		if err := want("/api/items?x=/admin", 403)(); err != nil {
			return err
		}
		return want("/internal/x", 403)()
	})
	t.Logf("permission edit effective after %s", took)
	stopLoad := load(func() error {
		for _, tc := range []struct {
			path string
			code int
		}{{"/admin", 200}, {"/internal", 403}, {"/", 200}} {
			if err := want(tc.path, tc.code, "X-Debug", "now allowed")(); err != nil {
				return err
			}
		}
		return nil
	})
	time.Sleep(2 * time.Second) // traffic keeps flowing after the change
	if ok, failed, first := stopLoad(); ok == 0 || failed > 0 {
		t.Fatalf("after the edit: %d of %d rounds wrong; first: %v", failed, ok+failed, first)
	}
	if r := server.reloads(t); r != reloads {
		t.Fatalf("server reloaded %d times for a permissions edit", r-reloads)
	}
	if !reused.Load() {
		t.Fatal("the kept-alive connection was not reused after the edit")
	}
	for _, bad := range []string{"L7 intention refused", "default intention policy unknown"} {
		if strings.Contains(server.out.String(), bad) {
			t.Fatalf("server sidecar logged %q", bad)
		}
	}
}

// TestL7OnTCPListenerRefused: an L7 intention for a source of a sidecar
// whose listener is tcp is a deny, with a log line saying why.
func TestL7OnTCPListenerRefused(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{})
	c := consul.Client
	httpServiceDefaults(t, c, "server") // so that Consul takes the entry
	ports := testenv.FreePorts(t, 4)
	register(t, c, "server", tcpApp(t, "hello from server"), ports[0], map[string]any{"protocol": "tcp"})
	register(t, c, "client", ports[1], ports[2], nil, api.Upstream{DestinationName: "server", LocalBindPort: ports[3], Config: map[string]any{"protocol": "tcp"}})
	l7Intention(t, c, "client", "server", allowRest())
	server := startSidecar(t, consul, "server", "-access-log=false")
	startSidecar(t, consul, "client")
	eventually(t, 10*time.Second, "refusal logged", func() error {
		if line, err := tcpLine(ports[3]); err == nil && line != "" {
			return fmt.Errorf("tcp connection served: %q", line)
		}
		if !strings.Contains(server.out.String(), "L7 intention on a TCP listener refused") {
			return errors.New("no log line yet")
		}
		return nil
	})
	for range 3 {
		if line, err := tcpLine(ports[3]); err == nil && line != "" {
			t.Fatalf("tcp connection served under an L7 intention: %q", line)
		}
	}
}

// TestL4L7SwitchKeepsTraffic: a source moved from an L4 allow to an L7
// intention that allows what it sends, and back, is served throughout, on
// its kept-alive connection and on new ones: the agent's connection and
// request decisions come from one intentions snapshot, so no request sees
// one kind of verdict while its connection holds the other (before, the L7
// rules had a watch of their own and such a switch gave a few 403s or
// 503s). Each switch is seen applied (an /admin probe denied, then
// allowed) while the load runs, and the load runs on for seconds after.
func TestL4L7SwitchKeepsTraffic(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{DefaultDeny: true})
	c := consul.Client
	httpServiceDefaults(t, c, "server")
	ports := testenv.FreePorts(t, 4)
	register(t, c, "server", httpApp(t, "server"), ports[0], map[string]any{"protocol": "http"})
	register(t, c, "client", ports[1], ports[2], nil, api.Upstream{DestinationName: "server", LocalBindPort: ports[3], Config: map[string]any{"protocol": "http"}})
	l4 := func() {
		if _, _, err := c.ConfigEntries().Set(&api.ServiceIntentionsConfigEntry{Kind: api.ServiceIntentions, Name: "server",
			Sources: []*api.SourceIntention{{Name: "client", Action: api.IntentionActionAllow}}}, nil); err != nil {
			t.Fatal(err)
		}
	}
	l4()
	server := startSidecar(t, consul, "server")
	startSidecar(t, consul, "client")
	base := fmt.Sprintf("http://127.0.0.1:%d", ports[3])
	call, reused := keptAliveReq(t, base)
	kept := func() error {
		code, err := call("/items")
		if err != nil || code != 200 {
			return fmt.Errorf("kept-alive GET /items: %d %v", code, err)
		}
		if !reused.Load() {
			return errors.New("the kept-alive connection was not reused")
		}
		return nil
	}
	fresh := func(path string, want int) func() error {
		return func() error {
			req, _ := http.NewRequest("GET", base+path, nil)
			req.Close = true
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				return err
			}
			resp.Body.Close()
			if resp.StatusCode != want {
				return fmt.Errorf("new connection GET %s: %d, want %d", path, resp.StatusCode, want)
			}
			return nil
		}
	}
	eventually(t, 10*time.Second, "served", fresh("/items", 200))
	if _, err := call("/items"); err != nil {
		t.Fatal(err)
	}
	reloads := server.reloads(t)
	stops := []func() (int64, int64, error){load(kept), load(fresh("/items", 200))}
	for i := range 3 {
		l7Intention(t, c, "client", "server", denyPrefix("/admin"), allowRest())
		eventually(t, 5*time.Second, fmt.Sprintf("switch %d to L7 applied", i), fresh("/admin", 403))
		l4()
		eventually(t, 5*time.Second, fmt.Sprintf("switch %d back to L4 applied", i), fresh("/admin", 200))
	}
	time.Sleep(2 * time.Second) // traffic keeps flowing after the last switch
	for i, stop := range stops {
		if ok, failed, first := stop(); ok == 0 || failed > 0 {
			t.Errorf("load %d: %d of %d calls failed; first: %v", i, failed, ok+failed, first)
		}
	}
	if r := server.reloads(t); r != reloads {
		t.Errorf("server reloaded %d times for intention switches", r-reloads)
	}
}

// TestL7DecidedInHAProxy: permissions on the method, the path and the
// presence of a header are decided by HAProxy from the L7 map the controller keeps current, not by
// the agent: a kept-alive connection and new ones get the right 403s and
// 200s for a new path on every request while the agent's L7 decision
// counters stay still, and each 403 has its access-log line with the
// intention and the permission. An edit of the permissions reaches the
// map with no reload (how long it took is logged), under load on kept-alive and new
// connections, and the agent still decides nothing.
func TestL7DecidedInHAProxy(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{DefaultDeny: true})
	c := consul.Client
	httpServiceDefaults(t, c, "server")
	ports := testenv.FreePorts(t, 4)
	register(t, c, "server", httpApp(t, "server"), ports[0], map[string]any{"protocol": "http"})
	register(t, c, "client", ports[1], ports[2], nil, api.Upstream{DestinationName: "server", LocalBindPort: ports[3], Config: map[string]any{"protocol": "http"}})
	postSecret := &api.IntentionPermission{Action: api.IntentionActionDeny,
		HTTP: &api.IntentionHTTPPermission{PathExact: "/v1/secret", Methods: []string{"POST", "PUT"}}}
	l7Intention(t, c, "client", "server", denyPrefix("/admin"), postSecret, denyHeader("X-Debug"), allowRest())
	server := startSidecar(t, consul, "server")
	startSidecar(t, consul, "client")
	base := fmt.Sprintf("http://127.0.0.1:%d", ports[3])

	tr := &http.Transport{MaxIdleConnsPerHost: 1}
	t.Cleanup(tr.CloseIdleConnections)
	kept := &http.Client{Timeout: 5 * time.Second, Transport: tr}
	do := func(client *http.Client, method, path string, fresh bool, hdr ...string) (int, error) {
		return send(context.Background(), client, method, base+path, fresh, hdr...)
	}
	var n atomic.Int64
	// check sends a new path under each rule and checks the answers.
	check := func(adminCode, itemsCode int) func() error {
		return func() error {
			i := n.Add(1)
			for _, r := range []struct {
				method, path string
				code         int
				fresh        bool
				hdr          []string
			}{
				{"GET", fmt.Sprintf("/admin/%d", i), adminCode, false, nil},
				{"GET", fmt.Sprintf("/items/%d", i), itemsCode, false, nil},
				{"POST", "/v1/secret", 403, false, nil},
				{"GET", "/v1/secret", 200, false, nil},
				{"POST", fmt.Sprintf("/v1/secret/%d", i), 200, false, nil},
				{"GET", fmt.Sprintf("/v1/x/%d", i), 403, false, []string{"X-Debug", fmt.Sprint(i)}},
				{"GET", fmt.Sprintf("/v1/x/%d", i), 200, false, []string{"X-Debugger", "1"}},
				{"GET", fmt.Sprintf("/admin/%d/new", i), adminCode, true, nil},
				{"GET", fmt.Sprintf("/items/%d/new", i), itemsCode, true, nil},
			} {
				client := kept
				if r.fresh {
					client = http.DefaultClient
				}
				if code, err := do(client, r.method, r.path, r.fresh, r.hdr...); err != nil || code != r.code {
					return fmt.Errorf("%s %s (new connection %v): %d %v, want %d", r.method, r.path, r.fresh, code, err, r.code)
				}
			}
			return nil
		}
	}
	agentL7 := func() float64 {
		var sum float64
		for _, result := range []string{"allow", "deny"} {
			v, err := server.metric("haproxy_connect_authz_l7_requests_total", "result", result)
			if err != nil {
				t.Fatal(err)
			}
			sum += v
		}
		return sum
	}
	// mapDecides runs check rounds times and requires that the agent
	// decided none of those requests.
	mapDecides := func(when string, rounds, adminCode, itemsCode int) {
		t.Helper()
		before := agentL7()
		for range rounds {
			if err := check(adminCode, itemsCode)(); err != nil {
				t.Fatalf("%s: %v", when, err)
			}
		}
		if after := agentL7(); after != before {
			t.Fatalf("%s: the agent decided %v L7 requests the map should have", when, after-before)
		}
	}
	// The intentions came before HAProxy started: the map file had them.
	eventually(t, 10*time.Second, "permissions enforced", check(403, 200))
	mapDecides("at start", 50, 403, 200)
	for _, re := range []string{
		`src=spiffe://[^ ]+/svc/client .* GET /admin/\d+ 403 .* intention=client perm=0:deny`,
		`src=spiffe://[^ ]+/svc/client .* POST /v1/secret 403 .* intention=client perm=1:deny`,
		`src=spiffe://[^ ]+/svc/client .* GET /v1/x/\d+ 403 .* intention=client perm=2:deny`,
		`src=spiffe://[^ ]+/svc/client .* GET /items/\d+ 200 .* intention=client perm=3:allow`,
	} {
		if !regexp.MustCompile(re).MatchString(server.out.String()) {
			t.Fatalf("no access-log line %s", re)
		}
	}

	// An edit: /admin allowed, /items denied; under load.
	reloads := server.reloads(t)
	stops := []func() (int64, int64, error){load(func() error {
		code, err := do(kept, "GET", fmt.Sprintf("/v1/other/%d", n.Add(1)), false)
		if err != nil || code != 200 {
			return fmt.Errorf("kept-alive GET /v1/other: %d %v", code, err)
		}
		return nil
	}), load(func() error {
		code, err := do(http.DefaultClient, "GET", fmt.Sprintf("/v1/other/%d", n.Add(1)), true)
		if err != nil || code != 200 {
			return fmt.Errorf("new connection GET /v1/other: %d %v", code, err)
		}
		return nil
	})}
	l7Intention(t, c, "client", "server", denyPrefix("/items"), postSecret, denyHeader("X-Debug"), allowRest())
	took := eventually(t, 10*time.Second, "edited permissions applied", check(200, 403))
	t.Logf("permission edit effective after %s", took)
	time.Sleep(2 * time.Second) // traffic keeps flowing after the change
	for i, stop := range stops {
		if ok, failed, first := stop(); ok == 0 || failed > 0 {
			t.Errorf("load %d: %d of %d calls failed; first: %v", i, failed, ok+failed, first)
		}
	}
	for range 20 {
		if err := check(200, 403)(); err != nil {
			t.Fatal(err)
		}
	}
	if r := server.reloads(t); r != reloads {
		t.Errorf("server reloaded %d times for a permissions edit", r-reloads)
	}
	if !strings.Contains(server.out.String(), "L7 map applied at run time") {
		t.Error("no log line for the L7 map's change at run time")
	}
	// Right after the edit, connections re-authorized under the new
	// generation before the map had its entries may have asked the agent;
	// once applied, the map decides again.
	mapDecides("after the edit", 20, 200, 403)

	// A controller that adopts the running HAProxy does not know what its
	// L7 map holds: it clears it and adds its table again, and the map
	// decides as before. The agent decides meanwhile.
	if err := server.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-server.done
	server = launchSidecar(t, consul, "server", server.stateDir)
	server.waitReady(t)
	eventually(t, 10*time.Second, "the adopted HAProxy's L7 map filled again", func() error {
		if !regexp.MustCompile(`L7 map applied at run time.*"cleared": true`).MatchString(server.out.String()) {
			return errors.New("no log line yet")
		}
		return nil
	})
	mapDecides("after the adoption", 20, 200, 403)
}
