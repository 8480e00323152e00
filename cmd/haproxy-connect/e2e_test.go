package main

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// TestMinimalMesh is the seed's minimal working example, over HTTP and over
// TCP, with deny-by-default intentions: refused until an allow intention
// exists, and refused again after a deny (how long it took is logged;
// how fast is meshbench's to measure).
func TestMinimalMesh(t *testing.T) {
	for _, proto := range []string{"http", "tcp"} {
		t.Run(proto, func(t *testing.T) {
			m := startMesh(t, testenv.ConsulOptions{DefaultDeny: true}, proto)
			c, ports, client := m.c, m.ports, m.client

			call := func() error {
				if proto == "http" {
					code, body, err := get(ports[3])
					if err != nil {
						return err
					}
					if code != 200 || body != "hello from server" {
						return fmt.Errorf("status %d %q", code, body)
					}
					return nil
				}
				line, err := tcpLine(ports[3])
				if err != nil {
					return err
				}
				if line != "hello from server" {
					return fmt.Errorf("got %q", line)
				}
				return nil
			}
			// The client's upstream has the server's sidecar as endpoint.
			eventually(t, 10*time.Second, "client sidecar has the server endpoint", client.inBackend("up_server", ports[0]))
			for i := 0; i < 5; i++ {
				if err := call(); err == nil {
					t.Fatal("a request went through with deny-by-default and no intention")
				}
			}
			intention(t, c, "client", "server", api.IntentionActionAllow)
			took := eventually(t, 5*time.Second, "allowed after the allow intention", call)
			t.Logf("%s: allow effective after %s", proto, took)

			intention(t, c, "client", "server", api.IntentionActionDeny)
			took = eventually(t, 10*time.Second, "refused after the deny intention", func() error {
				if err := call(); err == nil {
					return errors.New("still allowed")
				}
				return nil
			})
			t.Logf("%s: deny effective after %s", proto, took)
			// And it stays refused.
			for i := 0; i < 5; i++ {
				if err := call(); err == nil {
					t.Fatal("allowed again after the deny")
				}
			}
		})
	}
}

// TestChurn registers and deregisters healthy endpoints of the upstream
// while a client sends requests: no reload, no failed request, and the
// client sidecar's slots equal Consul's passing set after every settle,
// past the initial slot count.
func TestChurn(t *testing.T) {
	m := startMesh(t, testenv.ConsulOptions{}, "http", "-min-slots", "8", "-log-level", "info")
	c, ports, client := m.c, m.ports, m.client
	reloadsBefore := client.reloads(t)

	// Extra endpoints of "server": connect-proxy registrations of their
	// own, each on its own loopback port, each a relay to the real server
	// sidecar, so that every slot HAProxy fills really serves.
	type endpoint struct {
		id   string
		port int
	}
	var pool []endpoint
	for i := 0; i < 24; i++ {
		pool = append(pool, endpoint{id: fmt.Sprintf("server-extra-%d", i), port: relay(t, ports[0])})
	}
	regEndpoint := func(e endpoint) error {
		return c.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: e.id, Name: "server-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Port: e.port, Address: "127.0.0.1",
			Checks: passing(), Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "server", DestinationServiceID: "server"},
		})
	}

	stopLoad := load(get200(ports[3]))

	settle := func(step int) {
		t.Helper()
		eventually(t, 5*time.Second, fmt.Sprintf("step %d: slots equal Consul's passing set", step), func() error {
			entries, _, err := c.Health().Connect("server", "", true, nil)
			if err != nil {
				return err
			}
			var want []string
			for _, e := range entries {
				want = append(want, fmt.Sprintf("127.0.0.1:%d", e.Service.Port))
			}
			got, err := client.inService("up_server")
			if err != nil {
				return err
			}
			slices.Sort(want)
			if !slices.Equal(want, got) {
				return fmt.Errorf("consul %v, haproxy %v", want, got)
			}
			return nil
		})
	}

	// 200 events: grow to all 24 extra endpoints (past the 8 slots), then
	// churn by removing and re-adding, settling every 10 events.
	live := map[int]bool{}
	events := 0
	for events < 200 {
		i := events % len(pool)
		var err error
		if events < len(pool) || !live[i] {
			err = regEndpoint(pool[i])
			live[i] = true
		} else {
			err = c.Agent().ServiceDeregister(pool[i].id)
			live[i] = false
		}
		if err != nil {
			t.Fatal(err)
		}
		events++
		if events%10 == 0 {
			settle(events)
		}
	}
	settle(events)
	time.Sleep(100 * time.Millisecond)
	ok, failed, firstErr := stopLoad()

	if got := client.reloads(t) - reloadsBefore; got != 0 {
		t.Errorf("%d reloads during churn, want 0", got)
	}
	if failed > 0 {
		t.Errorf("%d of %d requests failed during churn; first: %v", failed, ok+failed, firstErr)
	}
	t.Logf("200 endpoint events, %d requests ok, %d failed", ok, failed)

	// Each slot's state change is reported once, by HAProxy on stderr,
	// not again through a backend's logger.
	reported := 0
	for _, l := range strings.Split(client.out.String(), "\n") {
		if strings.Contains(l, "Server up_server/") && (strings.Contains(l, " for maintenance") || strings.Contains(l, " is UP")) {
			if !strings.HasPrefix(l, "[WARNING]") {
				t.Errorf("a slot's state change reported a second time: %s", l)
			}
			reported++
		}
	}
	if reported == 0 {
		t.Error("no slot state change reported by HAProxy")
	}
}

