package controller

import (
	"context"
	"math/rand/v2"
	"time"

	"go.uber.org/zap"
)

// cursor is where a blocking query resumes: a Raft index, or the content
// hash the agent's own endpoints use.
type cursor struct {
	index uint64
	hash  string
}

// fetchFunc runs one (blocking) query from cur and returns the result and
// the next cursor.
type fetchFunc[T any] func(ctx context.Context, cur cursor) (T, cursor, error)

// watchLoop runs fetch as a blocking-query loop until ctx ends, calling
// publish with each result whose cursor moved (the first result always).
// Following consul-template's view: an index that goes backwards resets to
// 0; errors back off from 100 ms to 10 s with jitter and reset after a
// success; and a query that comes back at once with the same cursor (which
// a misbehaving server or a non-blocking endpoint does) is paced by
// minInterval. Deduplication of equal results is the publisher's job.
func watchLoop[T any](ctx context.Context, log *zap.Logger, name string, minInterval time.Duration, fetch fetchFunc[T], publish func(T)) {
	var cur cursor
	bo := backoff{min: 100 * time.Millisecond, max: 10 * time.Second}
	first := true
	for ctx.Err() == nil {
		start := time.Now()
		v, next, err := fetch(ctx, cur)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			d := bo.next()
			log.Warn("watch failed, retrying", zap.String("watch", name), zap.Error(err), zap.Duration("retry_in", d))
			sleep(ctx, d)
			continue
		}
		if bo.failures > 0 {
			log.Info("watch recovered", zap.String("watch", name), zap.Int("failures", bo.failures))
		}
		bo.reset()
		if next.index < cur.index {
			next.index = 0 // the index went backwards: start over (consul-template)
		}
		// A zero cursor carries no version (a polled endpoint): publish.
		moved := first || next != cur || next == (cursor{})
		cur, first = next, false
		if moved {
			publish(v)
		}
		if !moved || next == (cursor{}) {
			if wait := minInterval - time.Since(start); wait > 0 {
				sleep(ctx, wait)
			}
		}
	}
}

type backoff struct {
	min, max time.Duration
	failures int
}

func (b *backoff) next() time.Duration {
	d := b.min << min(b.failures, 16)
	if d > b.max || d <= 0 {
		d = b.max
	}
	b.failures++
	// Full jitter in [d/2, d).
	return d/2 + rand.N(d/2+1)
}

func (b *backoff) reset() { b.failures = 0 }

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
