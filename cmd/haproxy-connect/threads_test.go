package main

import "testing"

// TestDefaultThreads: one HAProxy thread where the sidecar may use 2 CPUs
// or fewer, else one per CPU it may use.
func TestDefaultThreads(t *testing.T) {
	for _, c := range []struct{ cpus, want int }{{1, 1}, {2, 1}, {3, 3}, {4, 4}, {64, 64}} {
		if got := defaultThreads(c.cpus); got != c.want {
			t.Errorf("defaultThreads(%d) = %d, want %d", c.cpus, got, c.want)
		}
	}
}