// TestReplaceEveryEndpoint: one Consul update replaces every endpoint of an
// upstream (a transaction deletes the one instance and adds two others).
// The new ones carry no request before they proved their identity, and the
// leaving one, the last proven, keeps serving until one of them has (at
// most maxHold, 1 s): no request fails, on new connections or kept-alive
// ones, while the proofs wait, through the swap and after it. A leaving
// endpoint otherwise leaves at once (the planner's transcripts); this is
// the one case where it waits.
func TestReplaceEveryEndpoint(t *testing.T) {
	m := startMesh(t, testenv.ConsulOptions{}, "http")
	c, ports, client := m.c, m.ports, m.client
	server := fmt.Sprintf("127.0.0.1:%d", ports[0])

	// Instances on nodes of their own, each a relay to the real server
	// sidecar, so that every one of them proves the server's identity.
	// The new instances' relays hold every connection, their proofs
	// included, until the gate opens.
	gate := make(chan struct{})
	var openOnce sync.Once
	openGate := func() { openOnce.Do(func() { close(gate) }) }
	var arrived [3]atomic.Int64
	type instance struct {
		node, id string
		port     int
	}
	var insts []instance
	for i, name := range []string{"old", "new-1", "new-2"} {
		in := instance{node: "node-" + name, id: "server-" + name}
		in.port = testenv.ServeTCP(t, func(conn net.Conn) {
			arrived[i].Add(1)
			if i > 0 {
				<-gate
			}
			testenv.Pipe(conn, server)
		})
		if _, err := c.Catalog().Register(&api.CatalogRegistration{Node: in.node, Address: fmt.Sprintf("127.0.0.%d", 10+i)}, nil); err != nil {
			t.Fatal(err)
		}
		insts = append(insts, in)
	}
	t.Cleanup(openGate) // before the relays close: cleanups run last first
	svc := func(in instance) api.AgentService {
		return api.AgentService{ID: in.id, Service: "server-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Address: "127.0.0.1", Port: in.port,
			Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "server", DestinationServiceID: "server"}}
	}
	txn := func(ops ...*api.TxnOp) {
		t.Helper()
		ok, resp, _, err := c.Txn().Txn(ops, nil)
		if err != nil || !ok {
			var errs []string
			if resp != nil {
				for _, e := range resp.Errors {
					errs = append(errs, e.What)
				}
			}
			t.Fatalf("txn: %v %v", err, errs)
		}
	}
	set := func(in instance) *api.TxnOp {
		return &api.TxnOp{Service: &api.ServiceTxnOp{Verb: api.ServiceSet, Node: in.node, Service: svc(in)}}
	}
	del := func(in instance) *api.TxnOp {
		return &api.TxnOp{Service: &api.ServiceTxnOp{Verb: api.ServiceDelete, Node: in.node, Service: svc(in)}}
	}
	only := func(ports ...int) func() error {
		var want []string
		for _, p := range ports {
			want = append(want, fmt.Sprintf("127.0.0.1:%d", p))
		}
		slices.Sort(want)
		return func() error {
			got, err := client.inService("up_server")
			if err != nil {
				return err
			}
			if !slices.Equal(got, want) {
				return fmt.Errorf("in service %v, want %v", got, want)
			}
			return nil
		}
	}

	// The old instance alone: the server sidecar's own registration turns
	// critical (the sidecar keeps serving behind the relays).
	txn(set(insts[0]))
	checks, err := c.Agent().Checks()
	if err != nil {
		t.Fatal(err)
	}
	for id, ch := range checks {
		if ch.ServiceID == "server-sidecar-proxy" {
			if err := c.Agent().UpdateTTL(id, "out of the list for this test", api.HealthCritical); err != nil {
				t.Fatal(err)
			}
		}
	}
	eventually(t, 10*time.Second, "the old instance alone in service", only(insts[0].port))

	tr := startTraffic(t, ports[3])
	tr.moreEach(t, "requests before the swap", 20)

	txn(del(insts[0]), set(insts[1]), set(insts[2]))
	// The sidecar read the new list: both proofs wait at the gate. The
	// requests meanwhile, far fewer than 1 s of them, go to the old one.
	eventually(t, 10*time.Second, "the new instances' proofs started", func() error {
		if arrived[1].Load() == 0 || arrived[2].Load() == 0 {
			return fmt.Errorf("connections to the new instances: %d, %d", arrived[1].Load(), arrived[2].Load())
		}
		return nil
	})
	tr.moreEach(t, "requests while the proofs wait", 20)
	tr.requireNoFailures(t, time.Time{}, "while the new instances' proofs waited")
	openGate()
	eventually(t, 10*time.Second, "the two new instances alone in service", only(insts[1].port, insts[2].port))
	tr.moreEach(t, "requests through the new instances", 200)
	tr.halt()
	tr.requireNoFailures(t, time.Time{}, "through the swap and after it")
	if !tr.reused.Load() {
		t.Error("the kept-alive client's last request was on a new connection")
	}
}

