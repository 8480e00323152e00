package bench

import (
	"context"
	"net/http"
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
