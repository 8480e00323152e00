package slots

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func ep(addr string, port, weight int) Endpoint {
	return Endpoint{Addr: addr, Port: port, Weight: weight}
}

// TestPlanSequence feeds a sequence of desired endpoint sets through Plan,
// carrying the reached table from step to step, and checks each step's exact
// operations.
func TestPlanSequence(t *testing.T) {
	steps := []struct {
		name    string
		desired []Endpoint
		want    []Op
		used    int
		slots   int
	}{
		{"first endpoints fill the lowest slots", []Endpoint{ep("10.0.0.2", 80, 1), ep("10.0.0.1", 80, 3)}, []Op{
			{Kind: OpSetAddr, Server: "s1", Addr: "10.0.0.1", Port: 80},
			{Kind: OpSetWeight, Server: "s1", Weight: 3},
			{Kind: OpReady, Server: "s1"},
			{Kind: OpSetAddr, Server: "s2", Addr: "10.0.0.2", Port: 80},
			{Kind: OpReady, Server: "s2"},
		}, 2, 3},
		{"same set is no work", []Endpoint{ep("10.0.0.1", 80, 3), ep("10.0.0.2", 80, 1)}, nil, 2, 3},
		{"weight change only", []Endpoint{ep("10.0.0.1", 80, 3), ep("10.0.0.2", 80, 7)}, []Op{
			{Kind: OpSetWeight, Server: "s2", Weight: 7},
		}, 2, 3},
		{"replace one: the removed endpoint's slot takes the new one, in service throughout", []Endpoint{ep("10.0.0.2", 80, 7), ep("10.0.0.3", 80, 1)}, []Op{
			{Kind: OpSetAddr, Server: "s1", Addr: "10.0.0.3", Port: 80},
			{Kind: OpSetWeight, Server: "s1", Weight: 1},
		}, 2, 3},
		{"a free slot takes a new endpoint", []Endpoint{ep("10.0.0.2", 80, 7), ep("10.0.0.3", 80, 1), ep("10.0.0.4", 80, 1)}, []Op{
			{Kind: OpSetAddr, Server: "s3", Addr: "10.0.0.4", Port: 80},
			{Kind: OpReady, Server: "s3"},
		}, 3, 3},
		{"overflow grows with add server, numbering on", []Endpoint{ep("10.0.0.2", 80, 7), ep("10.0.0.3", 80, 1), ep("10.0.0.4", 80, 1), ep("10.0.0.5", 80, 2)}, []Op{
			{Kind: OpAdd, Server: "s4", Addr: "10.0.0.5", Port: 80, Weight: 2},
			{Kind: OpReady, Server: "s4"},
		}, 4, 4},
		{"removal parks in maint, keeping the address, and never deletes", []Endpoint{ep("10.0.0.3", 80, 1)}, []Op{
			{Kind: OpMaint, Server: "s2"},
			{Kind: OpMaint, Server: "s3"},
			{Kind: OpMaint, Server: "s4"},
		}, 1, 4},
		{"an endpoint that comes back gets its parked slot with state ready alone", []Endpoint{ep("10.0.0.3", 80, 1), ep("10.0.0.4", 80, 1)}, []Op{
			{Kind: OpReady, Server: "s3"},
		}, 2, 4},
		{"back with another weight: weight and ready", []Endpoint{ep("10.0.0.3", 80, 1), ep("10.0.0.4", 80, 1), ep("10.0.0.5", 80, 9)}, []Op{
			{Kind: OpSetWeight, Server: "s4", Weight: 9},
			{Kind: OpReady, Server: "s4"},
		}, 3, 4},
		{"a slot changing hands goes to an endpoint without a parked slot", []Endpoint{ep("10.0.0.2", 80, 7), ep("10.0.0.3", 80, 1), ep("10.0.0.4", 80, 1), ep("10.0.0.7", 80, 1)}, []Op{
			{Kind: OpSetAddr, Server: "s4", Addr: "10.0.0.7", Port: 80},
			{Kind: OpSetWeight, Server: "s4", Weight: 1},
			{Kind: OpReady, Server: "s2"},
		}, 4, 4},
		{"everything gone", nil, []Op{
			{Kind: OpMaint, Server: "s1"},
			{Kind: OpMaint, Server: "s2"},
			{Kind: OpMaint, Server: "s3"},
			{Kind: OpMaint, Server: "s4"},
		}, 0, 4},
		{"duplicates merge to highest weight, big weights clamp, ipv6", []Endpoint{ep("::1", 8080, 2), ep("::1", 8080, 1000)}, []Op{
			{Kind: OpSetAddr, Server: "s1", Addr: "::1", Port: 8080},
			{Kind: OpSetWeight, Server: "s1", Weight: MaxWeight},
			{Kind: OpReady, Server: "s1"},
		}, 1, 4},
		{"one replaced, two added: a slot changes hands, parked ones fill", []Endpoint{ep("10.0.0.8", 80, 1), ep("10.0.0.9", 80, 1), ep("10.0.0.10", 80, 2)}, []Op{
			{Kind: OpSetAddr, Server: "s1", Addr: "10.0.0.8", Port: 80},
			{Kind: OpSetWeight, Server: "s1", Weight: 1},
			{Kind: OpSetAddr, Server: "s2", Addr: "10.0.0.9", Port: 80},
			{Kind: OpSetWeight, Server: "s2", Weight: 1},
			{Kind: OpReady, Server: "s2"},
			{Kind: OpSetAddr, Server: "s3", Addr: "10.0.0.10", Port: 80},
			{Kind: OpSetWeight, Server: "s3", Weight: 2},
			{Kind: OpReady, Server: "s3"},
		}, 3, 4},
	}
	table := New("up_web", "s", 3)
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			before := table.Clone()
			ops, next, rejected := Plan(table, st.desired)
			if len(rejected) > 0 {
				t.Fatalf("rejected: %v", rejected)
			}
			if diff := cmp.Diff(st.want, ops); diff != "" {
				t.Errorf("ops (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(before, table); diff != "" {
				t.Errorf("Plan changed its input table:\n%s", diff)
			}
			if next.Used() != st.used || len(next.Slots) != st.slots {
				t.Errorf("next table used %d of %d slots, want %d of %d", next.Used(), len(next.Slots), st.used, st.slots)
			}
			// Re-planning the reached table against the same set is a no-op.
			if again, _, _ := Plan(next, st.desired); len(again) != 0 {
				t.Errorf("plan is not idempotent: %v", again)
			}
			table = next
		})
	}
}

