package churn

import (
	"context"
	"math"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/haproxy-connect/haproxy-connect/scrape"
)

func TestMatchChanges(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	add := func(key string, ms int) change { return change{key: key, add: true, ack: at(ms)} }
	del := func(key string, ms int) change { return change{key: key, ack: at(ms)} }
	on := func(ms int) transition { return transition{at(ms), true} }
	off := func(ms int) transition { return transition{at(ms), false} }

	tests := []struct {
		name       string
		changes    []change
		seen       map[string][]transition
		wantMS     []float64 // latencies in ms, sorted
		wantUnseen int
	}{
		{
			name:    "each change seen once",
			changes: []change{add("a", 0), add("b", 10), del("a", 20), del("b", 30)},
			seen:    map[string][]transition{"a": {on(2), off(25)}, "b": {on(13), off(31)}},
			wantMS:  []float64{1, 2, 3, 5},
		},
		{
			name:    "seen before the ack is kept, negative",
			changes: []change{add("a", 10)},
			seen:    map[string][]transition{"a": {on(9)}},
			wantMS:  []float64{-1},
		},
		{
			name:       "never seen",
			changes:    []change{add("a", 0), del("a", 100)},
			seen:       map[string][]transition{},
			wantUnseen: 2,
		},
		{
			// An add and its remove both missed: the next add's transition
			// must not be credited to the first add.
			name:       "missed pair does not steal the next add",
			changes:    []change{add("a", 0), del("a", 100), add("a", 200), del("a", 300)},
			seen:       map[string][]transition{"a": {on(205), off(310)}},
			wantMS:     []float64{5, 10},
			wantUnseen: 2,
		},
		{
			name:    "re-added endpoint matched in order",
			changes: []change{add("a", 0), del("a", 100), add("a", 200), del("a", 300)},
			seen:    map[string][]transition{"a": {on(1), off(101), on(201), off(301)}},
			wantMS:  []float64{1, 1, 1, 1},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			lat, unseen := match(tt.changes, tt.seen)
			var gotMS []float64
			for _, s := range lat {
				gotMS = append(gotMS, float64(time.Duration(s*float64(time.Second)).Round(time.Microsecond))/float64(time.Millisecond))
			}
			slices.Sort(gotMS)
			if !slices.Equal(gotMS, tt.wantMS) {
				t.Errorf("latencies = %v ms, want %v", gotMS, tt.wantMS)
			}
			if unseen != tt.wantUnseen {
				t.Errorf("unseen = %d, want %d", unseen, tt.wantUnseen)
			}
		})
	}
}

func TestTimelineObserve(t *testing.T) {
	tl := newTimeline()
	t0 := time.Unix(1000, 0)
	tl.observe(t0, map[string]bool{"a": true})
	tl.restart()
	tl.observe(t0.Add(time.Millisecond), map[string]bool{"a": true, "b": true})
	tl.observe(t0.Add(2*time.Millisecond), map[string]bool{"b": true})
	got := tl.transitions()
	if len(got["a"]) != 1 || got["a"][0].present || len(got["b"]) != 1 || !got["b"][0].present {
		t.Errorf("transitions = %v", got)
	}
	if err := tl.check(map[string]bool{"b": true}); err != nil {
		t.Error(err)
	}
	if err := tl.check(map[string]bool{"a": true}); err == nil {
		t.Error("check passed on a different set")
	}
}

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

func TestChurnHealth(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Accept-Encoding") != "" {
			t.Errorf("Accept-Encoding %q: the baseline must not ask Consul to compress", r.Header.Get("Accept-Encoding"))
		}
		w.Header().Set("X-Consul-Index", "42")
		_, _ = w.Write([]byte(`[{"Node":{"Address":"10.0.0.1"},"Service":{"Address":"127.1.0.5","Port":2000,"Proxy":{"Upstreams":[]}},"Checks":[]},
			{"Node":{"Address":"10.0.0.2"},"Service":{"Address":"","Port":3000}}]`))
	}))
	defer srv.Close()
	set, idx, err := health(context.Background(), consulHTTP, srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	if idx != 42 {
		t.Errorf("index = %d, want 42", idx)
	}
	want := map[string]bool{"127.1.0.5:2000": true, "10.0.0.2:3000": true}
	if len(set) != len(want) || !set["127.1.0.5:2000"] || !set["10.0.0.2:3000"] {
		t.Errorf("set = %v, want %v", set, want)
	}
}

// parseShare reads the propagation histogram from a text exposition.
func parseShare(text string) (histogram, error) {
	f, err := scrape.Parse(strings.NewReader(text))
	if err != nil {
		return histogram{}, err
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
`
	// 100 more: 50 under 0.5 ms, 40 more under 1 ms, 9 under 2 ms, 1 above.
	const after = `# TYPE haproxy_connect_endpoint_propagation_seconds histogram
haproxy_connect_endpoint_propagation_seconds_bucket{le="0.0005"} 60
haproxy_connect_endpoint_propagation_seconds_bucket{le="0.001"} 110
haproxy_connect_endpoint_propagation_seconds_bucket{le="0.002"} 119
haproxy_connect_endpoint_propagation_seconds_bucket{le="+Inf"} 120
haproxy_connect_endpoint_propagation_seconds_sum 1.5
haproxy_connect_endpoint_propagation_seconds_count 120
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
		if got := d.bound(tt.q); got != tt.want {
			t.Errorf("bound(%g) = %g, want %g", tt.q, got, tt.want)
		}
	}
	if got := h0.sub(h0).bound(0.99); !math.IsNaN(got) {
		t.Errorf("empty delta: bound = %g, want NaN", got)
	}
	const typ = "# TYPE haproxy_connect_endpoint_propagation_seconds histogram\n"
	for _, bad := range []string{"", "nothing here\n", typ + `haproxy_connect_endpoint_propagation_seconds_bucket{le="x"} 1`,
		typ + `haproxy_connect_endpoint_propagation_seconds_bucket{le="0.1"} many`,
		"haproxy_connect_endpoint_propagation_seconds 1\n"} {
		if _, err := parseShare(bad); err == nil {
			t.Errorf("parseShare(%q): no error", bad)
		}
	}
}
