// Package watch runs one Consul blocking query as a loop: the cursor it
// resumes from, the backoff after errors and their log lines. The
// controller's sources (registration, leaf, roots, upstream endpoints) and
// the SPOE agent's intentions and roots watches all run on Loop. What a
// query asks and what its answer means is the caller's.
package watch

import (
	"context"
	"math/rand/v2"
	"time"

	"go.uber.org/zap"
)

// Cursor is where a blocking query resumes: a Raft index, or the content
// hash the agent's own endpoints use. The zero Cursor carries no version
// (the first query, or an endpoint that does not block).
type Cursor struct {
	Index uint64
	Hash  string
}

// Fetch runs one (blocking) query from cur and returns the result and the
// next cursor. On error the cursor is not used.
type Fetch[T any] func(ctx context.Context, cur Cursor) (T, Cursor, error)

// Options name and pace a Loop.
type Options struct {
	// Name labels the loop's log lines (field "watch").
	Name string
	Log  *zap.Logger
	// MinInterval is the least time from the start of a query to the
	// start of the next when the answer moved nothing (same cursor) or
	// carries no cursor (a polled endpoint): it paces a misbehaving
	// server and a non-blocking endpoint.
	MinInterval time.Duration
	// Spacing is the least time between the starts of any two queries,
	// changed answers included: it bounds how often publish runs in a
	// burst of changes (it delays only the second of two).
	Spacing time.Duration
	// FailMessage is the log line of a failed query (default "watch
	// failed, retrying"), for callers that say what goes on meanwhile.
	FailMessage string
}

// Backoff bounds of a failed query: from backoffMin doubling to
// backoffMax, with jitter, reset after a success.
const (
	backoffMin = 100 * time.Millisecond
	backoffMax = 10 * time.Second
)

// Loop runs fetch as a blocking-query loop until ctx ends, calling publish
// with each result whose cursor moved (the first result always, and every
// result without a cursor). Following consul-template's view: an index
// that goes backwards resets to 0 (logged); errors back off from 100 ms to
// 10 s with jitter, are logged at warn with the wait, and reset after a
// success (logged once at info); queries are paced by o.MinInterval and
// o.Spacing. Deduplication of equal results is the publisher's job.
func Loop[T any](ctx context.Context, o Options, fetch Fetch[T], publish func(T)) {
	log := o.Log
	if log == nil {
		log = zap.NewNop()
	}
	failMsg := o.FailMessage
	if failMsg == "" {
		failMsg = "watch failed, retrying"
	}
	var cur Cursor
	bo := Backoff{Min: backoffMin, Max: backoffMax}
	first := true
	var start time.Time
	for ctx.Err() == nil {
		if wait := o.Spacing - time.Since(start); !start.IsZero() && wait > 0 {
			if !Sleep(ctx, wait) {
				return
			}
		}
		start = time.Now()
		v, next, err := fetch(ctx, cur)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			d := bo.Next()
			log.Warn(failMsg, zap.String("watch", o.Name), zap.Error(err), zap.Duration("retry_in", d))
			Sleep(ctx, d)
			continue
		}
		if bo.Failures > 0 {
			log.Info("watch recovered", zap.String("watch", o.Name), zap.Int("failures", bo.Failures))
		}
		bo.Reset()
		if next.Index < cur.Index {
			// The index went backwards (a server restored or changed):
			// start over (consul-template).
			log.Info("watch index went backwards, resetting", zap.String("watch", o.Name),
				zap.Uint64("index", cur.Index), zap.Uint64("new_index", next.Index))
			next.Index = 0
		}
		// A zero cursor carries no version (a polled endpoint): publish.
		moved := first || next != cur || next == (Cursor{})
		cur, first = next, false
		if moved {
			publish(v)
		}
		if !moved || next == (Cursor{}) {
			if wait := o.MinInterval - time.Since(start); wait > 0 {
				Sleep(ctx, wait)
			}
		}
	}
}

// Backoff is a capped exponential backoff with jitter: Next returns a
// wait in [d/2, d), d doubling from Min to Max with each failure.
type Backoff struct {
	Min, Max time.Duration
	Failures int
}

// Next counts a failure and returns the wait before the next attempt.
func (b *Backoff) Next() time.Duration {
	d := b.Min << min(b.Failures, 16)
	if d > b.Max || d <= 0 {
		d = b.Max
	}
	b.Failures++
	// Full jitter in [d/2, d).
	return d/2 + rand.N(d/2+1)
}

// Reset forgets the failures (after a success).
func (b *Backoff) Reset() { b.Failures = 0 }

// Sleep waits d (nothing if d <= 0) and reports whether ctx is still live.
func Sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