func TestPlanRejectsBadEndpoints(t *testing.T) {
	tests := []struct {
		name string
		e    Endpoint
	}{
		{"hostname", ep("web.service.consul", 80, 1)},
		{"injection", ep("10.0.0.1 port 80;shutdown sessions", 80, 1)},
		{"port zero", ep("10.0.0.1", 0, 1)},
		{"port high", ep("10.0.0.1", 65536, 1)},
		{"weight zero", ep("10.0.0.1", 80, 0)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ops, next, rejected := Plan(New("b", "s", 2), []Endpoint{tt.e, ep("10.0.0.9", 80, 1)})
			if len(rejected) != 1 {
				t.Fatalf("rejected = %v, want one error", rejected)
			}
			if next.Used() != 1 || len(ops) != 2 {
				t.Errorf("the valid endpoint was not planned: ops %v", ops)
			}
		})
	}
}

// TestPlanParkedAddressFromHAProxy: a parked slot's address comes from
// HAProxy after a resync, and need not be an IP literal.
func TestPlanParkedAddressFromHAProxy(t *testing.T) {
	table := FromObserved("b", "s", 3, []Observed{
		{Name: "s1", Addr: "-", Port: 0, Weight: 1, Maint: true},
		{Name: "s2", Addr: "10.0.0.5", Port: 80, Weight: 1, Maint: true},
		{Name: "s3", Addr: "10.0.0.6", Port: 80, Weight: 1},
	})
	ops, _, _ := Plan(table, []Endpoint{ep("10.0.0.5", 80, 1), ep("10.0.0.6", 80, 1), ep("10.0.0.7", 80, 1)})
	want := []Op{
		{Kind: OpReady, Server: "s2"},
		{Kind: OpSetAddr, Server: "s1", Addr: "10.0.0.7", Port: 80},
		{Kind: OpReady, Server: "s1"},
	}
	if diff := cmp.Diff(want, ops); diff != "" {
		t.Errorf("ops (-want +got):\n%s", diff)
	}
}

