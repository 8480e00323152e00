package churn

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync/atomic"
	"time"
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

// steadyLoad sends GET requests to port at rate per second, each on a new
// connection, one at a time, on a fixed schedule, until the returned stop
// is called. A request still running when the next one is due makes that
// one late: it is sent at once, and a request whose whole period passed
// before it could be sent is a missed tick, counted as failed (missed
// reports how many), so that a stall shows as failures instead of
// vanishing from the count (no coordinated omission).
func steadyLoad(ctx context.Context, port, rate int) (stop func() (ok, failed, missed int64, first error)) {
	var okN, failedN, missedN atomic.Int64
	var firstErr atomic.Value
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
			} else if late := -d; late >= period {
				// Ticks that passed in full while the previous request ran.
				n := int(late / period)
				missedN.Add(int64(n))
				failedN.Add(int64(n))
				k += n
			}
			if ctx.Err() != nil {
				return
			}
			if err := get(port); err != nil {
				if ctx.Err() != nil {
					return
				}
				failedN.Add(1)
				firstErr.CompareAndSwap(nil, err)
				continue
			}
			okN.Add(1)
		}
	}()
	return func() (int64, int64, int64, error) {
		cancel()
		<-done
		err, _ := firstErr.Load().(error)
		return okN.Load(), failedN.Load(), missedN.Load(), err
	}
}
