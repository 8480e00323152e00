package controller

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/chain"
)

func loadChain(t *testing.T, name string, change func(c *api.CompiledDiscoveryChain)) *chain.Chain {
	t.Helper()
	b, err := os.ReadFile("../chain/testdata/" + name + ".json")
	if err != nil {
		t.Fatal(err)
	}
	var cc api.CompiledDiscoveryChain
	if err := json.Unmarshal(b, &cc); err != nil {
		t.Fatal(err)
	}
	if change != nil {
		change(&cc)
	}
	ch, err := chain.Compile(&cc)
	if err != nil {
		t.Fatal(err)
	}
	return &ch
}

// TestChainReloadOrRuntime: which chain changes reload (the Sidecar
// differs, with the reason) and which are chain map entries only.
func TestChainReloadOrRuntime(t *testing.T) {
	reg := &Sidecar{ProxyID: "p", Service: "client", Upstreams: []Upstream{
		{Name: "up_db", Type: "service", Destination: "db", BindAddr: "127.0.0.1", BindPort: 9192, Protocol: "tcp"},
		{Name: "up_web", Type: "service", Destination: "web", BindAddr: "127.0.0.1", BindPort: 9191, Protocol: "http"},
	}}
	split := func(a, b float32) func(c *api.CompiledDiscoveryChain) {
		return func(c *api.CompiledDiscoveryChain) {
			n := c.Nodes[c.StartNode]
			n.Splits[0].Weight, n.Splits[1].Weight = a, b
		}
	}
	c := &Controller{}
	entries := func(sc *Sidecar, ch *chain.Chain) map[string]map[string]string {
		c.desired.chains = map[string]*chain.Chain{"up_web": ch}
		c.cfg.StateDir = "/state"
		return c.chainMaps(sc)
	}

	plain := expand(reg, map[string]*chain.Chain{"up_web": loadChain(t, "default", nil)})
	if !plain.Equal(*reg) {
		t.Fatalf("a default chain changed the sidecar: %s", reg.Diff(*plain))
	}
	// A chain on a tcp upstream is not taken.
	if sc := expand(reg, map[string]*chain.Chain{"up_db": loadChain(t, "split", nil)}); !sc.Equal(*reg) {
		t.Fatalf("a chain on a tcp upstream changed the sidecar: %s", reg.Diff(*sc))
	}

	ch90 := loadChain(t, "split", nil)
	sc90 := expand(reg, map[string]*chain.Chain{"up_web": ch90})
	if d := reg.Diff(*sc90); d != "discovery chain target up_web:web:v1:dc1 added, discovery chain target up_web:web:v2:dc1 added, upstream up_web changed" {
		t.Fatalf("reason %q", d)
	}
	for _, u := range sc90.Upstreams {
		if u.Name == "up_web:web:v1:dc1" && (u.Filter != "Service.Tags contains v1" || !u.OnlyPassing || u.Destination != "web" || u.Parent != "up_web") {
			t.Fatalf("target upstream %+v", u)
		}
	}

	// 90/10 -> 50/50: the same sidecar, 40 map entries.
	ch50 := loadChain(t, "split", split(50, 50))
	sc50 := expand(reg, map[string]*chain.Chain{"up_web": ch50})
	if !sc50.Equal(*sc90) {
		t.Fatalf("a weight change reloads: %s", sc90.Diff(*sc50))
	}
	acts := planChainMaps(entries(sc50, ch50), entries(sc90, ch90), func(n string) string { return "/state/chain_" + n + ".map" })
	if len(acts) != 1 {
		t.Fatalf("actions %v", acts)
	}
	a := acts[0].(chainMapAction)
	if len(a.sets) != 40 || a.file != "/state/chain_up_web.map" || a.sets[0][1] != bootstrap.TargetBackendName("up_web", "web:v2:dc1") {
		t.Fatalf("sets %v", a.sets)
	}
	if acts := planChainMaps(entries(sc50, ch50), entries(sc50, ch50), func(n string) string { return "/state/chain_" + n + ".map" }); len(acts) != 0 {
		t.Fatalf("nothing changed, actions %v", acts)
	}

	// A router's request timeout: runtime. Its match: a reload.
	full := loadChain(t, "full", nil)
	scFull := expand(reg, map[string]*chain.Chain{"up_web": full})
	slower := loadChain(t, "full", func(c *api.CompiledDiscoveryChain) {
		c.Nodes[c.StartNode].Routes[0].Definition.Destination.RequestTimeout = 9e9
	})
	if sc := expand(reg, map[string]*chain.Chain{"up_web": slower}); !sc.Equal(*scFull) {
		t.Fatalf("a request timeout change reloads: %s", scFull.Diff(*sc))
	}
	if e := entries(scFull, slower)["up_web"]["r0"]; e != "9000" {
		t.Fatalf("r0 timeout entry %q", e)
	}
	moved := loadChain(t, "full", func(c *api.CompiledDiscoveryChain) {
		c.Nodes[c.StartNode].Routes[0].Definition.Match.HTTP.PathPrefix = "/ops"
	})
	sc := expand(reg, map[string]*chain.Chain{"up_web": moved})
	if d := scFull.Diff(*sc); !strings.Contains(d, "discovery chain of up_web changed") {
		t.Fatalf("a match change: reason %q", d)
	}
}

func TestCheckBackendNames(t *testing.T) {
	ch := loadChain(t, "split", nil)
	if err := checkBackendNames("up_web", *ch); err != nil {
		t.Fatal(err)
	}
	if err := checkBackendNames("up_"+strings.Repeat("w", 150), *ch); err == nil {
		t.Fatal("a backend name over 160 bytes accepted")
	}
}

// TestChainTargetsGetPassive: every target backend of a routed upstream
// gets the upstream's passive health check, not its limits (counted in
// the upstream's frontend), and renders with it.
func TestChainTargetsGetPassive(t *testing.T) {
	passive := bootstrap.PassiveCheck{Interval: 5 * time.Second, MaxFailures: 3}
	limits := bootstrap.Limits{MaxConcurrentRequests: 10}
	reg := &Sidecar{ProxyID: "p", Service: "client", Upstreams: []Upstream{
		{Name: "up_web", Type: "service", Destination: "web", BindAddr: "127.0.0.1", BindPort: 9191, Protocol: "http", Passive: passive, Limits: limits},
	}}
	sc := expand(reg, map[string]*chain.Chain{"up_web": loadChain(t, "split", nil)})
	targets := 0
	for _, u := range sc.Upstreams {
		switch {
		case u.Target != "":
			targets++
			if u.Passive != passive || u.Limits != (bootstrap.Limits{}) {
				t.Errorf("target %s: passive %+v limits %+v", u.Name, u.Passive, u.Limits)
			}
		case u.Passive != passive || u.Limits != limits:
			t.Errorf("upstream %s: passive %+v limits %+v", u.Name, u.Passive, u.Limits)
		}
	}
	if targets != 2 {
		t.Fatalf("%d targets, want 2", targets)
	}
	c := &Controller{log: zap.NewNop()}
	c.cfg.StateDir = "/state"
	c.desired.leaf, c.desired.roots = &certs.Bundle{}, &certs.Roots{}
	c.desired.chains = map[string]*chain.Chain{"up_web": loadChain(t, "split", nil)}
	spec := c.spec(*sc, nil)
	for _, u := range spec.Upstreams {
		if u.Passive != passive {
			t.Errorf("rendered upstream %s without the passive check: %+v", u.Name, u.Passive)
		}
	}
}
