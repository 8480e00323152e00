package controller

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/haproxy-connect/haproxy-connect/slots"
)

func endpointsN(n int) []slots.Endpoint {
	eps := make([]slots.Endpoint, n)
	for i := range eps {
		eps[i] = slots.Endpoint{Addr: fmt.Sprintf("10.0.%d.%d", i/250, i%250+1), Port: 8080, Weight: 1}
	}
	return eps
}

func endpointKeys(eps []slots.Endpoint) []string {
	out := make([]string, len(eps))
	for i, e := range eps {
		out[i] = e.Key()
	}
	return out
}

// TestCapEndpoints: the subset kept past the limit is stable, in order,
// moves little when one endpoint comes, and differs between sidecars.
func TestCapEndpoints(t *testing.T) {
	all := endpointsN(1000)
	tests := []struct {
		name string
		eps  []slots.Endpoint
		max  int
		want int
	}{
		{"under the limit", all[:10], 10, 10},
		{"over the limit", all, 100, 100},
		{"no limit", all, 0, 1000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := capEndpoints(tt.eps, tt.max, "web-sidecar-proxy")
			if len(got) != tt.want {
				t.Fatalf("%d endpoints, want %d", len(got), tt.want)
			}
			if !slices.IsSortedFunc(got, slots.Endpoint.Compare) {
				t.Errorf("not in the input's (sorted) order")
			}
		})
	}
	a := endpointKeys(capEndpoints(all, 100, "p1"))
	if b := endpointKeys(capEndpoints(slices.Clone(all), 100, "p1")); !slices.Equal(a, b) {
		t.Errorf("two runs on the same list differ")
	}
	// One more endpoint: at most one of the kept changes.
	more := append(slices.Clone(all), slots.Endpoint{Addr: "10.9.9.9", Port: 8080, Weight: 1})
	slices.SortFunc(more, slots.Endpoint.Compare)
	b := endpointKeys(capEndpoints(more, 100, "p1"))
	moved := 0
	for _, k := range b {
		if !slices.Contains(a, k) {
			moved++
		}
	}
	if moved > 1 {
		t.Errorf("one new endpoint replaced %d kept ones, want at most 1", moved)
	}
	// Another sidecar keeps another subset.
	c := endpointKeys(capEndpoints(all, 100, "p2"))
	same := 0
	for _, k := range c {
		if slices.Contains(a, k) {
			same++
		}
	}
	if same > 50 {
		t.Errorf("two sidecars share %d of 100 endpoints, want them spread (about 10 expected)", same)
	}
}

// TestEndpointLimitLogged: the instance filter cuts to MaxEndpoints with one log
// line and a counter.
func TestEndpointLimitLogged(t *testing.T) {
	core, logs := observer.New(zapcore.InfoLevel)
	m := newMetrics(nil)
	f := newInstanceFilter("up_api", zap.New(core), m)
	f.max, f.proxyID = 3, "web-sidecar-proxy"
	var entries []healthEntry
	for _, e := range endpointsN(5) {
		entries = append(entries, healthEntry{ID: e.Addr, Address: e.Addr, Port: e.Port})
	}
	got := f.endpoints(entries, nil)
	if len(got) != 3 {
		t.Fatalf("%d endpoints, want 3", len(got))
	}
	if n := testutil.ToFloat64(m.endpointLimitHits); n != 1 {
		t.Errorf("limit hits %g, want 1", n)
	}
	lines := logs.FilterMessageSnippet("more endpoints than the limit").All()
	if len(lines) != 1 || lines[0].ContextMap()["upstream"] != "up_api" || lines[0].ContextMap()["endpoints"] != int64(5) || lines[0].ContextMap()["kept"] != int64(3) {
		t.Errorf("log lines %v, want one naming up_api, 5 endpoints, 3 kept", lines)
	}
	if got := f.endpoints(entries[:3], nil); len(got) != 3 || testutil.ToFloat64(m.endpointLimitHits) != 1 {
		t.Errorf("at the limit: %d endpoints, %g hits; want 3 and no new hit", len(got), testutil.ToFloat64(m.endpointLimitHits))
	}
}

// TestAnswerLimit: an answer longer than the limit fails, announced or
// not, and is counted and logged; one within it reads whole.
func TestAnswerLimit(t *testing.T) {
	const max = 1000
	body := func(n int) string { return "[" + strings.Repeat(" ", n-2) + "]" }
	tests := []struct {
		name    string
		size    int
		chunked bool // no Content-Length
		wantErr bool
	}{
		{"within", max, false, false},
		{"within, chunked", max, true, false},
		{"announced too large", max + 1, false, true},
		{"chunked too large", max + 1, true, true},
		{"chunked far too large", 100 * max, true, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("X-Consul-Index", "7")
				if tt.chunked {
					w.(http.Flusher).Flush()
				} else {
					w.Header().Set("Content-Length", fmt.Sprint(tt.size))
				}
				io.WriteString(w, body(tt.size))
			}))
			defer srv.Close()
			core, logs := observer.New(zapcore.InfoLevel)
			lim := NewAnswerLimit(max, zap.New(core))
			cfg := &api.Config{Address: strings.TrimPrefix(srv.URL, "http://")}
			if _, err := api.NewClient(cfg); err != nil {
				t.Fatal(err)
			}
			lim.Limit(cfg.HttpClient)
			lim.Limit(cfg.HttpClient) // idempotent

			// The health reader, and api's own calls.
			h := newHealthReader(cfg)
			_, _, _, _, err := h.connect(context.Background(), "api", "", 0, time.Second)
			client, _ := api.NewClient(cfg)
			_, _, apiErr := client.Agent().ConnectCARoots(nil)
			if tt.wantErr {
				if !errors.Is(err, ErrAnswerTooLarge) || !errors.Is(apiErr, ErrAnswerTooLarge) {
					t.Fatalf("health: %v; api: %v; want %v", err, apiErr, ErrAnswerTooLarge)
				}
				if lim.Hits() != 2 || logs.FilterMessageSnippet("consul answer too large").Len() != 2 {
					t.Errorf("%d hits, %d log lines; want 2 and 2", lim.Hits(), logs.Len())
				}
				return
			}
			if err != nil {
				t.Fatalf("health: %v", err)
			}
			if lim.Hits() != 0 {
				t.Errorf("%d hits within the limit", lim.Hits())
			}
		})
	}
}
