package controller

import (
	"math"
	"net/netip"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap/zaptest"

	"github.com/haproxy-connect/haproxy-connect/slots"
)

// TestPropagationPerEndpoint: each endpoint that joins or leaves an
// upstream is one sample, from the answer that changed it to the batch
// that put it in effect; a batch that places some of a burst's endpoints
// samples those alone; a change never in effect has no sample and is
// forgotten once the upstream has nothing left to apply.
func TestPropagationPerEndpoint(t *testing.T) {
	c, err := New(Config{Consul: api.DefaultConfig(), ProxyID: "web-sidecar-proxy", StateDir: t.TempDir(), SPOASocket: "/state/spoa.sock", Log: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC)
	clock := t0
	c.now = func() time.Time { return clock }
	key := func(n int) netip.AddrPort { return netip.MustParseAddrPort(ep(n, 21000).Key()) }
	list := func(ns ...int) map[netip.AddrPort]instance {
		m := map[netip.AddrPort]instance{}
		for _, n := range ns {
			m[key(n)] = instance{}
		}
		return m
	}
	table := func(ns ...int) slots.Table {
		t := slots.New("up_api", "s", 4)
		for i, n := range ns {
			e := ep(n, 21000)
			t.Slots[i].Used, t.Slots[i].Addr, t.Slots[i].Port = true, e.Addr, e.Port
		}
		return t
	}
	ms := func(n int) time.Time { return t0.Add(time.Duration(n) * time.Millisecond) }
	type answer struct {
		at       time.Time
		old, now map[netip.AddrPort]instance
	}
	steps := []struct {
		name    string
		answers []answer
		applyAt time.Time
		applied slots.Table
		settled bool
		samples []float64 // new samples, in seconds, any order
		left    int       // changes still waiting
	}{
		{"two join; the batch places one, the other's proof runs", []answer{{ms(0), list(1), list(1, 2, 3)}},
			ms(30), table(1, 2), false, []float64{0.030}, 1},
		{"its proof ends: placed, measured from its answer", nil,
			ms(45), table(1, 2, 3), false, []float64{0.045}, 0},
		{"one leaves, held while another's proof runs", []answer{{ms(100), list(1, 2, 3), list(1, 2, 4)}},
			ms(110), table(1, 2, 3), false, nil, 2},
		{"the newcomer takes the leaver's slot: both in effect", nil,
			ms(120), table(1, 2, 4), false, []float64{0.020, 0.020}, 0},
		{"one joins, then leaves before its proof: one removal, in effect already", []answer{{ms(200), list(1, 2, 4), list(1, 2, 4, 5)}, {ms(210), list(1, 2, 4, 5), list(1, 2, 4)}},
			ms(215), table(1, 2, 4), false, []float64{0.005}, 0},
		{"one that never proves itself: no sample, forgotten when settled", []answer{{ms(300), list(1, 2, 4), list(1, 2, 4, 6)}},
			ms(400), table(1, 2, 4), true, nil, 0},
	}
	var seen []float64
	for _, s := range steps {
		for _, a := range s.answers {
			c.desired.noteChanges("up_api", a.old, a.now, a.at)
		}
		clock = s.applyAt
		c.changesApplied("up_api", s.applied, s.settled)
		h, err := gather(t, c.metrics).Histogram("haproxy_connect_endpoint_propagation_seconds")
		if err != nil {
			t.Fatal(err)
		}
		count := h[len(h)-1].Count
		want := len(seen) + len(s.samples)
		if int(count) != want {
			t.Errorf("%s: %g samples in all, want %d", s.name, count, want)
		}
		seen = append(seen, s.samples...)
		sum := 0.0
		for _, v := range seen {
			sum += v
		}
		if got := value(t, c.metrics, "haproxy_connect_endpoint_propagation_seconds_sum"); math.Abs(got-sum) > 1e-9 {
			t.Errorf("%s: samples sum to %g s, want %g", s.name, got, sum)
		}
		if got := len(c.desired.changes["up_api"]); got != s.left {
			t.Errorf("%s: %d changes waiting, want %d", s.name, got, s.left)
		}
	}

	// A reload that drops the upstream drops its waiting changes.
	c.desired.noteChanges("up_api", list(1), list(1, 7), ms(500))
	c.tablesApplied(map[string]slots.Table{"up_other": slots.New("up_other", "s", 1)})
	if _, ok := c.desired.changes["up_api"]; ok {
		t.Errorf("changes of an upstream no longer served kept: %v", c.desired.changes["up_api"])
	}
}
