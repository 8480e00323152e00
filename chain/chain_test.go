package chain

import (
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/input"
)

// load reads a chain as Consul 1.22 served it (testdata/*.json: the
// "Chain" of GET /v1/discovery-chain/web, entries in testdata/README).
func load(t testing.TB, name string) *api.CompiledDiscoveryChain {
	t.Helper()
	b, err := os.ReadFile("testdata/" + name + ".json")
	if err != nil {
		t.Fatal(err)
	}
	var c api.CompiledDiscoveryChain
	if err := json.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	return &c
}

func TestCompileServed(t *testing.T) {
	v1 := Target{Name: "web:v1:dc1", Service: "web", Subset: "v1", Datacenter: "dc1", Filter: "Service.Tags contains v1", OnlyPassing: true,
		ConnectTimeout: 3 * time.Second, Balance: Balance{Policy: Hash, HashOn: HashHeader, HashName: "x-user"}, Failover: []string{"web:v2:dc1"}}
	v2 := Target{Name: "web:v2:dc1", Service: "web", Subset: "v2", Datacenter: "dc1", Filter: `Service.Meta.version == "2"`,
		ConnectTimeout: 3 * time.Second, Balance: Balance{Policy: Hash, HashOn: HashHeader, HashName: "x-user"}}
	split := []Split{{9000, "web:v1:dc1"}, {1000, "web:v2:dc1"}}
	unsup := []string{"hash_policies beyond the first: HAProxy hashes one value"}
	tests := []struct {
		file string
		want Chain
	}{
		{"default", Chain{Service: "nothing", Protocol: "tcp", Default: true,
			Routes:  []Route{{Splits: []Split{{TotalWeight, "nothing::dc1"}}}},
			Targets: []Target{{Name: "nothing::dc1", Service: "nothing", Datacenter: "dc1", ConnectTimeout: 5 * time.Second}}}},
		{"split", Chain{Service: "web", Protocol: "http", Routes: []Route{{Splits: split}}, Targets: []Target{v1, v2}, Unsupported: unsup}},
		{"full", Chain{Service: "web", Protocol: "http",
			Routes: []Route{
				{
					Match:  Match{PathPrefix: "/admin", Headers: []HeaderMatch{{Name: "x-debug", Kind: Present}}, Methods: []string{"GET", "POST"}},
					Splits: []Split{{TotalWeight, "admin::dc1"}},
					Dest: Dest{RequestTimeout: 2 * time.Second, NumRetries: 3, RetryOnConnectFailure: true, RetryOnStatusCodes: []int{502, 503},
						PrefixRewrite:   "/",
						RequestHeaders:  HeaderMods{Set: []Header{{"x-route", "admin"}}, Remove: []string{"x-secret"}},
						ResponseHeaders: HeaderMods{Add: []Header{{"x-served-by", "admin route"}}}},
				},
				{
					Match:  Match{PathRegex: "/v2/.*", Query: []QueryMatch{{Name: "canary", Kind: Exact, Value: "1"}}},
					Splits: []Split{{TotalWeight, "web:v2:dc1"}},
				},
				{Match: Match{PathPrefix: "/"}, Splits: split},
			},
			Targets:     []Target{{Name: "admin::dc1", Service: "admin", Datacenter: "dc1", ConnectTimeout: 5 * time.Second}, v1, v2},
			Unsupported: unsup}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			got, err := Compile(load(t, tt.file))
			if err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(tt.want, got); d != "" {
				t.Fatalf("Compile (-want +got):\n%s", d)
			}
		})
	}
}

