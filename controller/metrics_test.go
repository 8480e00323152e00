package controller

import (
	"strings"
	"testing"
	"time"
)

func TestPropagationHistogram(t *testing.T) {
	m := newMetrics(nil)
	for _, d := range []time.Duration{300 * time.Microsecond, time.Millisecond, 3 * time.Millisecond, 3 * time.Second} {
		m.propagation.observe(d)
	}
	var b strings.Builder
	if _, err := m.WriteTo(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"# TYPE haproxy_connect_endpoint_propagation_seconds histogram\n",
		`haproxy_connect_endpoint_propagation_seconds_bucket{le="0.0005"} 1` + "\n",
		`haproxy_connect_endpoint_propagation_seconds_bucket{le="0.001"} 2` + "\n", // a bound is inclusive
		`haproxy_connect_endpoint_propagation_seconds_bucket{le="0.002"} 2` + "\n",
		`haproxy_connect_endpoint_propagation_seconds_bucket{le="0.003"} 3` + "\n",
		`haproxy_connect_endpoint_propagation_seconds_bucket{le="2.5"} 3` + "\n",
		`haproxy_connect_endpoint_propagation_seconds_bucket{le="5"} 4` + "\n",
		`haproxy_connect_endpoint_propagation_seconds_bucket{le="+Inf"} 4` + "\n",
		"haproxy_connect_endpoint_propagation_seconds_sum 3.004",
		"haproxy_connect_endpoint_propagation_seconds_count 4\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q in:\n%s", want, out)
		}
	}
}
