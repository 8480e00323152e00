package controller

import (
	"testing"
	"time"

	"github.com/haproxy-connect/haproxy-connect/slots"
)

// TestPendingList: the loop gets the newest list, with the arrival time of
// the oldest one it replaced; a watch that replaced a waiting list is held
// until the loop takes it, and not by a token left from an earlier take.
func TestPendingList(t *testing.T) {
	t0 := time.Unix(100, 0)
	list := func(port int, at time.Duration) endpointList {
		return endpointList{eps: []slots.Endpoint{{Addr: "10.0.0.1", Port: port, Weight: 1}}, at: t0.Add(at)}
	}
	held := func(p *pendingList) bool {
		select {
		case <-p.taken:
			return false
		default:
			return true
		}
	}
	type step struct {
		op        string // put or take
		l         endpointList
		wantEmpty bool         // put: the slot was empty
		wantOK    bool         // take: something was there
		want      endpointList // take: what
		wantHeld  bool         // put that replaced: the watch must wait
	}
	p := &pendingList{taken: make(chan struct{}, 1)}
	steps := []step{
		{op: "take", wantOK: false},
		{op: "put", l: list(1, 0), wantEmpty: true},
		{op: "take", wantOK: true, want: list(1, 0)},
		// The token of that take is stale now: a put into the empty
		// slot drains it, so the replacement below is held.
		{op: "put", l: list(2, time.Second), wantEmpty: true},
		{op: "put", l: list(3, 2*time.Second), wantEmpty: false, wantHeld: true},
		{op: "put", l: list(4, 3*time.Second), wantEmpty: false, wantHeld: true},
		{op: "take", wantOK: true, want: list(4, time.Second)},
		{op: "take", wantOK: false},
	}
	for i, s := range steps {
		switch s.op {
		case "put":
			if got := p.put(s.l); got != s.wantEmpty {
				t.Fatalf("step %d: put reported empty=%v, want %v", i, got, s.wantEmpty)
			}
			if !s.wantEmpty && held(p) != s.wantHeld {
				t.Fatalf("step %d: the watch would not wait for the loop", i)
			}
		case "take":
			got, ok := p.take()
			if ok != s.wantOK {
				t.Fatalf("step %d: take ok=%v, want %v", i, ok, s.wantOK)
			}
			if ok && (got.eps[0] != s.want.eps[0] || !got.at.Equal(s.want.at)) {
				t.Fatalf("step %d: took %+v, want %+v", i, got, s.want)
			}
		}
	}
	// After the last take the waiting watch is released.
	if held(p) {
		t.Fatal("no token after the loop took the list")
	}
}