// TestCompileRefuses feeds hostile values into a served chain and checks
// that each is refused naming what was wrong.
func TestCompileRefuses(t *testing.T) {
	route := func(c *api.CompiledDiscoveryChain, i int) *api.ServiceRoute {
		return c.Nodes[c.StartNode].Routes[i].Definition
	}
	tests := []struct {
		name   string
		file   string
		change func(c *api.CompiledDiscoveryChain)
		want   string
	}{
		{"service newline", "split", func(c *api.CompiledDiscoveryChain) { c.ServiceName = "web\n@1 reload" }, "invalid chain service"},
		{"protocol", "split", func(c *api.CompiledDiscoveryChain) { c.Protocol = "http\nprogram" }, "invalid chain protocol"},
		{"namespace", "split", func(c *api.CompiledDiscoveryChain) { c.Namespace = "team" }, "only the default namespace"},
		{"target service space", "split", func(c *api.CompiledDiscoveryChain) { c.Targets["v1.web.default.default.dc1"].Service = "web x" }, "invalid target service"},
		{"target subset quote", "split", func(c *api.CompiledDiscoveryChain) { c.Targets["v1.web.default.default.dc1"].ServiceSubset = "v1'" }, "invalid target subset"},
		{"target dc newline", "split", func(c *api.CompiledDiscoveryChain) { c.Targets["v1.web.default.default.dc1"].Datacenter = "dc1\n" }, "invalid target datacenter"},
		{"filter newline", "split", func(c *api.CompiledDiscoveryChain) {
			c.Targets["v1.web.default.default.dc1"].Subset.Filter = "Service.Tags contains v1\n"
		}, "invalid subset filter"},
		{"filter huge", "split", func(c *api.CompiledDiscoveryChain) {
			c.Targets["v1.web.default.default.dc1"].Subset.Filter = strings.Repeat("a", 1<<20)
		}, "invalid subset filter"},
		{"connect timeout negative", "split", func(c *api.CompiledDiscoveryChain) { c.Targets["v1.web.default.default.dc1"].ConnectTimeout = -1 }, "invalid connect timeout"},
		{"connect timeout huge", "split", func(c *api.CompiledDiscoveryChain) {
			c.Targets["v1.web.default.default.dc1"].ConnectTimeout = 1000 * time.Hour
		}, "invalid connect timeout"},
		{"external", "split", func(c *api.CompiledDiscoveryChain) { c.Targets["v1.web.default.default.dc1"].External = true }, "external targets"},
		{"weights", "split", func(c *api.CompiledDiscoveryChain) { c.Nodes[c.StartNode].Splits[0].Weight = 50 }, "weights sum to 60.00"},
		{"weight NaN", "split", func(c *api.CompiledDiscoveryChain) { c.Nodes[c.StartNode].Splits[0].Weight = float32(nanf()) }, "out of range"},
		{"missing node", "split", func(c *api.CompiledDiscoveryChain) { c.Nodes[c.StartNode].Splits[0].NextNode = "resolver:gone" }, "is not in the chain"},
		{"missing start", "split", func(c *api.CompiledDiscoveryChain) { c.StartNode = "x" }, "start node"},
		{"lb policy", "split", func(c *api.CompiledDiscoveryChain) {
			c.Nodes["resolver:v1.web.default.default.dc1"].LoadBalancer.Policy = "least_request\n"
		}, "invalid load balancer policy"},
		{"hash header", "split", func(c *api.CompiledDiscoveryChain) {
			c.Nodes["resolver:v1.web.default.default.dc1"].LoadBalancer.HashPolicies[0].FieldValue = "x),src("
		}, "invalid hash header"},
		{"path prefix space", "full", func(c *api.CompiledDiscoveryChain) { route(c, 0).Match.HTTP.PathPrefix = "/admin x" }, "invalid route path_prefix"},
		{"path prefix quote", "full", func(c *api.CompiledDiscoveryChain) { route(c, 0).Match.HTTP.PathPrefix = "/a'b" }, "invalid route path_prefix"},
		{"path relative", "full", func(c *api.CompiledDiscoveryChain) { route(c, 0).Match.HTTP.PathPrefix = "admin" }, "invalid route path_prefix"},
		{"two paths", "full", func(c *api.CompiledDiscoveryChain) { route(c, 0).Match.HTTP.PathExact = "/x" }, "more than one of path_exact"},
		{"regex invalid", "full", func(c *api.CompiledDiscoveryChain) { route(c, 1).Match.HTTP.PathRegex = "(" }, "not a valid RE2"},
		{"regex newline", "full", func(c *api.CompiledDiscoveryChain) { route(c, 1).Match.HTTP.PathRegex = "a\nb" }, "invalid route path_regex"},
		{"header name", "full", func(c *api.CompiledDiscoveryChain) { route(c, 0).Match.HTTP.Header[0].Name = "x debug" }, "invalid route header name"},
		{"header two kinds", "full", func(c *api.CompiledDiscoveryChain) { route(c, 0).Match.HTTP.Header[0].Exact = "1" }, "exactly one of"},
		{"header value percent", "full", func(c *api.CompiledDiscoveryChain) {
			route(c, 0).Match.HTTP.Header[0] = api.ServiceRouteHTTPMatchHeader{Name: "x", Exact: "%[env(HOME)]"}
		}, "invalid route header value"},
		{"query value newline", "full", func(c *api.CompiledDiscoveryChain) { route(c, 1).Match.HTTP.QueryParam[0].Exact = "1\r\n" }, "invalid route query parameter value"},
		{"method", "full", func(c *api.CompiledDiscoveryChain) { route(c, 0).Match.HTTP.Methods = []string{"get"} }, "invalid route method"},
		{"retry status", "full", func(c *api.CompiledDiscoveryChain) { route(c, 0).Destination.RetryOnStatusCodes = []uint32{429} }, "retry_on_status_codes"},
		{"retries", "full", func(c *api.CompiledDiscoveryChain) { route(c, 0).Destination.NumRetries = 1 << 31 }, "invalid route num_retries"},
		{"rewrite quote", "full", func(c *api.CompiledDiscoveryChain) { route(c, 0).Destination.PrefixRewrite = "/'" }, "invalid route prefix_rewrite"},
		{"rewrite percent", "full", func(c *api.CompiledDiscoveryChain) { route(c, 0).Destination.PrefixRewrite = "/%[src]" }, "'%' is not supported"},
		{"rewrite without prefix", "full", func(c *api.CompiledDiscoveryChain) { route(c, 1).Destination.PrefixRewrite = "/x" }, "prefix_rewrite without"},
		{"set header value newline", "full", func(c *api.CompiledDiscoveryChain) {
			route(c, 0).Destination.RequestHeaders.Set["x-route"] = "a\nhttp-request redirect location /"
		}, "invalid request header set value"},
		{"remove header name", "full", func(c *api.CompiledDiscoveryChain) { route(c, 0).Destination.RequestHeaders.Remove = []string{""} }, "invalid request header remove"},
		{"no catch-all", "full", func(c *api.CompiledDiscoveryChain) {
			n := c.Nodes[c.StartNode]
			n.Routes = n.Routes[:2]
		}, "not a catch-all"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := load(t, tt.file)
			tt.change(c)
			_, err := Compile(c)
			if err == nil {
				t.Fatalf("accepted, want an error with %q", tt.want)
			}
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %q, want ErrInvalid with %q", err, tt.want)
			}
			if strings.ContainsAny(err.Error(), "\n\r") || len(err.Error()) > 600 {
				t.Fatalf("error %q spans lines or is too long", err)
			}
		})
	}
}

