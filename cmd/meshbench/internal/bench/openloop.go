package bench

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"
)

// LoadResult is what a run of OpenLoop or ClosedLoop saw. Latencies are in
// seconds; for OpenLoop each is measured from the request's intended send
// time, so a request the generator or the target could not start on time
// is charged for its wait (no coordinated omission).
type LoadResult struct {
	OK, Failed int64
	Lat        Samples
	Seconds    float64 // from the first intended send to the last answer
	FirstErr   error
}

// Rate is the completed requests per second.
func (r LoadResult) Rate() float64 {
	if r.Seconds <= 0 {
		return 0
	}
	return float64(r.OK) / r.Seconds
}

// loadClient is a keep-alive HTTP client with up to conns connections to
// one host, all reused: the generator's own connection cost stays out of
// the figures, as wrk's does.
func loadClient(conns int) *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		MaxIdleConnsPerHost: conns, MaxConnsPerHost: conns, DisableCompression: true,
	}}
}

func getOnce(ctx context.Context, c *http.Client, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
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

// ClosedLoop sends GET requests to url from conns workers, each sending
// its next request when the previous one is answered, for d: the
// generator's capacity against url.
func ClosedLoop(ctx context.Context, url string, conns int, d time.Duration) LoadResult {
	c := loadClient(conns)
	defer c.CloseIdleConnections()
	var mu sync.Mutex
	var r LoadResult
	start := time.Now()
	end := start.Add(d)
	var wg sync.WaitGroup
	for range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var lat Samples
			var ok, failed int64
			var first error
			for time.Now().Before(end) && ctx.Err() == nil {
				t := time.Now()
				if err := getOnce(ctx, c, url); err != nil {
					failed++
					if first == nil {
						first = err
					}
					continue
				}
				ok++
				lat = append(lat, time.Since(t).Seconds())
			}
			mu.Lock()
			r.OK, r.Failed, r.Lat = r.OK+ok, r.Failed+failed, append(r.Lat, lat...)
			if r.FirstErr == nil {
				r.FirstErr = first
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	r.Seconds = time.Since(start).Seconds()
	return r
}

// openLoopTick is how often an open loop's scheduler wakes up: every
// request due since its last wake-up starts then, with its intended time
// kept.
const openLoopTick = 200 * time.Microsecond

// OpenLoop sends GET requests to url at a fixed rate per second for d,
// each at its intended time whether or not earlier ones have been
// answered (each in its own goroutine, over up to conns keep-alive
// connections: a request that finds them all busy waits for one, and that
// wait is part of its latency), and measures each latency from its
// intended send time.
//
// The conns connections are opened before the schedule starts (one
// request on each, at once, not measured): through a proxy that makes a
// new mTLS connection onward for each (tcp mode), opening them is tens of
// handshakes on a small machine, which would otherwise land on the first
// requests and make the p99 a measure of connection setup.
func OpenLoop(ctx context.Context, url string, rate float64, conns int, d time.Duration) LoadResult {
	c := loadClient(conns)
	defer c.CloseIdleConnections()
	var warm sync.WaitGroup
	for range conns {
		warm.Add(1)
		go func() {
			defer warm.Done()
			_ = getOnce(ctx, c, url)
		}()
	}
	warm.Wait()
	n := int(d / time.Duration(float64(time.Second)/rate))
	sent, stop := StartOpenLoop(ctx, c, url, rate, n)
	select {
	case <-sent:
	case <-ctx.Done():
	}
	return stop()
}

// StartOpenLoop sends GET requests to url with c at a fixed rate per
// second, each at its intended time whether or not earlier ones have been
// answered (each in its own goroutine), until n have been sent (n > 0;
// sent is closed then) or stop is called. stop sends no more, waits for
// the requests in flight, and returns what they saw, each latency
// measured from the request's intended send time: a stall of the target
// or of the generator is charged to every request it delays, and does not
// thin the requests sent (no coordinated omission). c's timeout bounds a
// request, and so the requests in flight.
func StartOpenLoop(ctx context.Context, c *http.Client, url string, rate float64, n int) (sent <-chan struct{}, stop func() LoadResult) {
	interval := time.Duration(float64(time.Second) / rate)
	var (
		mu       sync.Mutex
		r        LoadResult
		inFlight sync.WaitGroup
	)
	all, quit, done := make(chan struct{}), make(chan struct{}), make(chan struct{})
	start := time.Now()
	go func() {
		defer close(done)
		next := 0
		for n <= 0 || next < n {
			select {
			case <-quit:
				return
			default:
			}
			if ctx.Err() != nil {
				return
			}
			now := time.Now()
			for ; n <= 0 || next < n; next++ {
				due := start.Add(time.Duration(next) * interval)
				if due.After(now) {
					break
				}
				inFlight.Add(1)
				go func() {
					defer inFlight.Done()
					err := getOnce(ctx, c, url)
					took := time.Since(due).Seconds()
					mu.Lock()
					defer mu.Unlock()
					if err != nil {
						r.Failed++
						if r.FirstErr == nil {
							r.FirstErr = err
						}
						return
					}
					r.OK++
					r.Lat = append(r.Lat, took)
				}()
			}
			time.Sleep(openLoopTick)
		}
		close(all)
	}()
	return all, func() LoadResult {
		close(quit)
		<-done
		inFlight.Wait()
		mu.Lock()
		defer mu.Unlock()
		r.Seconds = time.Since(start).Seconds()
		return r
	}
}
