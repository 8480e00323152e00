package controller

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/slots"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// BenchmarkVerifiedEndpoints is what the identity gate adds to every plan
// of an upstream of 1000 endpoints that have all proved their identity.
func BenchmarkVerifiedEndpoints(b *testing.B) {
	leaf, roots := webLeaf(b)
	c, err := New(Config{Consul: api.DefaultConfig(), ProxyID: "web-sidecar-proxy", StateDir: b.TempDir(), SPOASocket: "/state/spoa.sock", Log: zap.NewNop()})
	if err != nil {
		b.Fatal(err)
	}
	c.desired.sidecar, c.desired.leaf, c.desired.roots = sidecar(up("api", 9191)), &leaf, &roots
	var eps []slots.Endpoint
	for i := range 1000 {
		eps = append(eps, slots.Endpoint{Addr: fmt.Sprintf("10.0.%d.%d", i/250, i%250+1), Port: 21000, Weight: 1})
	}
	want := "spiffe://td.consul/ns/default/dc/dc1/svc/api"
	for _, e := range eps {
		c.ident.checks[checkKey{want, netip.MustParseAddrPort(e.Key())}] = &idCheck{want: want, addr: e.Key(), known: true, good: true, due: time.Now().Add(time.Hour)}
	}
	c.ident.listedBy["up_api"] = map[checkKey]struct{}{}
	for _, e := range eps {
		c.ident.listedBy["up_api"][checkKey{want, netip.MustParseAddrPort(e.Key())}] = struct{}{}
	}
	in := c.planInput()
	b.ResetTimer()
	for b.Loop() {
		if ok, pending, v := in.verifiedEndpoints("up_api", eps); len(ok) != len(eps) || pending || v != nil {
			b.Fatalf("%d of %d proven, pending %v, verify %v", len(ok), len(eps), pending, v)
		}
	}
}

// TestExpectedID: the trust domain is the roots', else the leaf's; the
// datacenter, namespace and partition are the upstream's, else the
// sidecar's own; a prepared query's entry names its service and the
// datacenter that answered.
func TestExpectedID(t *testing.T) {
	ca := testenv.NewCA(t, "root")
	cert, key := ca.Leaf(t, "spiffe://leaf.consul/ap/eu/ns/team/dc/dc1/svc/web")
	leaf, err := certs.NewBundle(cert, key, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name        string
		trustDomain string // of the roots
		u           Upstream
		in          instance
		want        string
	}{
		{"the sidecar's own everything", "", Upstream{Destination: "api"}, instance{}, "spiffe://leaf.consul/ap/eu/ns/team/dc/dc1/svc/api"},
		{"the roots' trust domain", "roots.consul", Upstream{Destination: "api"}, instance{}, "spiffe://roots.consul/ap/eu/ns/team/dc/dc1/svc/api"},
		{"the upstream's datacenter, namespace, partition", "roots.consul",
			Upstream{Destination: "api", Datacenter: "dc2", Namespace: "ops", Partition: "default"}, instance{},
			"spiffe://roots.consul/ns/ops/dc/dc2/svc/api"},
		{"a prepared query's entry", "roots.consul", Upstream{Type: "prepared_query", Destination: "api-query"},
			instance{id: "api-1-sidecar-proxy", service: "api", dc: "dc3"}, "spiffe://roots.consul/ap/eu/ns/team/dc/dc3/svc/api"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &Controller{}
			c.desired.leaf, c.desired.roots = &leaf, &certs.Roots{TrustDomain: tt.trustDomain}
			got, err := c.expectedID(tt.u, tt.in)
			if err != nil || got != tt.want {
				t.Errorf("expectedID = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

// TestQueryInstances: a sidecar entry must prove its destination, a
// Connect-native one itself; the node address stands in for an empty
// service address; entries without a usable address are left out.
func TestQueryInstances(t *testing.T) {
	resp := &api.PreparedQueryExecuteResponse{Datacenter: "dc2", Nodes: []api.ServiceEntry{
		{Node: &api.Node{Address: "10.0.0.1"}, Service: &api.AgentService{ID: "api-1-sidecar-proxy", Service: "api-sidecar-proxy",
			Kind: api.ServiceKindConnectProxy, Port: 21000, Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "api"}}},
		{Node: &api.Node{Address: "10.0.0.9"}, Service: &api.AgentService{ID: "native-1", Service: "native", Address: "10.0.0.2", Port: 8443}},
		{Node: &api.Node{Address: "node.example"}, Service: &api.AgentService{ID: "bad", Service: "api", Port: 1}},
		{Node: &api.Node{Address: "10.0.0.3"}},
	}}
	got := queryInstances(resp)
	want := map[netip.AddrPort]instance{
		netip.MustParseAddrPort("10.0.0.1:21000"): {id: "api-1-sidecar-proxy", service: "api", dc: "dc2"},
		netip.MustParseAddrPort("10.0.0.2:8443"):  {id: "native-1", service: "native", dc: "dc2"},
	}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%s: got %+v, want %+v", k, got[k], w)
		}
	}
}
