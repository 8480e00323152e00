package bench

import (
	"context"
	"fmt"
	"math"
	"net/http"
	"slices"
	"time"

	"github.com/haproxy-connect/haproxy-connect/scrape"
)

// SidecarDecisions sums haproxy_connect_authz_decisions_total (allow and
// deny) from a sidecar's /metrics at statsAddr.
func SidecarDecisions(statsAddr string) (int64, error) {
	f, err := SidecarMetrics(statsAddr)
	if err != nil {
		return 0, err
	}
	return Decisions(f)
}

// SidecarMetrics reads a sidecar's /metrics at statsAddr.
func SidecarMetrics(statsAddr string) (scrape.Families, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return scrape.Get(ctx, http.DefaultClient, "http://"+statsAddr+"/metrics")
}

// Decisions sums the allow and deny samples of
// haproxy_connect_authz_decisions_total (not "undecided": no verdict).
func Decisions(f scrape.Families) (int64, error) {
	var sum float64
	for _, result := range []string{"allow", "deny"} {
		v, err := f.Value("haproxy_connect_authz_decisions_total", "result", result)
		if err != nil {
			return 0, err
		}
		sum += v
	}
	return int64(sum), nil
}

// Histogram is a snapshot of one unlabelled histogram of the sidecar's:
// each bucket's upper bound (seconds, +Inf last) and cumulative count.
type Histogram struct {
	le  []float64
	cum []float64
}

// HistogramOf takes histogram name's buckets from f.
func HistogramOf(f scrape.Families, name string) (Histogram, error) {
	bs, err := f.Histogram(name)
	if err != nil {
		return Histogram{}, fmt.Errorf("%s: %w", name, err)
	}
	var h Histogram
	for _, b := range bs {
		h.le, h.cum = append(h.le, b.UpperBound), append(h.cum, b.Count)
	}
	return h, nil
}

// Sub returns the counts added since before (same buckets).
func (h Histogram) Sub(before Histogram) Histogram {
	d := Histogram{le: h.le, cum: slices.Clone(h.cum)}
	for i := range d.cum {
		if i < len(before.cum) {
			d.cum[i] -= before.cum[i]
		}
	}
	return d
}

// Count is the number of samples.
func (h Histogram) Count() float64 {
	if len(h.cum) == 0 {
		return 0
	}
	return h.cum[len(h.cum)-1]
}

// Bound returns the upper bound of the bucket holding quantile q; NaN when
// the histogram is empty.
func (h Histogram) Bound(q float64) float64 {
	if h.Count() <= 0 {
		return math.NaN()
	}
	want := q * h.Count()
	for i, n := range h.cum {
		if n >= want {
			return h.le[i]
		}
	}
	return h.le[len(h.le)-1]
}