// TestStandbyProvenAhead: an instance Consul lists with a failing check
// (as a new instance is until its first check runs) is proven while it
// waits, and placed as soon as its check passes, with no handshake of its
// own then: its relay holds every connection from the moment it was
// proven, and it comes into service meanwhile. Requests on new and
// kept-alive connections flow through it all, with none failed.
func TestStandbyProvenAhead(t *testing.T) {
	m := startMesh(t, testenv.ConsulOptions{}, "http")
	c, ports, client := m.c, m.ports, m.client
	server := fmt.Sprintf("127.0.0.1:%d", ports[0])

	// The gate is open until closed; a closed gate holds each new
	// connection until it opens.
	var gate atomic.Pointer[chan struct{}]
	open := make(chan struct{})
	close(open)
	gate.Store(&open)
	closeGate := func() { held := make(chan struct{}); gate.Store(&held) }
	openGate := func() {
		if g := *gate.Load(); g != open {
			close(g)
			gate.Store(&open)
		}
	}
	var arrived atomic.Int64
	port := testenv.ServeTCP(t, func(conn net.Conn) {
		arrived.Add(1)
		<-*gate.Load()
		testenv.Pipe(conn, server)
	})
	t.Cleanup(openGate)
	reg := func(status string) {
		t.Helper()
		_, err := c.Catalog().Register(&api.CatalogRegistration{Node: "node-new", Address: "127.0.0.20",
			Service: &api.AgentService{ID: "server-new", Service: "server-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Address: "127.0.0.1", Port: port,
				Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "server", DestinationServiceID: "server"}},
			Check: &api.AgentCheck{Node: "node-new", CheckID: "alive", Name: "alive", Status: status, ServiceID: "server-new"}}, nil)
		if err != nil {
			t.Fatal(err)
		}
	}
	newKey := fmt.Sprintf("127.0.0.1:%d", port)
	serving := func() (bool, error) {
		got, err := client.inService("up_server")
		return slices.Contains(got, newKey), err
	}
	eventually(t, 10*time.Second, "the server sidecar in service", func() error {
		got, err := client.inService("up_server")
		if err == nil && len(got) != 1 {
			err = fmt.Errorf("in service %v", got)
		}
		return err
	})

	tr := startTraffic(t, ports[3])
	tr.moreEach(t, "requests before the new instance", 20)

	// Listed, its check critical: proven, not placed.
	reg(api.HealthCritical)
	eventually(t, 10*time.Second, "the standby instance proven", func() error {
		if arrived.Load() == 0 {
			return errors.New("no connection to the standby instance yet")
		}
		return nil
	})
	tr.moreEach(t, "requests while it is standby", 20)
	if in, err := serving(); err != nil || in {
		t.Fatalf("the standby instance in service: %t, %v", in, err)
	}
	proofs := arrived.Load()

	// From here a handshake with it waits at the gate: its check passes,
	// and it must come into service without one.
	closeGate()
	reg(api.HealthPassing)
	eventually(t, 10*time.Second, "the instance in service while its relay holds every connection", func() error {
		if in, err := serving(); err != nil || !in {
			return fmt.Errorf("not in service (%v)", err)
		}
		return nil
	})
	openGate()
	tr.moreEach(t, "requests through both instances", 200)
	eventually(t, 10*time.Second, "requests through the new instance", func() error {
		if n := arrived.Load() - proofs; n == 0 {
			return errors.New("no connection to the new instance since it was placed")
		}
		return nil
	})
	tr.halt()
	tr.requireNoFailures(t, time.Time{}, "through the standby instance's proof, its placement and after")
	if !tr.reused.Load() {
		t.Error("the kept-alive client's last request was on a new connection")
	}
}

