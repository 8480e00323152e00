package bench

import (
	"context"
	"time"
)

// PollPeriod paces the polling of a HAProxy contender: one "show
// servers state" every millisecond, and never more than half of the time
// busy polling (after a poll that took d, the next starts d later at the
// earliest). A tight loop (about 0.5 ms a poll with a few dozen servers,
// several ms with a thousand) keeps the master, the worker and this process
// busy, close to a whole CPU of the two this machine has, which slows the
// contender and Consul it measures. The resolution is about 1 ms, or twice a
// poll's duration with large backends; the mean poll interval is reported.
const PollPeriod = time.Millisecond

// PollLoop observes a polled contender into tl until ctx ends, at the
// PollPeriod pace. A failed poll is retried at the same pace: a master
// socket refuses connections while it re-executes (a reload).
func PollLoop(ctx context.Context, poll func(context.Context) (map[string]bool, error), tl *Timeline) {
	for ctx.Err() == nil {
		start := time.Now()
		now, err := poll(ctx)
		if err == nil {
			tl.Observe(time.Now(), now)
		}
		took := time.Since(start)
		time.Sleep(max(PollPeriod-took, took))
	}
}
