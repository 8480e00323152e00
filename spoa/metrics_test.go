package spoa

import (
	"testing"

	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/scrape/scrapetest"
)

// TestCollector: the agent's metrics pass the registry's checks and
// Prometheus's lint, and every fixed label value is a series from the
// start.
func TestCollector(t *testing.T) {
	a := New("web", nil, zap.NewNop())
	f := scrapetest.Linted(t, a.Collector())
	for _, s := range [][]string{
		{"haproxy_connect_authz_decisions_total", "result", "allow"},
		{"haproxy_connect_authz_decisions_total", "result", "deny"},
		{"haproxy_connect_authz_decisions_total", "result", "undecided"},
		{"haproxy_connect_authz_l7_requests_total", "result", "deny"},
		{"haproxy_connect_authz_refused_total", "reason", "chain"},
		{"haproxy_connect_authz_refused_total", "reason", "uri_sans"},
		{"haproxy_connect_authz_remembered_certs"},
		{"haproxy_connect_authz_decision_seconds_count"},
	} {
		if v, err := f.Value(s[0], s[1:]...); err != nil || v != 0 {
			t.Errorf("%q = %v %v, want 0", s, v, err)
		}
	}
}
