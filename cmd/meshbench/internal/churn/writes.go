package churn

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
)

// writeOp is one write of a schedule: register (add) or deregister e; with
// flip, register e with its check passing (add) or critical.
type writeOp struct {
	e    endpoint
	add  bool
	flip bool
}

func opsOf(eps []endpoint, add bool) []writeOp {
	ops := make([]writeOp, len(eps))
	for i, e := range eps {
		ops[i] = writeOp{e: e, add: add}
	}
	return ops
}

// flipped is ops as check flips: a remove registers the endpoint with its
// check critical instead of deregistering it.
func flipped(ops []writeOp) []writeOp {
	for i := range ops {
		ops[i].flip = true
	}
	return ops
}

func ops2eps(ops []writeOp) []endpoint {
	eps := make([]endpoint, len(ops))
	for i, op := range ops {
		eps[i] = op.e
	}
	return eps
}

// rateOps is the schedule of a rate pass over a ring of the first
// 2*window+1 endpoints: window endpoints live at the start; then adds and
// removes alternate, each add taking the next endpoint of the ring and each
// remove the oldest live one. An endpoint thus lives 2*window changes and
// comes back 2*window+2 changes after it left. end is the live set after
// the last change.
func rateOps(eps []endpoint, window, changes int) (start []endpoint, ops []writeOp, end []endpoint) {
	ring := eps[:2*window+1]
	live := slices.Clone(ring[:window])
	start = slices.Clone(live)
	next := window
	for k := 0; k < changes; k++ {
		if k%2 == 0 {
			e := ring[next%len(ring)]
			next++
			live = append(live, e)
			ops = append(ops, writeOp{e: e, add: true})
		} else {
			ops = append(ops, writeOp{e: live[0]})
			live = live[1:]
		}
	}
	return start, ops, live
}

// write performs one op and records its acknowledgement.
func (cb *workload) write(op writeOp) (bench.Change, error) {
	start := time.Now()
	var err error
	switch {
	case op.add:
		_, err = cb.writer.Catalog().Register(op.e.reg, nil)
	case op.flip:
		_, err = cb.writer.Catalog().Register(op.e.critical, nil)
	default:
		_, err = cb.writer.Catalog().Deregister(op.e.dereg, nil)
	}
	now := time.Now()
	if err != nil {
		return bench.Change{}, fmt.Errorf("write %s (add %t): %w", op.e.id, op.add, err)
	}
	return bench.Change{Key: op.e.key, Add: op.add, Ack: now, Took: now.Sub(start)}, nil
}

// writeAll performs ops as fast as Consul takes them, writers at a
// time; the changes are returned in op order.
func (cb *workload) writeAll(ctx context.Context, ops []writeOp) ([]bench.Change, error) {
	out := make([]bench.Change, len(ops))
	idx := make(chan int)
	errs := make([]error, writers)
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range idx {
				if errs[w] != nil {
					continue
				}
				out[i], errs[w] = cb.write(ops[i])
			}
		}()
	}
	for i := range ops {
		if ctx.Err() != nil {
			break
		}
		idx <- i
	}
	close(idx)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return out, ctx.Err()
}

// writeAt issues ops on a fixed schedule, rate per second, without waiting
// for the previous write (open loop, as independent instances would), up to
// writers in flight; when Consul is slower than that, the schedule
// slips, which the achieved rate shows. Writes to one endpoint stay in
// order. The changes are returned in op order.
func (cb *workload) writeAt(ctx context.Context, ops []writeOp, rate float64) ([]bench.Change, error) {
	out := make([]bench.Change, len(ops))
	errs := make([]error, len(ops))
	slots := make(chan struct{}, writers)
	prev := map[string]chan struct{}{} // the last write of each endpoint
	var wg sync.WaitGroup
	interval := time.Duration(float64(time.Second) / rate)
	start := time.Now()
	for i, op := range ops {
		if d := time.Until(start.Add(time.Duration(i) * interval)); d > 0 {
			select {
			case <-ctx.Done():
			case <-time.After(d):
			}
		}
		if ctx.Err() != nil {
			break
		}
		slots <- struct{}{}
		before, done := prev[op.e.key], make(chan struct{})
		prev[op.e.key] = done
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			defer close(done)
			if before != nil {
				<-before
			}
			out[i], errs[i] = cb.write(op)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return out, ctx.Err()
}
