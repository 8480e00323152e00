package churn

import (
	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
	"github.com/haproxy-connect/haproxy-connect/scrape"
)

// shares are the histograms of the sidecar's own share of propagation:
// from an answer arriving to HAProxy confirming it, and, within that, the
// identity proofs of new endpoints.
type shares struct {
	prop, proof bench.Histogram
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
	prop, err := bench.HistogramOf(f, propagationMetric)
	if err != nil {
		return shares{}, err
	}
	proof, err := bench.HistogramOf(f, proofMetric)
	if err != nil {
		return shares{}, err
	}
	return shares{prop: prop, proof: proof}, nil
}

// sub returns the counts added to both histograms since before.
func (s shares) sub(before shares) shares {
	return shares{prop: s.prop.Sub(before.prop), proof: s.proof.Sub(before.proof)}
}
