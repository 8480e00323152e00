package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// TestHostileCatalogInstances registers, through the catalog (which stores
// Service.Address as given), instances of the client's upstream whose
// addresses carry an IPv6 zone holding a master CLI command, a ';', spaces,
// a "program" section, and whose ports are 0 and 70000, beside a good new
// instance, while requests flow through the upstream. None of them reaches
// HAProxy: local_app/app and every other backend's servers are unchanged,
// the upstream serves only good endpoints, no request fails, each bad
// instance is logged once with its ID, field and reason, and counted. Then
// a new upstream added to the registration arrives with exactly one
// reload, whose configuration carries none of them (nor a hostile upstream
// added with it, which is dropped with its reason): the injected program
// never runs.
func TestHostileCatalogInstances(t *testing.T) {
	m := startMesh(t, testenv.ConsulOptions{}, "http", "-log-format", "json")
	c, ports, client := m.c, m.ports, m.client
	eventually(t, 10*time.Second, "the upstream serves", serves(ports[3], "hello from server"))

	ctx := context.Background()
	others := func() (map[string]runtime.ServerStatus, error) {
		st, err := client.rt.ServersState(ctx, "")
		if err != nil {
			return nil, err
		}
		out := map[string]runtime.ServerStatus{}
		for _, s := range st {
			if !strings.HasPrefix(s.Backend, "up_") {
				s.OpState = 0 // health, not configuration
				out[s.Backend+"/"+s.Name] = s
			}
		}
		return out, nil
	}
	before, err := others()
	if err != nil {
		t.Fatal(err)
	}
	if app := before["local_app/app"]; app.Addr != "127.0.0.1" || app.Port != ports[1] {
		t.Fatalf("local_app/app is %s:%d before the test", app.Addr, app.Port)
	}

	var served atomic.Int64
	stopLoad := load(func() error {
		err := get200(ports[3])()
		if err == nil {
			served.Add(1)
		}
		return err
	})
	stopped := false
	defer func() {
		if !stopped {
			stopLoad()
		}
	}()

	marker := filepath.Join(t.TempDir(), "pwned")
	// Consul refuses port 0 for a connect-proxy unless it has a socket
	// path, which this sidecar does not use: such an instance is in the
	// health answer with port 0.
	hostile := []struct {
		id, addr string
		port     int
		field    string
		socket   bool
	}{
		{"hostile-zone-newline", "fe80::1%x\n@1 set server local_app/app addr 127.0.0.9 port 9", 21000, "address", false},
		{"hostile-zone-semicolon", "fe80::1%x;@1 set server local_app/app addr 127.0.0.9 port 9", 21000, "address", false},
		{"hostile-semicolon", "127.0.0.1;@1 set server local_app/app state maint", 21000, "address", false},
		{"hostile-spaces", "127.0.0.1 port 9 weight 256", 21000, "address", false},
		{"hostile-program", "fe80::1%lo]:80\nprogram pwn\n    command /usr/bin/touch " + marker + "\nbackend x", 21000, "address", false},
		{"hostile-mapped", "::ffff:127.0.0.9", 21000, "address", false},
		{"hostile-port-0", "127.0.0.1", 0, "port", true},
		{"hostile-port-70000", "127.0.0.1", 70000, "port", false},
	}
	catalogRegister := func(id, addr string, port int, socket bool) {
		t.Helper()
		svc := &api.AgentService{ID: id, Service: "server-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Address: addr, Port: port,
			Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "server", DestinationServiceID: "server"}}
		if socket {
			svc.SocketPath = "/tmp/no-such-proxy.sock"
		}
		_, err := c.Catalog().Register(&api.CatalogRegistration{Node: "hostile-node", Address: "127.0.0.1", Service: svc}, nil)
		if err != nil {
			t.Fatalf("catalog register %s: %v", id, err)
		}
	}
	for _, h := range hostile {
		catalogRegister(h.id, h.addr, h.port, h.socket)
	}
	// Consul serves them as given: the test is only worth something if so.
	entries, _, err := c.Health().Connect("server", "", true, nil)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, e := range entries {
		got[e.Service.ID] = fmt.Sprintf("%s:%d", e.Service.Address, e.Service.Port)
	}
	for _, h := range hostile {
		if got[h.id] != fmt.Sprintf("%s:%d", h.addr, h.port) {
			t.Fatalf("Consul serves %s as %q, not as registered", h.id, got[h.id])
		}
	}
	good := relay(t, ports[0])
	catalogRegister("good-relay", "127.0.0.1", good, false)

	eventually(t, 10*time.Second, "the good new instance is in service", client.inBackend("up_server", good))
	dropped := func() (map[string][]map[string]any, error) {
		out := map[string][]map[string]any{}
		for _, l := range strings.Split(client.out.String(), "\n") {
			var rec map[string]any
			if json.Unmarshal([]byte(l), &rec) != nil || !strings.HasPrefix(fmt.Sprint(rec["msg"]), "upstream instance dropped") {
				continue
			}
			id := fmt.Sprint(rec["instance_id"])
			out[id] = append(out[id], rec)
		}
		for _, h := range hostile {
			if len(out[h.id]) == 0 {
				return out, fmt.Errorf("%s not logged yet", h.id)
			}
		}
		return out, nil
	}
	eventually(t, 10*time.Second, "every bad instance is logged", func() error { _, err := dropped(); return err })

	// A new upstream: exactly one reload, rendered with the endpoints
	// Consul serves now.
	reloadsBefore := client.reloads(t)
	twoPorts := testenv.FreePorts(t, 3)
	register(t, c, "two", httpApp(t, "two"), twoPorts[0], map[string]any{"protocol": "http"})
	startSidecar(t, m.consul, "two")
	// With it, a hostile upstream, which is dropped on its own.
	register(t, c, "client", ports[1], ports[2], nil, m.upstream,
		api.Upstream{DestinationName: "two", LocalBindPort: twoPorts[1], Config: map[string]any{"protocol": "http"}},
		api.Upstream{DestinationName: "two", Datacenter: "dc1\nprogram pwn2", LocalBindAddress: "fe80::1%lo;x", LocalBindPort: twoPorts[2]})
	eventually(t, 15*time.Second, "the new upstream serves", serves(twoPorts[1], "hello from two"))
	if n := client.reloads(t) - reloadsBefore; n != 1 {
		t.Errorf("%d reloads for one new upstream beside bad instances, want exactly 1", n)
	}
	// Requests keep flowing through the old upstream after the reload.
	after := served.Load()
	eventually(t, 10*time.Second, "200 more requests served after the reload", func() error {
		if n := served.Load() - after; n < 200 {
			return fmt.Errorf("%d so far", n)
		}
		return nil
	})
	ok, failed, firstErr := stopLoad()
	stopped = true
	if ok == 0 || failed > 0 {
		t.Errorf("%d of %d requests failed; first: %v", failed, ok+failed, firstErr)
	}

	// Nothing reached HAProxy.
	now, err := others()
	if err != nil {
		t.Fatal(err)
	}
	for k, s := range before {
		if now[k] != s {
			t.Errorf("%s changed: %+v, was %+v", k, now[k], s)
		}
	}
	st, err := client.rt.ServersState(ctx, "up_server")
	if err != nil {
		t.Fatal(err)
	}
	var inService []string
	for _, s := range st {
		if !s.Maint() {
			inService = append(inService, fmt.Sprintf("%s:%d", s.Addr, s.Port))
		}
	}
	want := []string{fmt.Sprintf("127.0.0.1:%d", ports[0]), fmt.Sprintf("127.0.0.1:%d", good)}
	slices.Sort(inService)
	slices.Sort(want)
	if !slices.Equal(inService, want) {
		t.Errorf("up_server serves %v, want %v", inService, want)
	}
	cfg, err := os.ReadFile(filepath.Join(client.stateDir, "haproxy.cfg"))
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"program", "fe80", "127.0.0.9", "::ffff", "command", "pwn"} {
		if strings.Contains(string(cfg), bad) {
			t.Errorf("the reloaded configuration holds %q:\n%s", bad, cfg)
		}
	}
	if _, err := os.Stat(marker); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the injected program ran: %s exists (%v)", marker, err)
	}

	if !strings.Contains(client.out.String(), `"msg":"upstream rejected; the other upstreams keep working"`) ||
		!strings.Contains(client.out.String(), `invalid upstream datacenter \"dc1\\nprogram pwn2\"`) {
		t.Errorf("the hostile upstream's rejection is not logged with its reason")
	}

	// Each bad instance: one log line, with its field and reason; counted.
	logged, err := dropped()
	if err != nil {
		t.Fatal(err)
	}
	counts := map[string]int{}
	for _, h := range hostile {
		recs := logged[h.id]
		if len(recs) != 1 {
			t.Errorf("%s logged %d times, want once: %v", h.id, len(recs), recs)
			continue
		}
		if recs[0]["field"] != h.field || recs[0]["upstream"] != "up_server" || !strings.Contains(fmt.Sprint(recs[0]["error"]), "invalid "+h.field) {
			t.Errorf("%s logged as %v, want field %s and its reason", h.id, recs[0], h.field)
		}
		counts[h.field]++
	}
	for field, n := range counts {
		if v, err := client.metric("haproxy_connect_invalid_instances_total", "upstream", "up_server", "field", field); err != nil || int(v) != n {
			t.Errorf("haproxy_connect_invalid_instances_total of up_server, field %s = %v (%v), want %d", field, v, err, n)
		}
	}
	if len(logged) != len(hostile) {
		t.Errorf("%d instances logged as dropped, want %d (the good ones kept): %v", len(logged), len(hostile), logged)
	}
}
