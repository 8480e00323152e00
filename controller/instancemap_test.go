package controller

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/consul/api"
	"go.uber.org/zap/zaptest"

	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/slots"
	"github.com/haproxy-connect/haproxy-connect/verify"
)

func TestInstanceMapCommands(t *testing.T) {
	const file = "/s/instances.map"
	insts := map[netip.AddrPort]instance{
		netip.MustParseAddrPort("10.0.0.1:21000"):  {id: "web-1"},
		netip.MustParseAddrPort("10.0.0.2:21000"):  {id: "web-2"},
		netip.MustParseAddrPort("10.0.0.3:21000"):  {id: "web 3;@1 reload"},
		netip.MustParseAddrPort("[fd00::9]:21000"): {id: "web-9"},
	}
	table := func(eps ...slots.Endpoint) slots.Table {
		_, t, _ := slots.Plan(slots.New("up_web", "s", 2), eps)
		return t
	}
	e := func(addr string) slots.Endpoint { return slots.Endpoint{Addr: addr, Port: 21000, Weight: 1} }
	tests := []struct {
		name    string
		applied slots.Table
		desired []slots.Endpoint
		want    []string
	}{
		{"a free slot filled", table(), []slots.Endpoint{e("10.0.0.1")}, []string{
			"@1 set map /s/instances.map up_web/s1 web-1@10.0.0.1:21000",
		}},
		{"a slot changes hands in one update", table(e("10.0.0.1")), []slots.Endpoint{e("10.0.0.2")}, []string{
			"@1 set map /s/instances.map up_web/s1 web-2@10.0.0.2:21000",
		}},
		{"a slot parked", table(e("10.0.0.1"), e("10.0.0.2")), []slots.Endpoint{e("10.0.0.2")}, []string{
			"@1 set map /s/instances.map up_web/s1 -",
		}},
		{"a weight change names nobody new", table(e("10.0.0.1")), []slots.Endpoint{{Addr: "10.0.0.1", Port: 21000, Weight: 7}}, nil},
		{"an ID HAProxy must not see", table(), []slots.Endpoint{e("10.0.0.3")}, []string{
			"@1 set map /s/instances.map up_web/s1 ?@10.0.0.3:21000",
		}},
		{"an instance Consul did not name", table(), []slots.Endpoint{e("10.0.0.4")}, []string{
			"@1 set map /s/instances.map up_web/s1 ?@10.0.0.4:21000",
		}},
		{"a slot added at run time gets an entry", table(e("10.0.0.1"), e("10.0.0.2")), []slots.Endpoint{e("10.0.0.1"), e("10.0.0.2"), e("fd00::9")}, []string{
			"@1 add map /s/instances.map up_web/s3 web-9@[fd00::9]:21000",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ops, next, _ := slots.Plan(tt.applied, tt.desired)
			cmds, errs := InstanceMapCommands(file, "up_web", ops, next, insts)
			if len(errs) > 0 {
				t.Fatal(errs)
			}
			var got []string
			for _, c := range cmds {
				got = append(got, c.String())
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("commands (-want +got):\n%s", diff)
			}
		})
	}
	if _, errs := InstanceMapCommands("relative.map", "up_web", []slots.Op{{Kind: slots.OpMaint, Server: "s1"}}, table(), nil); len(errs) != 1 {
		t.Errorf("a command that cannot be built: %v, want one error", errs)
	}
}

