package tcpdeny

import (
	"testing"

	"github.com/haproxy-connect/haproxy-connect/scrape/scrapetest"
)

// TestCollector: the sweeper's metrics pass the registry's checks and
// Prometheus's lint, and count what the sweeper counted.
func TestCollector(t *testing.T) {
	s := New(&fakeRuntime{}, &fakeJudge{}, "public_listener", nil)
	s.closed.Add(2)
	s.unknown.Add(1)
	f := scrapetest.Linted(t, s.Collector())
	for _, c := range []struct {
		sample []string
		want   float64
	}{
		{[]string{"haproxy_connect_authz_tcp_closed_total"}, 2},
		{[]string{"haproxy_connect_authz_tcp_left_open_total", "reason", "unknown_certificate"}, 1},
		{[]string{"haproxy_connect_authz_tcp_left_open_total", "reason", "undecided"}, 0},
		{[]string{"haproxy_connect_authz_tcp_sweeps_total"}, 0},
		{[]string{"haproxy_connect_authz_tcp_sweep_failures_total"}, 0},
	} {
		if v, err := f.Value(c.sample[0], c.sample[1:]...); err != nil || v != c.want {
			t.Errorf("%q = %v %v, want %g", c.sample, v, err, c.want)
		}
	}
}