func TestFromObservedRoundTrip(t *testing.T) {
	_, table, _ := Plan(New("b", "s", 2), []Endpoint{ep("10.0.0.1", 80, 1), ep("10.0.0.2", 81, 5), ep("10.0.0.3", 82, 1)})
	var obs []Observed
	for _, s := range table.Slots {
		obs = append(obs, Observed{Name: s.Name, Addr: s.Addr, Port: s.Port, Weight: s.Weight, Maint: !s.Used})
	}
	obs = append(obs, Observed{Name: "other", Addr: "1.2.3.4", Port: 1})
	got := FromObserved("b", "s", 2, obs)
	if diff := cmp.Diff(table, got); diff != "" {
		t.Errorf("(-planned +observed):\n%s", diff)
	}
}

func TestResizeKeepsSlots(t *testing.T) {
	_, table, _ := Plan(New("b", "s", 2), []Endpoint{ep("10.0.0.1", 80, 1), ep("10.0.0.2", 80, 1), ep("10.0.0.3", 80, 1), ep("10.0.0.4", 80, 1)})
	_, table, _ = Plan(table, []Endpoint{ep("10.0.0.2", 80, 1), ep("10.0.0.4", 80, 1)}) // s1, s3 freed; s4 dynamic
	got := Resize(table, 3)
	if len(got.Slots) != 3 || got.Slots[1].Addr != "10.0.0.2" || got.Slots[0].Addr != "10.0.0.4" || got.Slots[2].Used {
		t.Errorf("resize: %+v", got.Slots)
	}
	for _, s := range got.Slots {
		if s.Dynamic {
			t.Errorf("resized slot %s still dynamic", s.Name)
		}
	}
	if diff := cmp.Diff(table.Endpoints(), got.Endpoints()); diff != "" {
		t.Errorf("endpoints changed: %s", diff)
	}
}

func TestSize(t *testing.T) {
	for _, tt := range []struct{ used, min, want int }{{0, 8, 8}, {3, 8, 8}, {7, 8, 9}, {10, 8, 13}, {20, 8, 25}, {40, 8, 50}, {200, 8, 250}, {256, 8, 320}, {257, 8, 321}, {1000, 8, 1064}, {10000, 8, 10064}, {1000, 2000, 2000}, {0, 0, 1}, {1, 0, 2}} {
		if got := Size(tt.used, tt.min); got != tt.want {
			t.Errorf("Size(%d, %d) = %d, want %d", tt.used, tt.min, got, tt.want)
		}
	}
}

// replay applies ops to t as HAProxy would: the table the commands leave.
func replay(t *testing.T, tab Table, ops []Op) Table {
	t.Helper()
	out := tab.Clone()
	idx := map[string]int{}
	for i, s := range out.Slots {
		idx[s.Name] = i
	}
	for _, op := range ops {
		if op.Kind == OpAdd {
			if _, dup := idx[op.Server]; dup {
				t.Fatalf("add server %s: exists", op.Server)
			}
			idx[op.Server] = len(out.Slots)
			out.Slots = append(out.Slots, Slot{Name: op.Server, Dynamic: true, Addr: op.Addr, Port: op.Port, Weight: op.Weight})
			continue
		}
		i, ok := idx[op.Server]
		if !ok {
			t.Fatalf("%+v: no such slot", op)
		}
		s := &out.Slots[i]
		switch op.Kind {
		case OpSetAddr:
			s.Addr, s.Port = op.Addr, op.Port
		case OpSetWeight:
			s.Weight = op.Weight
		case OpReady:
			s.Used = true
		case OpMaint:
			s.Used = false
		}
	}
	return out
}

