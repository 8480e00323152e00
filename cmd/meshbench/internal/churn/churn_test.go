package churn

import (
	"math"
	"strings"
	"testing"

	"github.com/haproxy-connect/haproxy-connect/scrape"
)

func TestChurnRateOps(t *testing.T) {
	var eps []endpoint
	for i := range 10 {
		eps = append(eps, endpoint{id: string(rune('a' + i)), key: string(rune('a' + i))})
	}
	keys := func(eps []endpoint) string {
		var s string
		for _, e := range eps {
			s += e.key
		}
		return s
	}
	start, ops, end := rateOps(eps, 2, 10)
	if got := keys(start); got != "ab" {
		t.Errorf("start = %s, want ab", got)
	}
	// A ring of 5 (a-e): +c -a +d -b +e -c +a -d +b -e.
	var got string
	for _, op := range ops {
		if op.add {
			got += "+" + op.e.key
		} else {
			got += "-" + op.e.key
		}
	}
	if want := "+c-a+d-b+e-c+a-d+b-e"; got != want {
		t.Errorf("ops = %s, want %s", got, want)
	}
	if got := keys(end); got != "ab" {
		t.Errorf("end = %s, want ab", got)
	}
}

// parseShare reads the share histograms from a text exposition.
func parseShare(text string) (shares, error) {
	f, err := scrape.Parse(strings.NewReader(text))
	if err != nil {
		return shares{}, err
	}
	return shareOf(f)
}

func TestParseShare(t *testing.T) {
	const before = `# TYPE haproxy_connect_endpoint_propagation_seconds histogram
haproxy_connect_endpoint_propagation_seconds_bucket{le="0.0005"} 10
haproxy_connect_endpoint_propagation_seconds_bucket{le="0.001"} 20
haproxy_connect_endpoint_propagation_seconds_bucket{le="0.002"} 20
haproxy_connect_endpoint_propagation_seconds_bucket{le="+Inf"} 20
haproxy_connect_endpoint_propagation_seconds_sum 0.01
haproxy_connect_endpoint_propagation_seconds_count 20
haproxy_connect_authz_decisions_total{verdict="allow"} 3
# TYPE haproxy_connect_upstream_verification_seconds histogram
haproxy_connect_upstream_verification_seconds_bucket{le="0.001"} 2
haproxy_connect_upstream_verification_seconds_bucket{le="0.01"} 2
haproxy_connect_upstream_verification_seconds_bucket{le="+Inf"} 2
haproxy_connect_upstream_verification_seconds_sum 0.001
haproxy_connect_upstream_verification_seconds_count 2
`
	// 100 more: 50 under 0.5 ms, 40 more under 1 ms, 9 under 2 ms, 1 above.
	const after = `# TYPE haproxy_connect_endpoint_propagation_seconds histogram
haproxy_connect_endpoint_propagation_seconds_bucket{le="0.0005"} 60
haproxy_connect_endpoint_propagation_seconds_bucket{le="0.001"} 110
haproxy_connect_endpoint_propagation_seconds_bucket{le="0.002"} 119
haproxy_connect_endpoint_propagation_seconds_bucket{le="+Inf"} 120
haproxy_connect_endpoint_propagation_seconds_sum 1.5
haproxy_connect_endpoint_propagation_seconds_count 120
# TYPE haproxy_connect_upstream_verification_seconds histogram
haproxy_connect_upstream_verification_seconds_bucket{le="0.001"} 3
haproxy_connect_upstream_verification_seconds_bucket{le="0.01"} 12
haproxy_connect_upstream_verification_seconds_bucket{le="+Inf"} 12
haproxy_connect_upstream_verification_seconds_sum 0.05
haproxy_connect_upstream_verification_seconds_count 12
`
	h0, err := parseShare(before)
	if err != nil {
		t.Fatal(err)
	}
	h1, err := parseShare(after)
	if err != nil {
		t.Fatal(err)
	}
	d := h1.sub(h0)
	for _, tt := range []struct {
		q, want float64
	}{{0.5, 0.0005}, {0.9, 0.001}, {0.99, 0.002}, {1, math.Inf(1)}} {
		if got := d.prop.Bound(tt.q); got != tt.want {
			t.Errorf("bound(%g) = %g, want %g", tt.q, got, tt.want)
		}
	}
	// 10 more proofs: 1 under 1 ms, 9 under 10 ms.
	if got50, got99 := d.proof.Bound(0.5), d.proof.Bound(0.99); got50 != 0.01 || got99 != 0.01 {
		t.Errorf("proofs: p50 %g, p99 %g, want 0.01 and 0.01", got50, got99)
	}
	if got := h0.sub(h0).prop.Bound(0.99); !math.IsNaN(got) {
		t.Errorf("empty delta: bound = %g, want NaN", got)
	}
	const typ = "# TYPE haproxy_connect_endpoint_propagation_seconds histogram\n"
	for _, bad := range []string{"", "nothing here\n", typ + `haproxy_connect_endpoint_propagation_seconds_bucket{le="x"} 1`,
		typ + `haproxy_connect_endpoint_propagation_seconds_bucket{le="0.1"} many`,
		"haproxy_connect_endpoint_propagation_seconds 1\n",
		strings.Split(before, "# TYPE haproxy_connect_upstream_verification_seconds")[0]} {
		if _, err := parseShare(bad); err == nil {
			t.Errorf("parseShare(%q): no error", bad)
		}
	}
}
