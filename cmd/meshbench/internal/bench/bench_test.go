package bench

import (
	"context"
	"errors"
	"testing"
	"time"
)

// A workload's processes are stopped when it returns, whether it failed or
// not: a later workload must not share the machine (or, through Pss, the
// binaries' pages) with them.
func TestRunWorkloadStopsWhatItStarted(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"succeeds", nil},
		{"fails", errors.New("workload failed")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := &Env{Dir: t.TempDir()}
			defer root.Close()
			b := &Bench{Env: root}
			var p *Proc
			err := b.RunWorkload(context.Background(), Workload{Name: "w", Run: func(_ context.Context, b *Bench) error {
				if b.Env == root {
					t.Error("the workload runs in the root Env")
				}
				var err error
				if p, err = b.Start("sleep", "sleep", "60"); err != nil {
					return err
				}
				return tc.err
			}})
			if !errors.Is(err, tc.err) {
				t.Fatalf("RunWorkload: %v, want %v", err, tc.err)
			}
			if p == nil {
				t.Fatal("the workload started nothing")
			}
			if b.Env != root {
				t.Error("b.Env is not the root Env again after the workload")
			}
			select {
			case <-p.Done():
			case <-time.After(15 * time.Second):
				t.Fatal("the workload's process still runs after RunWorkload returned")
			}
		})
	}
}