// relay listens on a free loopback port and forwards to target: a stand-in
// for another instance of a sidecar (the TLS bytes pass through untouched).
func relay(t *testing.T, target int) int {
	t.Helper()
	return testenv.Relay(t, fmt.Sprintf("127.0.0.1:%d", target))
}

// TestAddUpstream adds an upstream to a running sidecar's registration:
// exactly one reload, the new port serves, the old one never stops.
func TestAddUpstream(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{})
	c := consul.Client
	ports := testenv.FreePorts(t, 7)
	register(t, c, "one", httpApp(t, "one"), ports[0], map[string]any{"protocol": "http"})
	register(t, c, "two", httpApp(t, "two"), ports[1], map[string]any{"protocol": "http"})
	up1 := api.Upstream{DestinationName: "one", LocalBindPort: ports[4], Config: map[string]any{"protocol": "http"}}
	register(t, c, "client", ports[2], ports[3], nil, up1)
	startSidecar(t, consul, "one")
	startSidecar(t, consul, "two")
	client := startSidecar(t, consul, "client")
	eventually(t, 10*time.Second, "upstream one serves", serves(ports[4], "hello from one"))
	before := client.reloads(t)

	stopLoad := load(get200(ports[4]))
	register(t, c, "client", ports[2], ports[3], nil, up1,
		api.Upstream{DestinationName: "two", LocalBindPort: ports[5], Config: map[string]any{"protocol": "http"}})
	eventually(t, 10*time.Second, "upstream two serves", serves(ports[5], "hello from two"))
	time.Sleep(300 * time.Millisecond)
	ok, failed, firstErr := stopLoad()
	if got := client.reloads(t) - before; got != 1 {
		t.Errorf("%d reloads for one new upstream, want exactly 1", got)
	}
	if ok == 0 || failed > 0 {
		t.Errorf("%d of %d calls to the old upstream failed across the reload; first: %v", failed, ok+failed, firstErr)
	}
	if !strings.Contains(client.out.String(), "upstream up_two added") {
		t.Errorf("the reload reason is not logged")
	}
}

