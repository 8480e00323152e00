package churn

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
)

// change is one Consul write and when Consul acknowledged it.
type change struct {
	key  string
	add  bool
	ack  time.Time
	took time.Duration
}

// transition is an observed change of one endpoint: in effect or not.
type transition struct {
	at      time.Time
	present bool
}

// timeline records what an observer saw: the current set and, per
// endpoint, every transition since the last restart.
type timeline struct {
	mu     sync.Mutex
	cur    map[string]bool
	seen   map[string][]transition
	first  time.Time
	last   time.Time
	snaps  int
	inited bool
}

func newTimeline() *timeline {
	return &timeline{cur: map[string]bool{}, seen: map[string][]transition{}}
}

// observe records a full snapshot taken at at.
func (t *timeline) observe(at time.Time, now map[string]bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for k := range now {
		if !t.cur[k] {
			t.seen[k] = append(t.seen[k], transition{at, true})
		}
	}
	for k := range t.cur {
		if !now[k] {
			t.seen[k] = append(t.seen[k], transition{at, false})
		}
	}
	t.cur = now
	if t.snaps == 0 {
		t.first = at
	}
	t.last = at
	t.snaps++
	t.inited = true
}

// restart forgets the transitions so far, keeping the current set.
func (t *timeline) restart() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.seen = map[string][]transition{}
	t.snaps = 0
}

func (t *timeline) check(want map[string]bool) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.inited {
		return errors.New("no observation yet")
	}
	var missing, extra int
	for k := range want {
		if !t.cur[k] {
			missing++
		}
	}
	for k := range t.cur {
		if !want[k] {
			extra++
		}
	}
	if missing+extra > 0 {
		return fmt.Errorf("%d endpoints missing, %d extra", missing, extra)
	}
	return nil
}

func (t *timeline) transitions() map[string][]transition {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.seen
}

func (t *timeline) meanInterval() time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.snaps < 2 {
		return 0
	}
	return t.last.Sub(t.first) / time.Duration(t.snaps-1)
}

// match pairs each change with the observation that shows it in
// effect: per endpoint, changes and transitions both alternate, and the
// n-th change is matched with the first later transition to its state that
// comes before the endpoint's next change of the same kind. Latencies are
// in seconds; unmatched changes are counted as unseen. A transition may come
// a little before the acknowledgement (Consul can notify watchers before the
// HTTP answer reaches the writer): that latency is negative, and kept.
func match(changes []change, seen map[string][]transition) (lat bench.Samples, unseen int) {
	byKey := map[string][]int{}
	for i, ch := range changes {
		byKey[ch.key] = append(byKey[ch.key], i)
	}
	lat = bench.Samples{}
	for key, idx := range byKey {
		trs := seen[key]
		cur := 0
		for n, i := range idx {
			ch := changes[i]
			// The same endpoint's next change of the same kind bounds the
			// match: a transition after it belongs to that change.
			var bound time.Time
			for _, j := range idx[n+1:] {
				if changes[j].add == ch.add {
					bound = changes[j].ack
					break
				}
			}
			found := -1
			for j := cur; j < len(trs); j++ {
				if !bound.IsZero() && trs[j].at.After(bound) {
					break
				}
				if trs[j].present == ch.add {
					found = j
					break
				}
			}
			if found < 0 {
				unseen++
				continue
			}
			lat = append(lat, trs[found].at.Sub(ch.ack).Seconds())
			cur = found + 1
		}
	}
	return lat, unseen
}

// polls is the number of snapshots observed since the last restart.
func (t *timeline) polls() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.snaps
}
