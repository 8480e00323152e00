package spoa

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/scrape"
)

// TestCollector: the agent's metrics pass the registry's checks and
// Prometheus's lint, and every fixed label value is a series from the
// start.
func TestCollector(t *testing.T) {
	a := New("web", nil, zap.NewNop())
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(a.Collector())
	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("%s: %s", p.Metric, p.Text)
	}
	f, err := scrape.Gather(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range [][]string{
		{"haproxy_connect_authz_decisions_total", "result", "allow"},
		{"haproxy_connect_authz_decisions_total", "result", "deny"},
		{"haproxy_connect_authz_decisions_total", "result", "undecided"},
		{"haproxy_connect_authz_l7_requests_total", "result", "deny"},
		{"haproxy_connect_authz_refused_total", "reason", "chain"},
		{"haproxy_connect_authz_refused_total", "reason", "uri_sans"},
		{"haproxy_connect_authz_remembered_certs"},
	} {
		if v, err := f.Value(s[0], s[1:]...); err != nil || v != 0 {
			t.Errorf("%q = %v %v, want 0", s, v, err)
		}
	}
}
