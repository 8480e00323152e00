// Package scrapetest checks collectors in unit tests: it registers them in
// a pedantic registry (which checks descriptors against what they
// collect), runs Prometheus's lint on what they expose, and returns the
// families for lookups with package scrape.
package scrapetest

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/haproxy-connect/haproxy-connect/scrape"
)

// Linted registers cs, fails t for a registration or gathering error or a
// lint problem, and returns what they expose.
func Linted(t testing.TB, cs ...prometheus.Collector) scrape.Families {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			t.Fatal(err)
		}
	}
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
	return f
}
