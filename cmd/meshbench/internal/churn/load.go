package churn

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
)

// loadHTTP opens a new connection per request: every request goes
// through the listener (and, across a reload, the new worker) and the
// backend's choice of server.
var loadHTTP = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

func get(port int) error {
	resp, err := loadHTTP.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}

// loadFigures are a steady load's outcome.
type loadFigures struct {
	ok, failed int64
	// lat is each answered request's time from when it was due (not
	// when it was sent) to its answer, in seconds.
	lat   bench.Samples
	first error // the first failure
}

// steadyLoad sends GET requests to port at rate per second, each on a new
// connection, on a fixed schedule, until the returned stop is called.
// The schedule is open: a request is sent when it is due, whether or not
// the ones before it have been answered, and its latency counts from when
// it was due, so that a stall of the data plane (or of the generator
// itself, on busy CPUs) shows in the latencies of every request it held
// instead of thinning the requests sent (no coordinated omission). The
// client's timeout bounds a request, and so the requests in flight (rate
// times the timeout). stop sends no more and waits for the requests in
// flight.
func steadyLoad(ctx context.Context, port, rate int) (stop func() loadFigures) {
	var (
		mu       sync.Mutex
		f        loadFigures
		inFlight sync.WaitGroup
	)
	finish := func(due time.Time, err error) {
		took := time.Since(due).Seconds()
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			f.failed++
			if f.first == nil {
				f.first = err
			}
			return
		}
		f.ok++
		f.lat = append(f.lat, took)
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	period := time.Second / time.Duration(rate)
	go func() {
		defer close(done)
		start := time.Now()
		for k := 0; ; k++ {
			due := start.Add(time.Duration(k) * period)
			if d := time.Until(due); d > 0 {
				select {
				case <-ctx.Done():
					return
				case <-time.After(d):
				}
			}
			if ctx.Err() != nil {
				return
			}
			inFlight.Add(1)
			go func() {
				defer inFlight.Done()
				finish(due, get(port))
			}()
		}
	}()
	return func() loadFigures {
		cancel()
		<-done
		inFlight.Wait()
		mu.Lock()
		defer mu.Unlock()
		return f
	}
}
