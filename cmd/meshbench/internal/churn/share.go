package churn

import (
	"fmt"
	"math"
	"slices"

	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
	"github.com/haproxy-connect/haproxy-connect/scrape"
)

// histogram is a snapshot of one of haproxy-connect's histograms: each
// bucket's upper bound (seconds, +Inf last) and cumulative count.
type histogram struct {
	le  []float64
	cum []float64
}

// shares are the histograms of the sidecar's own share of propagation:
// from an answer arriving to HAProxy confirming it, and, within that, the
// identity proofs of new endpoints.
type shares struct {
	prop, proof histogram
}

const (
	propagationMetric = "haproxy_connect_endpoint_propagation_seconds"
	proofMetric       = "haproxy_connect_upstream_verification_seconds"
)

// scrapeShare reads the histograms from a sidecar's /metrics.
func scrapeShare(statsAddr string) (shares, error) {
	f, err := bench.SidecarMetrics(statsAddr)
	if err != nil {
		return shares{}, err
	}
	return shareOf(f)
}

// shareOf takes the histograms' buckets from a sidecar's metrics.
func shareOf(f scrape.Families) (shares, error) {
	var s shares
	for _, h := range []struct {
		name string
		to   *histogram
	}{{propagationMetric, &s.prop}, {proofMetric, &s.proof}} {
		bs, err := f.Histogram(h.name)
		if err != nil {
			return shares{}, fmt.Errorf("%s: %w", h.name, err)
		}
		for _, b := range bs {
			h.to.le, h.to.cum = append(h.to.le, b.UpperBound), append(h.to.cum, b.Count)
		}
	}
	return s, nil
}

// sub returns the counts added to both histograms since before.
func (s shares) sub(before shares) shares {
	return shares{prop: s.prop.sub(before.prop), proof: s.proof.sub(before.proof)}
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

// count is the number of samples.
func (h histogram) count() float64 {
	if len(h.cum) == 0 {
		return 0
	}
	return h.cum[len(h.cum)-1]
}

// bound returns the upper bound of the bucket holding quantile q; NaN when
// the histogram is empty.
func (h histogram) bound(q float64) float64 {
	if h.count() <= 0 {
		return math.NaN()
	}
	want := q * h.count()
	for i, n := range h.cum {
		if n >= want {
			return h.le[i]
		}
	}
	return h.le[len(h.le)-1]
}
