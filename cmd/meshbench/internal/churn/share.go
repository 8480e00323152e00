package churn

import (
	"fmt"
	"math"
	"slices"

	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
	"github.com/haproxy-connect/haproxy-connect/scrape"
)

// histogram is a snapshot of haproxy-connect's
// haproxy_connect_endpoint_propagation_seconds histogram: each bucket's
// upper bound (seconds, +Inf last) and cumulative count.
type histogram struct {
	le  []float64
	cum []float64
}

const propagationMetric = "haproxy_connect_endpoint_propagation_seconds"

// scrapeShare reads the histogram from a sidecar's /metrics.
func scrapeShare(statsAddr string) (histogram, error) {
	f, err := bench.SidecarMetrics(statsAddr)
	if err != nil {
		return histogram{}, err
	}
	return shareOf(f)
}

// shareOf takes the histogram's buckets from a sidecar's metrics.
func shareOf(f scrape.Families) (histogram, error) {
	bs, err := f.Histogram(propagationMetric)
	if err != nil {
		return histogram{}, fmt.Errorf("propagation histogram: %w", err)
	}
	var h histogram
	for _, b := range bs {
		h.le, h.cum = append(h.le, b.UpperBound), append(h.cum, b.Count)
	}
	return h, nil
}

// sub returns the counts added since before (same buckets).
func (h histogram) sub(before histogram) histogram {
	d := histogram{le: h.le, cum: slices.Clone(h.cum)}
	for i := range d.cum {
		if i < len(before.cum) {
			d.cum[i] -= before.cum[i]
		}
	}
	return d
}

// bound returns the upper bound of the bucket holding quantile q; NaN when
// the histogram is empty.
func (h histogram) bound(q float64) float64 {
	if len(h.cum) == 0 || h.cum[len(h.cum)-1] <= 0 {
		return math.NaN()
	}
	want := q * h.cum[len(h.cum)-1]
	for i, n := range h.cum {
		if n >= want {
			return h.le[i]
		}
	}
	return h.le[len(h.le)-1]
}
