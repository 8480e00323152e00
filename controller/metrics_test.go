package controller

import (
	"fmt"
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

// TestMismatchCounter: the labelled counter names the instance and the
// identity it showed, with label values reduced to a safe alphabet (they
// come from Consul and from certificates), and a bounded number of series:
// past it, new ones count as instance "other".
func TestMismatchCounter(t *testing.T) {
	m := newMetrics(nil)
	m.mismatch("up_web", "impostor-1", "127.0.0.1:4000", "spiffe://td.consul/ns/default/dc/dc1/svc/other")
	m.mismatch("up_web", "impostor-1", "127.0.0.1:4000", "spiffe://td.consul/ns/default/dc/dc1/svc/other")
	m.mismatch("up_web", "evil\"} 1\nx{a=\"", "[::1]:4001", "")
	for i := range maxMismatchSeries {
		m.mismatch("up_db", fmt.Sprintf("i%d", i), "10.0.0.1:1", "spiffe://td.consul/ns/default/dc/dc1/svc/x")
	}
	var b strings.Builder
	if _, err := m.WriteTo(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		`haproxy_connect_upstream_identity_mismatches_total{upstream="up_web",instance="impostor-1",address="127.0.0.1:4000",identity="spiffe://td.consul/ns/default/dc/dc1/svc/other"} 2` + "\n",
		`haproxy_connect_upstream_identity_mismatches_total{upstream="up_web",instance="evil___1_x_a__",address="[::1]:4001",identity=""} 1` + "\n",
		`haproxy_connect_upstream_identity_mismatches_total{upstream="up_db",instance="other",address="",identity=""} 2` + "\n",
		`haproxy_connect_upstream_verifications_total{result="mismatch"} 0` + "\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q", want)
		}
	}
}