// FuzzPlan: over successive plans, the operations take the applied table
// to the returned one; it serves every valid desired endpoint once, at its
// highest weight (clamped), and nothing else; an endpoint served before
// and still desired keeps its slot, in service throughout.
func FuzzPlan(f *testing.F) {
	f.Add([]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, []byte{3, 4, 5, 11, 12}, []byte{5, 6, 7, 13, 14, 15, 16, 17, 18, 19, 20}, uint8(4))
	f.Add([]byte{0x41, 0x42, 0x81, 0xc1, 0xff}, []byte{}, []byte{0x41, 0x41, 0x42}, uint8(0))
	f.Fuzz(func(t *testing.T, a, b, c []byte, size uint8) {
		addrs := []string{"10.0.0.%d", "fd00::%d", "::ffff:10.0.0.%d", "10.0.0.0%d", "host%d"}
		ep := func(x byte) Endpoint {
			return Endpoint{Addr: fmt.Sprintf(addrs[int(x>>5)%len(addrs)], x%8), Port: 1 + int(x%3), Weight: int(x>>3)%4*100 - 1}
		}
		tab := New("b", "s", int(size%16))
		for _, set := range [][]byte{a, b, c} {
			var desired []Endpoint
			want := map[netip.AddrPort]int{}
			for _, x := range set {
				e := ep(x)
				desired = append(desired, e)
				if e.Validate() == nil {
					k := addrPort(e.Addr, e.Port)
					want[k] = max(want[k], min(e.Weight, MaxWeight))
				}
			}
			ops, next, _ := Plan(tab, desired)
			if got := replay(t, tab, ops); !cmp.Equal(got, next) {
				t.Fatalf("ops %+v take %+v to %+v, not %+v", ops, tab, got, next)
			}
			served := map[netip.AddrPort]int{}
			for _, s := range next.Slots {
				if s.Used {
					k := addrPort(s.Addr, s.Port)
					if _, dup := served[k]; dup {
						t.Fatalf("%s served twice: %+v", k, next)
					}
					served[k] = s.Weight
				}
			}
			if !cmp.Equal(served, want) {
				t.Fatalf("served %v, want %v", served, want)
			}
			for i, s := range tab.Slots {
				if s.Used && want[addrPort(s.Addr, s.Port)] > 0 && !next.Slots[i].Used {
					t.Fatalf("%s left slot %s", s.Key(), s.Name)
				}
				if s.Used && want[addrPort(s.Addr, s.Port)] > 0 && next.Slots[i].Key() != s.Key() {
					t.Fatalf("%s moved off slot %s", s.Key(), s.Name)
				}
			}
			tab = next
		}
	})
}

// BenchmarkPlan is one change to an upstream of 1 000 endpoints: one
// endpoint replaced by another, planned from the table that serves the
// others (each change the controller applies plans its upstream whole).
func BenchmarkPlan(b *testing.B) {
	var eps []Endpoint
	for i := range 1000 {
		eps = append(eps, Endpoint{Addr: fmt.Sprintf("10.0.%d.%d", i/250, i%250+1), Port: 21000, Weight: 1})
	}
	_, applied, _ := Plan(New("up_api", "s", Size(len(eps), 8)), eps)
	next := slices.Clone(eps)
	next[500] = Endpoint{Addr: "10.9.9.9", Port: 21000, Weight: 1}
	for b.Loop() {
		if ops, _, _ := Plan(applied, next); len(ops) != 1 {
			b.Fatalf("%d ops, want 1 (set server addr)", len(ops))
		}
	}
}
