package bench

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"testing"
	"time"
)

// A target that takes at least 20 ms per request: open loop at 200/s over
// 2 connections (capacity 100/s at most) sends 100 requests due within
// 0.5 s that cannot all be answered before 1 s, so the latest are at least
// 0.5 s late from their intended time, which a closed loop never shows.
func TestOpenLoopChargesQueueing(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(20 * time.Millisecond)
	})}
	go srv.Serve(ln)
	defer srv.Close()
	url := fmt.Sprintf("http://%s/", ln.Addr())

	closed := ClosedLoop(context.Background(), url, 2, 500*time.Millisecond)
	if closed.Failed > 0 || closed.OK == 0 {
		t.Fatalf("closed loop: %d ok, %d failed", closed.OK, closed.Failed)
	}
	open := OpenLoop(context.Background(), url, 200, 2, 500*time.Millisecond)
	if open.Failed > 0 || open.OK != 100 {
		t.Fatalf("open loop: %d ok, %d failed, want 100 ok", open.OK, open.Failed)
	}
	// The last requests were due at ~0.5 s but served at ~1 s.
	if p99 := open.Lat.Percentile(99); p99 < 0.2 {
		t.Errorf("open loop p99 %v: the queueing is not charged", p99)
	}
}
