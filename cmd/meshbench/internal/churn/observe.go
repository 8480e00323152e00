package churn

import (
	"context"
	"time"

	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
)

// pollPeriod paces the polling of a HAProxy contender: one "show
// servers state" every millisecond, and never more than half of the time
// busy polling (after a poll that took d, the next starts d later at the
// earliest). A tight loop (about 0.5 ms a poll with a few dozen servers,
// several ms with a thousand) keeps the master, the worker and this process
// busy, close to a whole CPU of the two this machine has, which slows the
// contender and Consul it measures. The resolution is about 1 ms, or twice a
// poll's duration with large backends; the mean poll interval is reported.
const pollPeriod = time.Millisecond

// pollLoop observes a polled contender until ctx ends.
func pollLoop(ctx context.Context, poll func(context.Context) (map[string]bool, error), tl *bench.Timeline) {
	for ctx.Err() == nil {
		start := time.Now()
		now, err := poll(ctx)
		if err == nil {
			tl.Observe(time.Now(), now)
		}
		// On error, the master socket refused the connection while it
		// re-executes (a reload): retry at the same pace.
		took := time.Since(start)
		time.Sleep(max(pollPeriod-took, took))
	}
}
