package main

import "testing"

func TestDefaultThreads(t *testing.T) {
	for _, tc := range []struct{ cpus, want int }{{1, 1}, {2, 1}, {3, 3}, {8, 8}} {
		if got := defaultThreads(tc.cpus); got != tc.want {
			t.Errorf("defaultThreads(%d) = %d, want %d", tc.cpus, got, tc.want)
		}
	}
}
