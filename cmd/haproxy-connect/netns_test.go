package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// Ports on the hosts of a test network: each host is a network namespace
// of its own, so they are free.
const (
	hostPublicPort   = 21000 // a sidecar's public listener, on its host's address
	hostUpstreamPort = 9191  // A's upstream b, on 127.0.0.1 of host2
)

// cutFor is how long host2 stays cut off from the Consul server once its
// agent has noticed, with traffic flowing.
const cutFor = 5 * time.Second

// afterRestore is how long traffic keeps flowing, and is checked, once A's
// sidecar has caught up.
const afterRestore = 3 * time.Second

// TestMeshAcrossHosts: three hosts, each a network namespace joined to the
// others by veth pairs and a bridge: a Consul server on host1; on host2
// the service A and its sidecar, on host3 the service B and its sidecar,
// each next to a Consul client agent joined to the server. A calls B
// through its upstream port: HAProxy on host2 connects to B's sidecar at
// host3's address, across the links.
//
// Then host2 loses its route to the server (nothing else): its agent can
// no longer reach any server, and while it is cut a second instance of B
// is registered on host3, which only the server learns. A's sidecar keeps
// serving what it had; when the route comes back, it gets the new instance
// from its agent and puts it in service without a reload. Traffic flows
// throughout, on new connections and on a kept-alive one, and no request
// fails.
func TestMeshAcrossHosts(t *testing.T) {
	nw := testenv.NewNet(t, 3)
	h1, h2, h3 := nw.Hosts[0], nw.Hosts[1], nw.Hosts[2]
	server := testenv.ConsulServerOn(t, h1, testenv.ConsulOptions{})
	agentA := testenv.ConsulClientOn(t, h2, server)
	agentB := testenv.ConsulClientOn(t, h3, server)

	http1 := map[string]any{"protocol": "http"}
	registerOnHost(t, agentB.Client, h3, "b", hostApp(t, h3, "b"), http1)
	registerOnHost(t, agentA.Client, h2, "a", hostApp(t, h2, "a"), nil,
		api.Upstream{DestinationName: "b", LocalBindPort: hostUpstreamPort, Config: http1})
	sidecarB := startSidecar(t, agentB, "b")
	sidecarA := startSidecar(t, agentA, "a")

	// A's local client, on host2.
	upstream := fmt.Sprintf("http://127.0.0.1:%d/", hostUpstreamPort)
	newConn := hostGet200(h2, upstream, "hello from b")
	eventually(t, 30*time.Second, "A reaches B through its upstream", newConn)
	bEndpoint := net.JoinHostPort(h3.Addr.String(), strconv.Itoa(hostPublicPort))
	eventually(t, 5*time.Second, "A's HAProxy sends B's traffic to host3's address", sidecarA.hasServer("up_b", bEndpoint))
	// B's sidecar saw the connection come from host2 with A's identity.
	fromA := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(h2.Addr.String()) + `:\d+ src=spiffe://[^ ]+/svc/a `)
	eventually(t, 5*time.Second, "B's sidecar logs A's requests from host2's address", func() error {
		if !fromA.MatchString(sidecarB.out.String()) {
			return errors.New("no access log line from host2 with A's identity")
		}
		return nil
	})

	reloads := sidecarA.reloads(t)
	stop := hostTraffic(t, h2, upstream, "hello from b")

	if err := h2.Cut(h1.Addr); err != nil {
		t.Fatal(err)
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			if err := h2.Restore(h1.Addr); err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Cleanup(restore)
	var noticed string
	eventually(t, 10*time.Second, "host2's agent finds no Consul server", func() error {
		var err error
		noticed, err = agentError(h2, agentA.Addr)
		return err
	})
	t.Logf("host2 cut off from the Consul server; its agent says: %s", noticed)
	cut := time.After(cutFor)

	// A second instance of B on host3: a relay to B's sidecar, so it
	// holds B's identity. Only the server learns of it.
	relay := h3.Relay(t, bEndpoint)
	b2 := net.JoinHostPort(h3.Addr.String(), strconv.Itoa(relay))
	if err := agentB.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: "b-2", Name: "b-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Address: h3.Addr.String(), Port: relay,
		Checks: passing(), Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "b", DestinationServiceID: "b"},
	}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the server has B's second instance", func() error {
		entries, _, err := server.Client.Health().Connect("b", "", true, nil)
		if err != nil || len(entries) != 2 {
			return fmt.Errorf("%d healthy instances of b (%v)", len(entries), err)
		}
		return nil
	})
	<-cut
	if err := sidecarA.hasServer("up_b", b2)(); err == nil {
		t.Fatal("A's HAProxy has B's second instance while host2 is cut off: the cut does not hold")
	}
	if err := sidecarA.hasServer("up_b", bEndpoint)(); err != nil {
		t.Errorf("A's HAProxy lost B while host2 was cut off: %v", err)
	}
	if _, err := agentError(h2, agentA.Addr); err != nil {
		t.Errorf("host2's agent reached a server while cut off: %v", err)
	}
	select {
	case <-sidecarA.done:
		t.Fatal("A's sidecar exited while host2 was cut off")
	default:
	}

	restore()
	took := eventually(t, 30*time.Second, "A's HAProxy gets B's second instance once host2 is back", sidecarA.hasServer("up_b", b2))
	t.Logf("A's sidecar caught up %s after the route came back", took)
	window := time.After(afterRestore)
	// B's sidecar sees A's requests come in through the second
	// instance: from host3's own address.
	viaB2 := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(h3.Addr.String()) + `:\d+ src=spiffe://[^ ]+/svc/a `)
	eventually(t, afterRestore, "A's requests reach B through its second instance", func() error {
		if !viaB2.MatchString(sidecarB.out.String()) {
			return errors.New("no access log line from host3 with A's identity")
		}
		return nil
	})
	<-window
	checkNoFailures(t, "host2 cut off from the Consul server and back", stop())
	if got := sidecarA.reloads(t) - reloads; got != 0 {
		t.Errorf("A's HAProxy reloaded %d times, want 0", got)
	}
	if n := strings.Count(sidecarA.out.String(), "watch failed, retrying"); n > 0 {
		t.Logf("A's sidecar logged %d watch failures while cut off", n)
	}
}