func nanf() float64 { var z float64; return z / z }

// TestCompileUnsupported: what the sidecar does not do is listed, not
// dropped silently.
func TestCompileUnsupported(t *testing.T) {
	c := load(t, "full")
	d := c.Nodes[c.StartNode].Routes[0].Definition.Destination
	d.IdleTimeout = time.Second
	d.RetryOn = []string{"reset"}
	lb := c.Nodes["resolver:v1.web.default.default.dc1"].LoadBalancer
	lb.RingHashConfig = &api.RingHashConfig{MinimumRingSize: 1024}
	got, err := Compile(c)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"hash_policies beyond the first: HAProxy hashes one value",
		"ring_hash_config: HAProxy sizes its consistent hash ring from the server weights",
		"route idle_timeout: HAProxy 2.6 has no per-request idle timeout",
		"route retry_on: Envoy's retry conditions; use retry_on_connect_failure and retry_on_status_codes",
	}
	if d := cmp.Diff(want, got.Unsupported); d != "" {
		t.Fatalf("Unsupported (-want +got):\n%s", d)
	}
}

func TestBalance(t *testing.T) {
	tests := []struct {
		lb   *api.LoadBalancer
		want Balance
	}{
		{nil, Balance{}},
		{&api.LoadBalancer{Policy: "round_robin"}, Balance{}},
		{&api.LoadBalancer{Policy: "least_request"}, Balance{Policy: LeastRequest}},
		{&api.LoadBalancer{Policy: "random"}, Balance{Policy: Random}},
		{&api.LoadBalancer{Policy: "maglev"}, Balance{Policy: Random}},
		{&api.LoadBalancer{Policy: "maglev", HashPolicies: []api.HashPolicy{{SourceIP: true}}}, Balance{Policy: Hash, HashOn: HashSourceIP}},
		{&api.LoadBalancer{Policy: "ring_hash", HashPolicies: []api.HashPolicy{{Field: "cookie", FieldValue: "sid"}}}, Balance{Policy: Hash, HashOn: HashCookie, HashName: "sid"}},
		{&api.LoadBalancer{Policy: "ring_hash", HashPolicies: []api.HashPolicy{{Field: "query_parameter", FieldValue: "user"}}}, Balance{Policy: Hash, HashOn: HashQuery, HashName: "user"}},
	}
	for _, tt := range tests {
		var k compiler
		got, err := k.balance(tt.lb)
		if err != nil || got != tt.want {
			t.Errorf("balance(%+v) = %+v, %v; want %+v", tt.lb, got, err, tt.want)
		}
	}
}

// TestSplitRounding: float32 weights that sum to 100 in Consul's eyes
// become basis points summing to TotalWeight exactly.
func TestSplitRounding(t *testing.T) {
	c := load(t, "split")
	n := c.Nodes[c.StartNode]
	n.Splits[0].Weight, n.Splits[1].Weight = 33.33, 66.67
	got, err := Compile(c)
	if err != nil {
		t.Fatal(err)
	}
	s := got.Routes[0].Splits
	if s[0].Weight != 3333 || s[1].Weight != 6667 {
		t.Fatalf("splits %+v, want 3333 and 6667", s)
	}
	_ = input.ErrInvalid
}
