package bootstrap

import (
	"encoding/json"
	"os"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/chain"
	"github.com/haproxy-connect/haproxy-connect/slots"
)

// chainSpec is an http sidecar with one upstream, web, routed by the
// discovery chain of chain/testdata/full.json (a router, a 90/10
// splitter, a resolver with subsets, failover and a hash policy), with
// limits and a passive health check, which every target backend gets.
func chainSpec(t *testing.T) (Spec, Routing) {
	t.Helper()
	b, err := os.ReadFile("../chain/testdata/full.json")
	if err != nil {
		t.Fatal(err)
	}
	var cc api.CompiledDiscoveryChain
	if err := json.Unmarshal(b, &cc); err != nil {
		t.Fatal(err)
	}
	c, err := chain.Compile(&cc)
	if err != nil {
		t.Fatal(err)
	}
	s := baseSpec()
	s.Public.Protocol = "http"
	web := upstream("web", 9191, "http", 4, slots.Endpoint{Addr: "10.0.0.1", Port: 21000, Weight: 1})
	routing, tbs := NewRouting(web.Name, c, goldenState+"/chain_up_web.map")
	web.Routing = &routing
	web.Limits = Limits{MaxConnections: 100, MaxConcurrentRequests: 50}
	web.Passive = PassiveCheck{Interval: 5 * time.Second, MaxFailures: 3}
	s.Upstreams = []Upstream{web}
	for i, tg := range c.Targets {
		name := TargetBackendName(web.Name, tg.Name)
		_, table, _ := slots.Plan(slots.New(name, SlotPrefix, 2), []slots.Endpoint{{Addr: "10.0.1." + string(rune('1'+i)), Port: 21000, Weight: 1}})
		tb := tbs[tg.Name]
		s.Upstreams = append(s.Upstreams, Upstream{Name: name, Destination: tg.Service, Protocol: "http", Slots: table, Target: &tb,
			ConnectTimeout: tg.ConnectTimeout, Passive: web.Passive})
	}
	return s, routing
}

// TestRenderChainGolden renders the chain upstream against its golden
// files and runs haproxy -c on them.
func TestRenderChainGolden(t *testing.T) {
	s, routing := chainSpec(t)
	cfg, err := Render(s)
	if err != nil {
		t.Fatal(err)
	}
	spoe, err := RenderSPOE(s)
	if err != nil {
		t.Fatal(err)
	}
	crt, err := RenderCrtList(s)
	if err != nil {
		t.Fatal(err)
	}
	chainMap := RenderChainMap(routing)
	for file, got := range map[string]string{"http_discovery_chain.golden": cfg, "http_discovery_chain.chainmap.golden": chainMap} {
		checkGolden(t, file, got)
	}
	haproxyCheck(t, cfg, map[string]string{"spoe.cfg": spoe, "public.crtlist": crt, "chain_up_web.map": chainMap})
}

func TestAssignBuckets(t *testing.T) {
	count := func(b [ChainBuckets]string) map[string]int {
		m := map[string]int{}
		for _, t := range b {
			m[t]++
		}
		return m
	}
	tests := []struct {
		splits []chain.Split
		want   map[string]int
	}{
		{[]chain.Split{{Weight: 10000, Target: "a"}}, map[string]int{"a": 100}},
		{[]chain.Split{{Weight: 9000, Target: "a"}, {Weight: 1000, Target: "b"}}, map[string]int{"a": 90, "b": 10}},
		{[]chain.Split{{Weight: 3333, Target: "a"}, {Weight: 3333, Target: "b"}, {Weight: 3334, Target: "c"}}, map[string]int{"a": 33, "b": 33, "c": 34}},
		{[]chain.Split{{Weight: 50, Target: "a"}, {Weight: 9950, Target: "b"}}, map[string]int{"a": 1, "b": 99}},
		{[]chain.Split{{Weight: 0, Target: "a"}, {Weight: 10000, Target: "b"}}, map[string]int{"b": 100}},
	}
	for _, tt := range tests {
		if d := cmp.Diff(tt.want, count(AssignBuckets(tt.splits))); d != "" {
			t.Errorf("%v (-want +got):\n%s", tt.splits, d)
		}
	}
	// 90/10 -> 50/50 moves only the 40 buckets between.
	a := AssignBuckets([]chain.Split{{Weight: 9000, Target: "a"}, {Weight: 1000, Target: "b"}})
	b := AssignBuckets([]chain.Split{{Weight: 5000, Target: "a"}, {Weight: 5000, Target: "b"}})
	moved := 0
	for i := range a {
		if a[i] != b[i] {
			moved++
		}
	}
	if moved != 40 {
		t.Errorf("90/10 -> 50/50 moved %d buckets, want 40", moved)
	}
}