// TestBadRegistration: upstreams that would inject config or have a port
// out of range are reported with a clear error; the good one works.
func TestBadRegistration(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{})
	c := consul.Client
	ports := testenv.FreePorts(t, 6)
	register(t, c, "server", httpApp(t, "server"), ports[0], map[string]any{"protocol": "http"})
	register(t, c, "client", ports[1], ports[2], nil,
		api.Upstream{DestinationName: "server", LocalBindPort: ports[3], Config: map[string]any{"protocol": "http"}},
		api.Upstream{DestinationName: "evil\n    server x 1.2.3.4:80", LocalBindPort: ports[4]},
		api.Upstream{DestinationName: "server", Datacenter: "dc1", LocalBindPort: 70000},
		api.Upstream{DestinationName: "other", LocalBindPort: ports[5], Config: map[string]any{"protocol": "tcp\nglobal"}},
	)
	startSidecar(t, consul, "server")
	client := startSidecar(t, consul, "client")
	eventually(t, 10*time.Second, "the good upstream serves", serves(ports[3], "hello from server"))
	logs := client.out.String()
	for _, want := range []string{"upstream rejected", "want 1-63 letters, digits", "port out of range 1-65535", "70000", "protocol"} {
		if !strings.Contains(logs, want) {
			t.Errorf("log lacks %q", want)
		}
	}
	// A later bad change (a public port out of range) keeps the running config.
	err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: "client-sidecar-proxy", Name: "client-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Port: ports[2], Address: "127.0.0.1",
		Checks: passing(), Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "client", DestinationServiceID: "client",
			Config:    map[string]any{"bind_port": 123456},
			Upstreams: []api.Upstream{{DestinationName: "server", LocalBindPort: ports[3], Config: map[string]any{"protocol": "http"}}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the bad public config is reported", func() error {
		if !strings.Contains(client.out.String(), "proxy registration rejected") {
			return errors.New("not yet")
		}
		return nil
	})
	if code, _, err := get(ports[3]); err != nil || code != 200 {
		t.Errorf("the running config stopped serving: %d %v", code, err)
	}
}

// TestDenyReachesKeptAliveConnections: in HTTP mode every request is
// authorized, so a deny refuses the next request on a client connection
// that is kept alive (and on the pooled connections between sidecars)
// (how long it took is logged), not only new connections.
func TestDenyReachesKeptAliveConnections(t *testing.T) {
	m := startMesh(t, testenv.ConsulOptions{DefaultDeny: true}, "http")
	c, ports := m.c, m.ports
	intention(t, c, "client", "server", api.IntentionActionAllow)

	call, reused := keptAlive(t, &http.Transport{MaxIdleConnsPerHost: 1}, fmt.Sprintf("http://127.0.0.1:%d/", ports[3]))
	eventually(t, 10*time.Second, "allowed", func() error {
		if code, err := call(); err != nil || code != 200 {
			return fmt.Errorf("%d %v", code, err)
		}
		return nil
	})
	if code, err := call(); err != nil || code != 200 || !reused.Load() {
		t.Fatalf("second request on the kept-alive connection: %d %v reused=%v", code, err, reused.Load())
	}
	intention(t, c, "client", "server", api.IntentionActionDeny)
	took := eventually(t, 10*time.Second, "denied on the kept-alive connection", func() error {
		code, err := call()
		if err == nil && code == 200 {
			return errors.New("still allowed")
		}
		if !reused.Load() {
			return errors.New("the client connection was not reused")
		}
		if code != 403 {
			return fmt.Errorf("status %d %v, want 403", code, err)
		}
		return nil
	})
	t.Logf("deny effective on a kept-alive connection after %s", took)
}