// TestInstanceMapTranscript: the controller sends the instance map's
// commands in the batch of the slot operations, after them, and renders
// the map and the reload's reason into the state directory at start and
// at each reload.
func TestInstanceMapTranscript(t *testing.T) {
	leaf, roots := webLeaf(t)
	dir := t.TempDir()
	c, err := New(Config{Consul: api.DefaultConfig(), ProxyID: "web-sidecar-proxy", StateDir: dir, SPOASocket: "/state/spoa.sock", Log: zaptest.NewLogger(t), MinSlots: 8, AccessLog: true})
	if err != nil {
		t.Fatal(err)
	}
	fake := &fakeHAProxy{}
	c.rt = fake
	c.ident.verify = func(_ context.Context, _ verify.Config, _, want string) (verify.Result, error) {
		return verify.Result{ID: want}, nil
	}
	c.startMaster = func(context.Context) (*runtime.Master, error) { return &runtime.Master{}, nil }
	c.watches["up_api"] = &upstreamWatch{up: up("api", 9191), cancel: func() {}}
	c.leafFor, c.leafStop = "web", func() {}
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	endpoints := func(d *desired, ids ...string) {
		var eps []slots.Endpoint
		insts := map[netip.AddrPort]instance{}
		for i, id := range ids {
			e := ep(i+1, 21000)
			if id == "" {
				continue
			}
			eps = append(eps, e)
			insts[netip.MustParseAddrPort(e.Key())] = instance{id: id}
		}
		d.setEndpoints("up_api", eps, time.Now())
		d.instances["up_api"] = insts
	}

	d := &c.desired
	d.sidecar, d.sidecarSince, d.leaf, d.roots = sidecar(up("api", 9191)), time.Now(), &leaf, &roots
	endpoints(d, "api-1", "api-2")
	settle(t, c)
	if got, want := read(InstanceMapFile), "up_api/s1 api-1@10.0.0.1:21000\nup_api/s2 api-2@10.0.0.2:21000\nup_api/s3 -\nup_api/s4 -\nup_api/s5 -\nup_api/s6 -\nup_api/s7 -\nup_api/s8 -\n"; got != want {
		t.Errorf("instance map at start:\n%s\nwant:\n%s", got, want)
	}
	if got := read(StateMapFile); got != "reload_reason start\nconfig_id "+c.configID(*d.sidecar, d.roots.PEM)+"\n" {
		t.Errorf("state map at start: %q", got)
	}
	if cfg := read("haproxy.cfg"); !strings.Contains(cfg, "inst=%[srv_name,regsub(^,up_api/),map("+filepath.Join(dir, InstanceMapFile)+",-)]") {
		t.Errorf("the upstream's access log does not name the instance:\n%s", cfg)
	}

	m := filepath.Join(dir, InstanceMapFile)
	steps := []struct {
		name      string
		change    func(d *desired)
		wantSlots []string
		wantMaps  []string
	}{
		{"one instance replaced by another: the old one's slot is freed at once, the new one takes it once proven, and the map names it", func(d *desired) {
			endpoints(d, "", "api-2", "api-3")
		}, []string{
			"@1 set server up_api/s1 state maint",
			"@1 set server up_api/s1 addr 10.0.0.3 port 21000",
			"@1 set server up_api/s1 state ready",
		}, []string{
			fmt.Sprintf("@1 set map %s up_api/s1 -", m),
			fmt.Sprintf("@1 set map %s up_api/s1 api-3@10.0.0.3:21000", m),
		}},
		{"an instance leaves: its slot is free in the map", func(d *desired) {
			endpoints(d, "", "", "api-3")
		}, []string{
			"@1 set server up_api/s2 state maint",
		}, []string{
			fmt.Sprintf("@1 set map %s up_api/s2 -", m),
		}},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			st.change(&c.desired)
			settle(t, c)
			if diff := cmp.Diff(st.wantSlots, fake.take()); diff != "" {
				t.Errorf("slot commands (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(st.wantMaps, fake.maps); diff != "" {
				t.Errorf("map commands (-want +got):\n%s", diff)
			}
			fake.maps = nil
		})
	}

	d.sidecar = sidecar(up("api", 9191), up("db", 9192))
	c.watches["up_db"] = &upstreamWatch{up: up("db", 9192), cancel: func() {}}
	settle(t, c)
	if got := read(StateMapFile); got != "reload_reason registration:_upstream_up~5Fdb_added\nconfig_id "+c.configID(*d.sidecar, d.roots.PEM)+"\n" {
		t.Errorf("state map after the reload: %q", got)
	}
	if got := read(InstanceMapFile); !strings.HasPrefix(got, "up_api/s1 api-3@10.0.0.3:21000\nup_api/s2 -\n") || !strings.Contains(got, "up_db/s1 -\n") {
		t.Errorf("instance map after the reload:\n%s", got)
	}
}
