package churn

import (
	"context"
	"fmt"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
)

// result is one contender's figures for one pass.
type result struct {
	lat, base bench.Samples // seconds from ack to in effect: contender, Consul
	// the same apart: of the adds and of the removes
	latAdd, latRemove, baseAdd, baseRemove bench.Samples
	unseen                                 int // changes never in effect in the contender
	changes                                int
	reloads                                int              // -1: not applicable
	load                                   bench.LoadResult // the steady load's requests
	pollInterval                           time.Duration    // mean time between two observations
	// share50 and share99 bound the contender's own share of propagation
	// (the upper bounds of its histogram buckets holding p50 and p99);
	// NaN without one. proof50 and proof99 bound its identity proofs the
	// same way (NaN when it made none).
	share50, share99 float64
	proof50, proof99 float64
	rate             float64 // achieved changes per second (rate passes)
	baseUnseen       int
	// cpu is the contender's CPU time (its whole process trees) from the
	// first measured write to the end state; -1 without processes.
	cpu            time.Duration
	pollCost       float64       // the observer's CPU seconds per poll (calibrate)
	writeDurations bench.Samples // seconds each write took (ack - start)
}

// pass runs one plan against one started contender.
func (cb *workload) pass(ctx context.Context, c *contender, p plan) (result, error) {
	var r result
	pl, baseKey := cb.api, cb.apiBase
	if c.plain {
		pl, baseKey = cb.plain, cb.plainKey
	}
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()

	// Observers: Consul's blocking query, and the contender.
	consulTL, seenTL := bench.NewTimeline(), bench.NewTimeline()
	wg.Add(1)
	go func() {
		defer wg.Done()
		bench.WatchConsul(pctx, cb.consul.Addr, !c.plain, serviceName(c.plain), consulTL.Observe)
	}()
	switch {
	case c.alone:
	default:
		wg.Add(1)
		go func() { defer wg.Done(); bench.PollLoop(pctx, c.poll, seenTL) }()
	}

	// The schedule: a starting set, the measured writes, the end set.
	var start, end []endpoint
	var ops []writeOp
	switch {
	case p.rate > 0:
		start, ops, end = rateOps(pl.eps, p.window, p.changes)
	default:
		for _, e := range pl.eps[:p.changes] {
			ops = append(ops, writeOp{e: e, add: true})
		}
	}
	// With check flips, the whole ring is listed from the start, its
	// checks critical, and is deregistered at the end.
	var ring []endpoint
	if p.flip {
		ring = pl.eps[:2*p.window+1]
		ops = flipped(ops)
		if _, err := cb.writeAll(ctx, flipped(opsOf(ring, false))); err != nil {
			return r, err
		}
	}
	wantOf := func(eps []endpoint) map[string]bool {
		want := map[string]bool{baseKey: true}
		for _, e := range eps {
			want[e.key] = true
		}
		return want
	}

	// Starting state, not measured.
	if _, err := cb.writeAll(ctx, opsOf(start, true)); err != nil {
		return r, err
	}
	if err := settle(ctx, c, seenTL, consulTL, wantOf(start)); err != nil {
		return r, fmt.Errorf("starting state: %w", err)
	}
	if p.flip && c.share != nil {
		// The ring's instances were listed critical before the start:
		// a sidecar that proves them ahead does it now, not in the
		// measured changes.
		if err := proofsQuiet(ctx, c); err != nil {
			return r, fmt.Errorf("starting state: %w", err)
		}
	}
	reloadsBefore := -1
	if c.reloads != nil {
		n, err := c.reloads(ctx)
		if err != nil {
			return r, err
		}
		reloadsBefore = n
	}
	if c.poll != nil && c.cpu != nil {
		if err := c.calibrate(ctx, seenTL.Polls); err != nil {
			return r, err
		}
	}
	r.cpu, r.pollCost = -1, c.pollCost
	var cpu0 time.Duration
	if c.cpu != nil {
		var err error
		if cpu0, err = c.cpu(); err != nil {
			return r, err
		}
	}
	consulTL.Restart()
	seenTL.Restart()
	var share0 shares
	if c.share != nil {
		var err error
		if share0, err = c.share(); err != nil {
			return r, err
		}
	}

	stopLoad := func() bench.LoadResult { return bench.LoadResult{} }
	if !c.alone {
		stopLoad = steadyLoad(pctx, c.port, loadRate)
	}
	if c.profile != nil && p.rate > 0 {
		name := fmt.Sprintf("churn-%s-%g", c.name, p.rate)
		d := time.Duration(float64(p.changes)/p.rate*float64(time.Second)) - time.Second
		profiled := c.profile(name, max(d, time.Second))
		defer func() {
			if err := <-profiled; err != nil {
				cb.b.Logf("churn: profile %s: %v", name, err)
			}
		}()
	}
	var changes []bench.Change
	var err error
	switch {
	case p.rate > 0:
		changes, err = cb.writeAt(pctx, ops, p.rate)
	default:
		// A burst: all adds at once, in effect, then all removes at once.
		if changes, err = cb.writeAll(pctx, ops); err == nil {
			if err := settle(ctx, c, seenTL, consulTL, wantOf(ops2eps(ops))); err != nil {
				cb.b.Logf("churn: %s, %s: after the adds: %v", c.name, p.name, err)
			}
			var removes []bench.Change
			removes, err = cb.writeAll(pctx, opsOf(ops2eps(ops), false))
			changes = append(changes, removes...)
		}
	}
	if err != nil {
		stopLoad()
		return r, err
	}
	// Wait for the end state; what never comes is "never in effect".
	if err := settle(ctx, c, seenTL, consulTL, wantOf(end)); err != nil {
		cb.b.Logf("churn: %s, %s: end state: %v", c.name, p.name, err)
	}
	if c.cpu != nil {
		cpu1, err := c.cpu()
		if err != nil {
			return r, err
		}
		r.cpu = cpu1 - cpu0
	}
	r.load = stopLoad()
	r.share50, r.share99, r.proof50, r.proof99 = math.NaN(), math.NaN(), math.NaN(), math.NaN()
	if c.share != nil {
		share1, err := c.share()
		if err != nil {
			return r, err
		}
		d := share1.sub(share0)
		r.share50, r.share99 = d.prop.Bound(0.50), d.prop.Bound(0.99)
		r.proof50, r.proof99 = d.proof.Bound(0.50), d.proof.Bound(0.99)
	}
	if c.reloads != nil {
		n, err := c.reloads(ctx)
		if err != nil {
			return r, err
		}
		r.reloads = n - reloadsBefore
	} else {
		r.reloads = -1
	}
	cancel()
	wg.Wait()

	r.changes = len(changes)
	r.latAdd, r.latRemove, r.unseen = bench.MatchByKind(changes, seenTL.Transitions())
	r.baseAdd, r.baseRemove, r.baseUnseen = bench.MatchByKind(changes, consulTL.Transitions())
	r.lat, r.base = slices.Concat(r.latAdd, r.latRemove), slices.Concat(r.baseAdd, r.baseRemove)
	r.pollInterval = seenTL.MeanInterval()
	if c.alone {
		r.lat, r.unseen = r.base, r.baseUnseen
		r.latAdd, r.latRemove = r.baseAdd, r.baseRemove
	}
	var first, last time.Time
	for _, ch := range changes {
		r.writeDurations = append(r.writeDurations, ch.Took.Seconds())
		if first.IsZero() || ch.Ack.Before(first) {
			first = ch.Ack
		}
		if ch.Ack.After(last) {
			last = ch.Ack
		}
	}
	if len(changes) > 1 && last.After(first) {
		r.rate = float64(len(changes)-1) / last.Sub(first).Seconds()
	}

	// Back to the base state for the next pass, not measured.
	if p.flip {
		end = ring
	}
	if _, err := cb.writeAll(ctx, opsOf(end, false)); err != nil {
		return r, err
	}
	return r, nil
}

func serviceName(plain bool) string {
	if plain {
		return "api-plain"
	}
	return "api"
}

// proofsQuiet waits until the contender has made no identity proof for
// quietFor (its proof histogram's count unchanged).
func proofsQuiet(ctx context.Context, c *contender) error {
	const quietFor = 500 * time.Millisecond
	last, since := -1.0, time.Now()
	return bench.WaitFor(ctx, time.Minute, func() error {
		s, err := c.share()
		if err != nil {
			return err
		}
		n := s.proof.Count()
		if n != last {
			last, since = n, time.Now()
		}
		if time.Since(since) < quietFor {
			return fmt.Errorf("%g proofs, the last under %s ago", n, quietFor)
		}
		return nil
	})
}

// settle waits until both the contender and Consul show exactly want.
func settle(ctx context.Context, c *contender, seen, consul *bench.Timeline, want map[string]bool) error {
	if err := bench.WaitFor(ctx, time.Minute, func() error { return consul.Check(want) }); err != nil {
		return fmt.Errorf("consul: %w", err)
	}
	if c.alone {
		return nil
	}
	return bench.WaitFor(ctx, c.settle, func() error { return seen.Check(want) })
}