// TestServerReloadUnderConcurrentLoad: 16 kept-alive local clients call
// through the client sidecar, whose pooled connections to the server
// sidecar carry their requests concurrently (h2 when both sides offer it),
// while the server sidecar reloads five times. Not one request fails: a
// stopping worker's connections are drained, or closed before a request
// reached the application and retried by the client sidecar.
func TestServerReloadUnderConcurrentLoad(t *testing.T) {
	m := startMesh(t, testenv.ConsulOptions{}, "http")
	c, ports, server := m.c, m.ports, m.server
	eventually(t, 10*time.Second, "mesh serves", get200(ports[3]))
	keepAlive := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
	url := fmt.Sprintf("http://127.0.0.1:%d/", ports[3])
	stopLoad := loadN(16, func() error {
		resp, err := keepAlive.Get(url)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != 200 {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	})
	// Each new upstream in the server's registration is one reload of the
	// server sidecar (the upstreams' endpoints do not matter here).
	var ups []api.Upstream
	extra := testenv.FreePorts(t, 5)
	for i, port := range extra {
		before := server.reloads(t)
		ups = append(ups, api.Upstream{DestinationName: fmt.Sprintf("other-%d", i), LocalBindPort: port})
		register(t, c, "server", m.app, ports[0], map[string]any{"protocol": "http"}, ups...)
		eventually(t, 10*time.Second, fmt.Sprintf("reload %d", i+1), func() error {
			if server.reloads(t) <= before {
				return errors.New("not yet")
			}
			return nil
		})
		time.Sleep(200 * time.Millisecond)
	}
	ok, failed, firstErr := stopLoad()
	if ok == 0 || failed > 0 {
		t.Errorf("%d of %d requests failed across 5 server reloads; first: %v", failed, ok+failed, firstErr)
	}
	t.Logf("5 server reloads under 16 concurrent clients: %d requests ok, %d failed", ok, failed)
}

// TestPreparedQueryUpstream: an upstream of type prepared_query serves the
// query's Connect endpoints, and follows them as they change.
func TestPreparedQueryUpstream(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{})
	c := consul.Client
	ports := testenv.FreePorts(t, 4)
	register(t, c, "server", httpApp(t, "server"), ports[0], map[string]any{"protocol": "http"})
	if _, _, err := c.PreparedQuery().Create(&api.PreparedQueryDefinition{
		Name: "server-query", Service: api.ServiceQuery{Service: "server", OnlyPassing: true},
	}, nil); err != nil {
		t.Fatal(err)
	}
	register(t, c, "client", ports[1], ports[2], nil, api.Upstream{
		DestinationType: api.UpstreamDestTypePreparedQuery, DestinationName: "server-query",
		LocalBindPort: ports[3], Config: map[string]any{"protocol": "http"},
	})
	startSidecar(t, consul, "server")
	client := startSidecar(t, consul, "client")
	eventually(t, 10*time.Second, "the query's endpoint serves", get200(ports[3]))
	// The backend follows the query: a second endpoint appears within the
	// polling interval.
	extra := addServerEndpoint(t, c, "server-extra", ports[0])
	eventually(t, 10*time.Second, "the new endpoint is in the backend", client.inBackend("qup_server-query", extra))
}

// TestConsulOutage: with Consul gone, what was applied stays applied:
// requests from a source already authorized keep flowing on the cached
// decision and the existing slots, the sidecars stay up and say they retry.
func TestConsulOutage(t *testing.T) {
	m := startMesh(t, testenv.ConsulOptions{DefaultDeny: true}, "http")
	ports, server, client := m.ports, m.server, m.client
	index := intention(t, m.c, "client", "server", api.IntentionActionAllow)
	// The decision must be made under the new intentions: one made before
	// the server sidecar's watch sees them is dropped when it does, and
	// with Consul gone the sidecar would decide the next connection from
	// the default deny it held (TestFailStaticAuthorization).
	eventually(t, 10*time.Second, "the server sidecar sees the intention", server.sawIntentions(index))
	eventually(t, 10*time.Second, "allowed", get200(ports[3]))

	m.consul.Stop()
	stopLoad := load(get200(ports[3]))
	time.Sleep(3 * time.Second)
	ok, failed, firstErr := stopLoad()
	if ok == 0 || failed > 0 {
		t.Errorf("with Consul down: %d of %d requests failed; first: %v", failed, ok+failed, firstErr)
	}
	for name, s := range map[string]*sidecar{"server": server, "client": client} {
		select {
		case <-s.done:
			t.Errorf("%s sidecar exited while Consul was down", name)
		default:
		}
		if !strings.Contains(s.out.String(), "watch failed, retrying") {
			t.Errorf("%s sidecar does not report the failing watches", name)
		}
	}
	t.Logf("Consul down for 3s: %d requests ok, %d failed", ok, failed)
}

