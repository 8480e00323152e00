package watch

import (
	"context"
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap/zaptest"
)

// TestLoop drives Loop with a scripted fetch and checks the cursor each
// query was sent and what was published.
func TestLoop(t *testing.T) {
	type answer struct {
		cur Cursor
		err bool
	}
	tests := []struct {
		name          string
		script        []answer
		wantSent      []Cursor
		wantPublished []int // script positions published
	}{
		{
			name: "index: first always, same index not, backwards resets to 0, errors keep the cursor",
			script: []answer{
				{cur: Cursor{Index: 5}},
				{cur: Cursor{Index: 5}},
				{cur: Cursor{Index: 7}},
				{cur: Cursor{Index: 3}},
				{err: true},
				{cur: Cursor{Index: 3}},
				{err: true},
				{cur: Cursor{Index: 4}},
			},
			wantSent:      []Cursor{{}, {Index: 5}, {Index: 5}, {Index: 7}, {}, {}, {Index: 3}, {Index: 3}},
			wantPublished: []int{0, 2, 3, 5, 7},
		},
		{
			name:          "hash: a new hash publishes",
			script:        []answer{{cur: Cursor{Hash: "a"}}, {cur: Cursor{Hash: "a"}}, {cur: Cursor{Hash: "b"}}},
			wantSent:      []Cursor{{}, {Hash: "a"}, {Hash: "a"}},
			wantPublished: []int{0, 2},
		},
		{
			name:          "no cursor (a polled endpoint): every answer publishes",
			script:        []answer{{}, {}, {}},
			wantSent:      []Cursor{{}, {}, {}},
			wantPublished: []int{0, 1, 2},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var sent []Cursor
			var published []int
			fetch := func(_ context.Context, cur Cursor) (int, Cursor, error) {
				n := len(sent)
				sent = append(sent, cur)
				if n == len(tt.script)-1 {
					cancel() // the last answer is still handled
				}
				a := tt.script[n]
				if a.err {
					return 0, Cursor{Index: 99}, errors.New("consul: 500")
				}
				return n, a.cur, nil
			}
			// Errors back off from 100 ms: a few hundred ms in all.
			Loop(ctx, Options{Name: "test", Log: zaptest.NewLogger(t)}, fetch, func(n int) { published = append(published, n) })
			if diff := cmp.Diff(tt.wantSent, sent); diff != "" {
				t.Errorf("cursor sent per query (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tt.wantPublished, published); diff != "" {
				t.Errorf("answers published (-want +got):\n%s", diff)
			}
		})
	}
}

// TestBackoff: doubling from Min, capped at Max, jittered into [d/2, d],
// and back to Min after Reset.
func TestBackoff(t *testing.T) {
	b := Backoff{Min: 100, Max: 1000}
	for i, d := range []int64{100, 200, 400, 800, 1000, 1000} {
		got := int64(b.Next())
		if got < d/2 || got > d {
			t.Errorf("failure %d: wait %d, want in [%d, %d]", i+1, got, d/2, d)
		}
	}
	b.Reset()
	if got := int64(b.Next()); got < 50 || got > 100 {
		t.Errorf("after reset: wait %d, want in [50, 100]", got)
	}
}
