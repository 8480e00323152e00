package churn

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"
)

// TestSteadyLoadOpen checks that the steady load keeps sending while the
// requests before it are held, and times each from when it was due: a
// stall must show in the latencies, not thin the requests out.
func TestSteadyLoadOpen(t *testing.T) {
	const held = 5
	gate := make(chan struct{})
	var mu sync.Mutex
	inside := 0
	var first time.Time // when the first request reached the server
	reached := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		inside++
		if inside == 1 {
			first = time.Now()
		}
		if inside == held {
			close(reached)
		}
		mu.Unlock()
		<-gate
	}))
	defer srv.Close()
	port := srv.Listener.Addr().(*net.TCPAddr).Port

	stop := steadyLoad(context.Background(), port, 100)
	select {
	case <-reached: // held requests are in flight at once: the schedule went on
	case <-time.After(10 * time.Second):
		stop()
		t.Fatalf("the load did not send %d requests while the first was held", held)
	}
	mu.Lock()
	heldFor := time.Since(first)
	mu.Unlock()
	close(gate)
	f := stop()
	if f.Failed != 0 {
		t.Fatalf("failed %d, first error %v; want none", f.Failed, f.FirstErr)
	}
	if f.OK < held || int(f.OK) != len(f.Lat) {
		t.Fatalf("ok %d with %d latencies; want at least %d, one latency each", f.OK, len(f.Lat), held)
	}
	// The first request was due before it reached the server and was
	// answered after the gate opened: its time counts the whole hold.
	if max := f.Lat.Max(); max < heldFor.Seconds() {
		t.Errorf("longest latency %.3fs, shorter than the %.3fs the first request was held", max, heldFor.Seconds())
	}
}