// TestFailStaticAuthorization: the server sidecar decides from the
// intentions it holds, so with its link to Consul cut it keeps deciding,
// for sources it has never seen too: an allowed one is served (200), a
// denied one refused (403), on new and kept-alive connections, for
// seconds. Once the link is back the watch catches up, and an intention
// changed then applies, to kept-alive connections too (the generation):
// no verdict made while Consul was away outlives the next change.
//
// This replaces TestUndecidedIsRetried: a new source was left undecided
// (503) while Consul was unreachable, and that test checked the failure
// did not stick to the connection. Nothing on the request path asks
// Consul now; what it protected (no stale verdict stays on a connection)
// is the last part here.
func TestFailStaticAuthorization(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{DefaultDeny: true})
	c := consul.Client
	port := testenv.FreePort(t)
	httpServiceDefaults(t, c, "server") // L7 permissions need it
	register(t, c, "server", httpApp(t, "server"), port, map[string]any{"protocol": "http"})
	link := testenv.NewLink(t, consul.Addr)
	server := startSidecar(t, consul, "server", "-http-addr", link.Addr)
	// intentions writes the server's intentions: "other" as given,
	// "fresh" allowed, "denied" denied, "l7fresh" under L7 permissions
	// (deny /admin, allow the rest).
	intentions := func(other api.IntentionAction) uint64 {
		if _, _, err := c.ConfigEntries().Set(&api.ServiceIntentionsConfigEntry{
			Kind: api.ServiceIntentions, Name: "server",
			Sources: []*api.SourceIntention{
				{Name: "other", Action: other},
				{Name: "fresh", Action: api.IntentionActionAllow},
				{Name: "denied", Action: api.IntentionActionDeny},
				{Name: "l7fresh", Permissions: []*api.IntentionPermission{denyPrefix("/admin"), allowRest()}},
			},
		}, nil); err != nil {
			t.Fatal(err)
		}
		e, _, err := c.ConfigEntries().Get(api.ServiceIntentions, "server", nil)
		if err != nil {
			t.Fatal(err)
		}
		return e.GetModifyIndex()
	}
	eventually(t, 10*time.Second, "the server sidecar sees the intentions", server.sawIntentions(intentions(api.IntentionActionAllow)))

	url := fmt.Sprintf("https://127.0.0.1:%d/", port)
	// Direct mTLS clients with leaves of their own. The server's
	// identity is not what this test checks.
	tlsFor := func(service string) *tls.Config {
		return &tls.Config{Certificates: []tls.Certificate{meshCert(t, c, service)}, InsecureSkipVerify: true}
	}
	newConnPath := func(service, path string, want int) func() error {
		tr := &http.Transport{DisableKeepAlives: true, TLSClientConfig: tlsFor(service)}
		cl := &http.Client{Timeout: 5 * time.Second, Transport: tr}
		return func() error {
			resp, err := cl.Get(url + strings.TrimPrefix(path, "/"))
			if err != nil {
				return fmt.Errorf("%s: %w", service, err)
			}
			resp.Body.Close()
			if resp.StatusCode != want {
				return fmt.Errorf("%s on a new connection, GET %s: %d, want %d", service, path, resp.StatusCode, want)
			}
			return nil
		}
	}
	newConn := func(service string, want int) func() error { return newConnPath(service, "/", want) }
	onKept := func(call func() (int, error), reused *atomic.Bool, service string, want int) func() error {
		return func() error {
			code, err := call()
			if err != nil || code != want {
				return fmt.Errorf("%s on its kept-alive connection: %d %v, want %d", service, code, err, want)
			}
			if !reused.Load() {
				return fmt.Errorf("%s: the connection was not reused", service)
			}
			return nil
		}
	}
	// "other" is authorized before the cut, on a kept-alive connection.
	otherCall, otherReused := keptAlive(t, &http.Transport{MaxIdleConnsPerHost: 1, TLSClientConfig: tlsFor("other")}, url)
	if code, err := otherCall(); err != nil || code != 200 {
		t.Fatalf("other before the cut: %d %v", code, err)
	}
	// The controller told the agent the roots HAProxy verifies against:
	// the agent relies on that verification (spoa: served.go).
	eventually(t, 5*time.Second, "the agent relies on HAProxy's chain verification", func() error {
		if !strings.Contains(server.out.String(), "client certificate chains: relying on HAProxy's verification") {
			return errors.New("not logged")
		}
		return nil
	})
	freshCall, freshReused := keptAlive(t, &http.Transport{MaxIdleConnsPerHost: 1, TLSClientConfig: tlsFor("fresh")}, url)
	freshNew, deniedNew := newConn("fresh", 200), newConn("denied", 403)
	l7Allowed, l7Denied := newConnPath("l7fresh", "/items", 200), newConnPath("l7fresh", "/admin/users", 403)

	link.Cut()
	eventually(t, 10*time.Second, "the intention watch reports the cut", func() error {
		if !strings.Contains(server.out.String(), "intention watch failed; deciding from the intentions last held") {
			return errors.New("no failure logged yet")
		}
		return nil
	})
	// Sources never seen before, decided while Consul is unreachable.
	if err := freshNew(); err != nil {
		t.Fatalf("a never-seen allowed source with Consul unreachable: %v", err)
	}
	if err := deniedNew(); err != nil {
		t.Fatalf("a never-seen denied source with Consul unreachable: %v", err)
	}
	// L7 rules hold too, for a source never seen.
	if err := l7Allowed(); err != nil {
		t.Fatalf("a never-seen L7 source, allowed path, with Consul unreachable: %v", err)
	}
	if err := l7Denied(); err != nil {
		t.Fatalf("a never-seen L7 source, denied path, with Consul unreachable: %v", err)
	}
	if code, err := freshCall(); err != nil || code != 200 {
		t.Fatalf("fresh on a kept-alive connection with Consul unreachable: %d %v", code, err)
	}
	// And for seconds, on new and kept-alive connections.
	stops := []func() (int64, int64, error){
		load(freshNew), load(deniedNew), load(l7Allowed), load(l7Denied),
		load(onKept(otherCall, otherReused, "other", 200)), load(onKept(freshCall, freshReused, "fresh", 200)),
	}
	time.Sleep(3 * time.Second)
	for i, stop := range stops {
		ok, failed, first := stop()
		if ok == 0 || failed > 0 {
			t.Errorf("load %d with Consul unreachable: %d of %d calls failed; first: %v", i, failed, ok+failed, first)
		}
	}
	if v, err := server.metric("haproxy_connect_authz_decisions_total", "result", "undecided"); err != nil || v != 0 {
		t.Errorf("undecided decisions: %v %v, want 0", v, err)
	}

	// Consul back: the watch catches up, and a change applies to the
	// kept-alive connection authorized before and during the cut.
	link.Restore()
	stopFresh := load(freshNew)
	index := intentions(api.IntentionActionDeny)
	eventually(t, 15*time.Second, "the server sidecar sees the change", server.sawIntentions(index))
	took := eventually(t, 10*time.Second, "other denied on its kept-alive connection", onKept(otherCall, otherReused, "other", 403))
	t.Logf("deny effective on the kept-alive connection after %s", took)
	if err := newConn("other", 403)(); err != nil {
		t.Error(err)
	}
	// "fresh" stayed allowed throughout.
	if ok, failed, first := stopFresh(); ok == 0 || failed > 0 {
		t.Errorf("fresh around the restore and the change: %d of %d calls failed; first: %v", failed, ok+failed, first)
	}
}

// TestReloadFailureKeepsServing: an upstream whose local port another
// process holds makes the reload fail; the running configuration keeps
// serving and keeps following endpoint churn while the reload backs off.
func TestReloadFailureKeepsServing(t *testing.T) {
	m := startMesh(t, testenv.ConsulOptions{}, "http")
	c, ports, up, client := m.c, m.ports, m.upstream, m.client
	eventually(t, 10*time.Second, "upstream serves", serves(ports[3], "hello from server"))

	taken := testenv.ServeTCP(t, func(net.Conn) {})
	register(t, c, "client", ports[1], ports[2], nil, up, api.Upstream{DestinationName: "other", LocalBindPort: taken})
	eventually(t, 10*time.Second, "the failed reload is reported", func() error {
		if !strings.Contains(client.out.String(), "reload failed; the previous worker keeps serving") {
			return errors.New("not yet")
		}
		return nil
	})
	extra := addServerEndpoint(t, c, "server-extra", ports[0])
	eventually(t, 3*time.Second, "churn applied while the reload backs off", client.inBackend("up_server", extra))
	if err := serves(ports[3], "hello from server")(); err != nil {
		t.Errorf("the running configuration stopped serving: %v", err)
	}
}
