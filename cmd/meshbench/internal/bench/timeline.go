package bench

import (
	"errors"
	"fmt"
	"math"
	"sync"
	"time"
)

// Change is one Consul write and when Consul acknowledged it.
type Change struct {
	Key  string // address:port
	Add  bool
	Ack  time.Time     // when Consul's write call returned
	Took time.Duration // the write call's duration
}

// Transition is an observed Change of one endpoint: in effect or not.
type Transition struct {
	At      time.Time
	Present bool
}

// Timeline records what an observer saw: the current set and, per
// endpoint, every Transition since the last restart.
type Timeline struct {
	mu     sync.Mutex
	cur    map[string]bool
	seen   map[string][]Transition
	first  time.Time
	last   time.Time
	snaps  int
	inited bool
}

func NewTimeline() *Timeline {
	return &Timeline{cur: map[string]bool{}, seen: map[string][]Transition{}}
}

// Observe records a full snapshot taken at at.
func (t *Timeline) Observe(at time.Time, now map[string]bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for k := range now {
		if !t.cur[k] {
			t.seen[k] = append(t.seen[k], Transition{at, true})
		}
	}
	for k := range t.cur {
		if !now[k] {
			t.seen[k] = append(t.seen[k], Transition{at, false})
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

// Restart forgets the transitions so far, keeping the current set.
func (t *Timeline) Restart() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.seen = map[string][]Transition{}
	t.snaps = 0
}

func (t *Timeline) Check(want map[string]bool) error {
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

func (t *Timeline) Transitions() map[string][]Transition {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.seen
}

func (t *Timeline) MeanInterval() time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.snaps < 2 {
		return 0
	}
	return t.last.Sub(t.first) / time.Duration(t.snaps-1)
}

// Match pairs each Change with the observation that shows it in
// effect: per endpoint, changes and transitions both alternate, and the
// n-th Change is matched with the first later Transition to its state that
// comes before the endpoint's next Change of the same kind. Latencies are
// in seconds; unmatched changes are counted as unseen. A Transition may come
// a little before the acknowledgement (Consul can notify watchers before the
// HTTP answer reaches the writer): that latency is negative, and kept.
func Match(changes []Change, seen map[string][]Transition) (lat Samples, unseen int) {
	lat = Samples{}
	for _, l := range matchEach(changes, seen) {
		if math.IsNaN(l) {
			unseen++
			continue
		}
		lat = append(lat, l)
	}
	return lat, unseen
}

// MatchByKind is Match with its latencies apart: of the adds and of the
// removes. An add carries what a removal does not (haproxy-connect proves
// a new endpoint's identity before it takes traffic), so the two tails
// differ.
func MatchByKind(changes []Change, seen map[string][]Transition) (adds, removes Samples, unseen int) {
	adds, removes = Samples{}, Samples{}
	for i, l := range matchEach(changes, seen) {
		switch {
		case math.IsNaN(l):
			unseen++
		case changes[i].Add:
			adds = append(adds, l)
		default:
			removes = append(removes, l)
		}
	}
	return adds, removes, unseen
}

// matchEach is Match per change: the latency of changes[i], NaN when unseen.
func matchEach(changes []Change, seen map[string][]Transition) []float64 {
	lat := make([]float64, len(changes))
	byKey := map[string][]int{}
	for i, ch := range changes {
		byKey[ch.Key] = append(byKey[ch.Key], i)
	}
	for key, idx := range byKey {
		trs := seen[key]
		cur := 0
		for n, i := range idx {
			ch := changes[i]
			// The same endpoint's next Change of the same kind bounds the
			// match: a Transition after it belongs to that Change.
			var bound time.Time
			for _, j := range idx[n+1:] {
				if changes[j].Add == ch.Add {
					bound = changes[j].Ack
					break
				}
			}
			found := -1
			for j := cur; j < len(trs); j++ {
				if !bound.IsZero() && trs[j].At.After(bound) {
					break
				}
				if trs[j].Present == ch.Add {
					found = j
					break
				}
			}
			if found < 0 {
				lat[i] = math.NaN()
				continue
			}
			lat[i] = trs[found].At.Sub(ch.Ack).Seconds()
			cur = found + 1
		}
	}
	return lat
}

// Polls is the number of snapshots observed since the last restart.
func (t *Timeline) Polls() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.snaps
}
