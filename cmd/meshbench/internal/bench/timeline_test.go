package bench

import (
	"slices"
	"testing"
	"time"
)

func TestMatchChanges(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	add := func(key string, ms int) Change { return Change{Key: key, Add: true, Ack: at(ms)} }
	del := func(key string, ms int) Change { return Change{Key: key, Ack: at(ms)} }
	on := func(ms int) Transition { return Transition{at(ms), true} }
	off := func(ms int) Transition { return Transition{at(ms), false} }

	tests := []struct {
		name       string
		changes    []Change
		seen       map[string][]Transition
		wantMS     []float64 // latencies in ms, sorted
		wantUnseen int
		// MatchByKind's, in ms, sorted
		wantAdds, wantRemoves []float64
	}{
		{
			name:     "each change seen once",
			changes:  []Change{add("a", 0), add("b", 10), del("a", 20), del("b", 30)},
			seen:     map[string][]Transition{"a": {on(2), off(25)}, "b": {on(13), off(31)}},
			wantMS:   []float64{1, 2, 3, 5},
			wantAdds: []float64{2, 3}, wantRemoves: []float64{1, 5},
		},
		{
			name:     "seen before the ack is kept, negative",
			changes:  []Change{add("a", 10)},
			seen:     map[string][]Transition{"a": {on(9)}},
			wantMS:   []float64{-1},
			wantAdds: []float64{-1},
		},
		{
			name:       "never seen",
			changes:    []Change{add("a", 0), del("a", 100)},
			seen:       map[string][]Transition{},
			wantUnseen: 2,
		},
		{
			// An add and its remove both missed: the next add's transition
			// must not be credited to the first add.
			name:       "missed pair does not steal the next add",
			changes:    []Change{add("a", 0), del("a", 100), add("a", 200), del("a", 300)},
			seen:       map[string][]Transition{"a": {on(205), off(310)}},
			wantMS:     []float64{5, 10},
			wantUnseen: 2,
			wantAdds:   []float64{5}, wantRemoves: []float64{10},
		},
		{
			name:     "re-added endpoint matched in order",
			changes:  []Change{add("a", 0), del("a", 100), add("a", 200), del("a", 300)},
			seen:     map[string][]Transition{"a": {on(1), off(101), on(201), off(301)}},
			wantMS:   []float64{1, 1, 1, 1},
			wantAdds: []float64{1, 1}, wantRemoves: []float64{1, 1},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ms := func(lat Samples) []float64 {
				var got []float64
				for _, s := range lat {
					got = append(got, float64(time.Duration(s*float64(time.Second)).Round(time.Microsecond))/float64(time.Millisecond))
				}
				slices.Sort(got)
				return got
			}
			lat, unseen := Match(tt.changes, tt.seen)
			if got := ms(lat); !slices.Equal(got, tt.wantMS) {
				t.Errorf("latencies = %v ms, want %v", got, tt.wantMS)
			}
			adds, removes, unseenByKind := MatchByKind(tt.changes, tt.seen)
			if got := ms(adds); !slices.Equal(got, tt.wantAdds) {
				t.Errorf("adds = %v ms, want %v", got, tt.wantAdds)
			}
			if got := ms(removes); !slices.Equal(got, tt.wantRemoves) {
				t.Errorf("removes = %v ms, want %v", got, tt.wantRemoves)
			}
			if unseenByKind != tt.wantUnseen {
				t.Errorf("MatchByKind: unseen = %d, want %d", unseenByKind, tt.wantUnseen)
			}
			if unseen != tt.wantUnseen {
				t.Errorf("unseen = %d, want %d", unseen, tt.wantUnseen)
			}
		})
	}
}

func TestTimelineObserve(t *testing.T) {
	tl := NewTimeline()
	t0 := time.Unix(1000, 0)
	tl.Observe(t0, map[string]bool{"a": true})
	tl.Restart()
	tl.Observe(t0.Add(time.Millisecond), map[string]bool{"a": true, "b": true})
	tl.Observe(t0.Add(2*time.Millisecond), map[string]bool{"b": true})
	got := tl.Transitions()
	if len(got["a"]) != 1 || got["a"][0].Present || len(got["b"]) != 1 || !got["b"][0].Present {
		t.Errorf("transitions = %v", got)
	}
	if err := tl.Check(map[string]bool{"b": true}); err != nil {
		t.Error(err)
	}
	if err := tl.Check(map[string]bool{"a": true}); err == nil {
		t.Error("check passed on a different set")
	}
}
