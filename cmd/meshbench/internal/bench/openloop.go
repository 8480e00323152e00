package bench

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
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

// openLoopTick is how often OpenLoop's scheduler wakes up: every request
// due since its last wake-up starts then, with its intended time kept.
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
	interval := time.Duration(float64(time.Second) / rate)
	n := int(d / interval)
	lat := make([]float64, n)
	var failed atomic.Int64
	var firstErr atomic.Value
	okAt := make([]bool, n)
	var wg sync.WaitGroup
	start := time.Now()
	next := 0
	for next < n && ctx.Err() == nil {
		now := time.Now()
		for ; next < n; next++ {
			due := start.Add(time.Duration(next) * interval)
			if due.After(now) {
				break
			}
			wg.Add(1)
			go func(i int, due time.Time) {
				defer wg.Done()
				if err := getOnce(ctx, c, url); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
					return
				}
				lat[i], okAt[i] = time.Since(due).Seconds(), true
			}(next, due)
		}
		time.Sleep(openLoopTick)
	}
	wg.Wait()
	r := LoadResult{Failed: failed.Load(), Seconds: time.Since(start).Seconds()}
	r.FirstErr, _ = firstErr.Load().(error)
	for i := range lat {
		if okAt[i] {
			r.OK++
			r.Lat = append(r.Lat, lat[i])
		}
	}
	return r
}
