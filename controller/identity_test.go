package controller

import (
	"context"
	"fmt"
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
	ca := testenv.NewCA(b, "root")
	cert, key := ca.Leaf(b, "spiffe://td.consul/ns/default/dc/dc1/svc/web")
	leaf, err := certs.NewBundle(cert, key, time.Now())
	if err != nil {
		b.Fatal(err)
	}
	roots, err := certs.NewRoots([]string{ca.CertPEM})
	if err != nil {
		b.Fatal(err)
	}
	c, err := New(Config{Consul: api.DefaultConfig(), ProxyID: "web-sidecar-proxy", StateDir: b.TempDir(), SPOAAddr: "127.0.0.1:1", Log: zap.NewNop()})
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
		c.ident.checks[want+" "+e.Key()] = &idCheck{want: want, addr: e.Key(), users: map[string]struct{}{}, known: true, good: true, due: time.Now().Add(time.Hour)}
	}
	ctx := context.Background()
	b.ResetTimer()
	for b.Loop() {
		if ok, pending := c.verifiedEndpoints(ctx, "up_api", eps); len(ok) != len(eps) || pending {
			b.Fatalf("%d of %d proven, pending %v", len(ok), len(eps), pending)
		}
	}
}