// registerOnHost registers service name, whose application listens on
// 127.0.0.1:appPort of host h, with a sidecar whose public listener is on
// h's address: the address the service's callers on other hosts reach.
func registerOnHost(t *testing.T, c *api.Client, h *testenv.Host, name string, appPort int, proxyCfg map[string]any, ups ...api.Upstream) {
	t.Helper()
	err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: name, Name: name, Port: appPort, Address: h.Addr.String(), Checks: passing(),
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
			Port: hostPublicPort, Address: h.Addr.String(), Checks: passing(),
			Proxy: &api.AgentServiceConnectProxyConfig{
				LocalServiceAddress: "127.0.0.1", LocalServicePort: appPort,
				Config: proxyCfg, Upstreams: ups,
			},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
}

// hostApp serves "hello from <name>" on a free port of 127.0.0.1 inside
// host h.
func hostApp(t *testing.T, h *testenv.Host, name string) int {
	t.Helper()
	ln, err := h.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return serveApp(t, ln, name)
}

// hostGet200 is a call from inside host h, on a new connection each time:
// GET url must answer 200 with body.
func hostGet200(h *testenv.Host, url, body string) func() error {
	tr := h.Transport()
	tr.DisableKeepAlives = true
	client := &http.Client{Timeout: 5 * time.Second, Transport: tr}
	return func() error {
		resp, err := client.Get(url)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err == nil && (resp.StatusCode != 200 || strings.TrimSpace(string(b)) != body) {
			err = fmt.Errorf("%d %q", resp.StatusCode, b)
		}
		return err
	}
}

// hostTraffic calls url from inside host h in one loop per traffic style
// (trafficStyles) until stop, which reports each style's calls.
func hostTraffic(t *testing.T, h *testenv.Host, url, body string) (stop func() map[string]loadResult) {
	t.Helper()
	kept, reconnects := hostKeptAlive(t, h, url, body)
	calls := map[string]func() error{
		trafficStyles[0]: hostGet200(h, url, body),
		trafficStyles[1]: kept,
	}
	stops := map[string]func() (int64, int64, error){}
	for style, call := range calls {
		stops[style] = load(call)
	}
	// Stopped when the test ends too, should it end before stop: the
	// loops would otherwise spin on failing calls through later tests.
	stop = sync.OnceValue(func() map[string]loadResult {
		out := map[string]loadResult{}
		for style, stop := range stops {
			var r loadResult
			r.ok, r.failed, r.first = stop()
			out[style] = r
		}
		t.Logf("kept-alive client: %d times on a new connection after the first", reconnects.Load())
		return out
	})
	t.Cleanup(func() { stop() })
	return stop
}

// hostKeptAlive is a call from inside host h on one kept-alive
// connection: GET url must answer 200 with body. Go's transport silently
// sends a GET again on a new connection when the kept one fails before any
// answer; such a call is a failure here, since the sidecar lost the
// request. reconnects counts the calls that found the kept connection
// closed (between two answers) and opened a new one.
func hostKeptAlive(t *testing.T, h *testenv.Host, url, body string) (call func() error, reconnects *atomic.Int64) {
	tr := h.Transport()
	t.Cleanup(tr.CloseIdleConnections)
	client := &http.Client{Timeout: 5 * time.Second, Transport: tr}
	var conns, fresh int
	ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
		GotConn: func(i httptrace.GotConnInfo) {
			conns++
			if !i.Reused {
				fresh++
			}
		},
	})
	reconnects = new(atomic.Int64)
	first := true
	return func() error {
		conns, fresh = 0, 0
		req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
		resp, err := client.Do(req)
		if fresh > 0 && !first {
			reconnects.Add(1)
		}
		first = false
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		switch {
		case err != nil:
			return err
		case conns > 1:
			return fmt.Errorf("sent %d times: the kept-alive connection failed before an answer", conns)
		case resp.StatusCode != 200 || strings.TrimSpace(string(b)) != body:
			return fmt.Errorf("%d %q", resp.StatusCode, b)
		}
		return nil
	}, reconnects
}

// agentError asks the Consul agent at addr, from inside host h, for the
// cluster leader, which it must get from a server. It returns the agent's
// error when it cannot reach one, and an error when it can.
func agentError(h *testenv.Host, addr string) (string, error) {
	client := &http.Client{Timeout: 3 * time.Second, Transport: h.Transport()}
	defer client.CloseIdleConnections()
	resp, err := client.Get("http://" + addr + "/v1/status/leader")
	if err != nil {
		return "", fmt.Errorf("the agent does not answer: %w", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode == 200 {
		return "", fmt.Errorf("the agent reaches the leader %s", b)
	}
	return fmt.Sprintf("%d %s", resp.StatusCode, strings.TrimSpace(string(b))), nil
}

// hasServer is a check that a server of backend, not in maintenance, points
// at addr (host:port).
func (s *sidecar) hasServer(backend, addr string) func() error {
	return func() error {
		st, err := s.rt.ServersState(context.Background(), backend)
		if err != nil {
			return err
		}
		for _, srv := range st {
			if !srv.Maint() && net.JoinHostPort(srv.Addr, strconv.Itoa(srv.Port)) == addr {
				return nil
			}
		}
		return fmt.Errorf("no server at %s in %s: %+v", addr, backend, st)
	}
}
