package controller

import (
	"math"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/haproxy-connect/haproxy-connect/scrape"
	"github.com/haproxy-connect/haproxy-connect/scrape/scrapetest"
	"github.com/haproxy-connect/haproxy-connect/slots"
)

// gather registers m on a registry of its own and collects it: the
// registry checks the declarations (help text, consistent labels, no
// name twice).
func gather(t *testing.T, m *Metrics) scrape.Families {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(m); err != nil {
		t.Fatal(err)
	}
	f, err := scrape.Gather(reg)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// value reads one sample of m; a missing one fails the test.
func value(t *testing.T, m *Metrics, name string, labels ...string) float64 {
	t.Helper()
	v, err := gather(t, m).Value(name, labels...)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// reloads is the number of reloads m counted, over every reason.
func reloads(t *testing.T, m *Metrics) uint64 {
	t.Helper()
	f := gather(t, m)
	if f["haproxy_connect_reloads_total"] == nil {
		return 0 // no reason seen yet
	}
	n, err := f.Sum("haproxy_connect_reloads_total")
	if err != nil {
		t.Fatal(err)
	}
	return uint64(n)
}

func TestPropagationHistogram(t *testing.T) {
	m := newMetrics(nil)
	for _, d := range []time.Duration{300 * time.Microsecond, time.Millisecond, 3 * time.Millisecond, 3 * time.Second} {
		m.propagation.Observe(d.Seconds())
	}
	h, err := gather(t, m).Histogram("haproxy_connect_endpoint_propagation_seconds")
	if err != nil {
		t.Fatal(err)
	}
	got := map[float64]float64{}
	for _, b := range h {
		got[b.UpperBound] = b.Count
	}
	for le, want := range map[float64]float64{0.0005: 1, 0.001: 2 /* a bound is inclusive */, 0.002: 2, 0.003: 3, 2.5: 3, 5: 4, math.Inf(1): 4} {
		if got[le] != want {
			t.Errorf("bucket le=%g: %g, want %g", le, got[le], want)
		}
	}
	if len(h) != len(propagationBuckets)+1 {
		t.Errorf("%d buckets, want %d and +Inf", len(h), len(propagationBuckets))
	}
	if n := value(t, m, "haproxy_connect_endpoint_propagation_seconds_count"); n != 4 {
		t.Errorf("count %g, want 4", n)
	}
	if s := value(t, m, "haproxy_connect_endpoint_propagation_seconds_sum"); math.Abs(s-3.0043) > 1e-9 {
		t.Errorf("sum %g, want 3.0043", s)
	}
}

// TestMismatchCounter: a mismatch counts under its upstream alone, however
// many instances, addresses and identities show up (they come from Consul
// and from certificates: the log line names them, a label would not be
// bounded).
func TestMismatchCounter(t *testing.T) {
	m := newMetrics(nil)
	m.mismatch("up_web")
	m.mismatch("up_web")
	for range 300 {
		m.mismatch("up_db")
	}
	f := gather(t, m)
	if n := len(f["haproxy_connect_upstream_identity_mismatches_total"].GetMetric()); n != 2 {
		t.Errorf("%d mismatch series, want one per upstream (2)", n)
	}
	for up, want := range map[string]float64{"up_web": 2, "up_db": 300} {
		if v, err := f.Value("haproxy_connect_upstream_identity_mismatches_total", "upstream", up); err != nil || v != want {
			t.Errorf("mismatches of %s = %v %v, want %g", up, v, err, want)
		}
	}
	// The results of verifications exist at 0 before the first one.
	if v, err := f.Value("haproxy_connect_upstream_verifications_total", "result", "mismatch"); err != nil || v != 0 {
		t.Errorf("verifications{result=mismatch} = %v %v, want 0", v, err)
	}
}

// TestMetricsLint: every metric has help text, a unit or _total in its
// name where it should, and the registry accepts the declarations (a
// pedantic registry checks Describe against Collect).
func TestMetricsLint(t *testing.T) {
	m := newMetrics(nil)
	m.setEndpoints(map[string]slots.Table{"up_web": slots.New("up_web", "s", 4)})
	m.reloaded(reloadRegistration)
	m.invalidInstance("up_web", "address")
	m.mismatch("up_web")
	f := scrapetest.Linted(t, m)
	got := map[string]float64{}
	for _, name := range []string{"haproxy_connect_upstream_endpoints", "haproxy_connect_upstream_slots", "haproxy_connect_upstream_free_slots"} {
		var err error
		got[name], err = f.Value(name, "upstream", "up_web")
		if err != nil {
			t.Error(err)
		}
	}
	want := map[string]float64{"haproxy_connect_upstream_endpoints": 0, "haproxy_connect_upstream_slots": 4, "haproxy_connect_upstream_free_slots": 4}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("upstream gauges (-want +got):\n%s", diff)
	}
	// A reload planned without a reason name still counts.
	m.reloaded("")
	if v := value(t, m, "haproxy_connect_reloads_total", "reason", reloadOther); v != 1 {
		t.Errorf("reloads{reason=other} = %g, want 1", v)
	}
}