// TestRoutingRefusesUnchecked: a Routing built without package chain
// cannot reach the configuration with a quote or a newline.
func TestRoutingRefusesUnchecked(t *testing.T) {
	for name, change := range map[string]func(r *Routing){
		"path newline":   func(r *Routing) { r.Routes[0].Match.PathPrefix = "/a\nprogram x" },
		"header quote":   func(r *Routing) { r.Routes[0].Dest.RequestHeaders.Set[0].Value = "a' b" },
		"header percent": func(r *Routing) { r.Routes[0].Dest.RequestHeaders.Set[0].Value = "%[env(X)]" },
		"regex quote":    func(r *Routing) { r.Routes[1].Match.PathRegex = "a'" },
		"method":         func(r *Routing) { r.Routes[0].Match.Methods = []string{"GET }"} },
		"rewrite":        func(r *Routing) { r.Routes[0].Dest.PrefixRewrite = "/%[src]" },
		"backend":        func(r *Routing) { r.Backends["admin::dc1"] = "be x" },
	} {
		t.Run(name, func(t *testing.T) {
			s, _ := chainSpec(t)
			r := *s.Upstreams[0].Routing
			r.Routes = cloneRoutes(r.Routes)
			r.Backends = cloneMap(r.Backends)
			change(&r)
			s.Upstreams[0].Routing = &r
			if _, err := Render(s); err == nil {
				t.Fatal("rendered")
			}
		})
	}
}

func cloneRoutes(rs []chain.Route) []chain.Route {
	b, _ := json.Marshal(rs)
	var out []chain.Route
	_ = json.Unmarshal(b, &out)
	return out
}

func cloneMap(m map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range m {
		out[k] = v
	}
	return out
}

// TestRetryOnConnectFailure: a target backend leaves conn-failure out of
// retry-on only when every route that reaches it has a retry policy with
// RetryOnConnectFailure false; empty-response always stays.
func TestRetryOnConnectFailure(t *testing.T) {
	route := func(d chain.Dest, targets ...string) chain.Route {
		r := chain.Route{Dest: d}
		for _, tg := range targets {
			r.Splits = append(r.Splits, chain.Split{Weight: chain.TotalWeight / len(targets), Target: tg})
		}
		return r
	}
	noConn := chain.Dest{NumRetries: 2, RetryOnStatusCodes: []int{503}}
	conn := chain.Dest{NumRetries: 2, RetryOnConnectFailure: true}
	tests := []struct {
		name   string
		routes []chain.Route
		want   map[string]string // target -> retry-on
	}{
		{"no retry policy", []chain.Route{route(chain.Dest{}, "a")},
			map[string]string{"a": "conn-failure empty-response", "b": "conn-failure empty-response"}},
		{"RetryOnConnectFailure", []chain.Route{route(conn, "a")},
			map[string]string{"a": "conn-failure empty-response", "b": "conn-failure empty-response"}},
		{"a policy without it", []chain.Route{route(noConn, "a")},
			map[string]string{"a": "empty-response 503", "b": "conn-failure empty-response"}},
		{"NumRetries alone", []chain.Route{route(chain.Dest{NumRetries: 1}, "a", "b")},
			map[string]string{"a": "empty-response", "b": "empty-response"}},
		{"another route without a policy reaches it", []chain.Route{route(noConn, "a"), route(chain.Dest{}, "a", "b")},
			map[string]string{"a": "conn-failure empty-response 503", "b": "conn-failure empty-response"}},
		{"another route retries connections", []chain.Route{route(noConn, "a", "b"), route(conn, "b")},
			map[string]string{"a": "empty-response 503", "b": "conn-failure empty-response 503"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := chain.Chain{Routes: tt.routes, Targets: []chain.Target{{Name: "a"}, {Name: "b"}}}
			_, tbs := NewRouting("up_web", c, "/state/chain_up_web.map")
			got := map[string]string{}
			for name, tb := range tbs {
				got[name] = retryOn(&tb)
			}
			if d := cmp.Diff(tt.want, got); d != "" {
				t.Errorf("retry-on (-want +got):\n%s", d)
			}
		})
	}
}
