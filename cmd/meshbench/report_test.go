package main

import (
	"math"
	"testing"
)

func TestPercentileAndRounds(t *testing.T) {
	s := Samples{5, 1, 4, 2, 3, 6, 7, 8, 9, 10}
	for _, tt := range []struct{ p, want float64 }{{50, 5}, {99, 10}, {100, 10}, {0, 1}, {90, 9}} {
		if got := s.Percentile(tt.p); got != tt.want {
			t.Errorf("p%v = %v, want %v", tt.p, got, tt.want)
		}
	}
	if !math.IsNaN(Samples(nil).Percentile(50)) {
		t.Error("empty percentile is not NaN")
	}
	r := Rounds{0.003, 0.001, 0.002}
	if got := r.Format(Dur); got != "2.00ms (1.00ms–3.00ms)" {
		t.Errorf("rounds format %q", got)
	}
	if got := Ratio(10, 4); got != "2.5x" {
		t.Errorf("ratio %q", got)
	}
	if got := Ratio(312, 1); got != "312x" {
		t.Errorf("large ratio %q", got)
	}
	if got := Ratio(23, 2); got != "11.5x" {
		t.Errorf("ratio %q", got)
	}
	if got := Ratio(1, 0); got != "n/a" {
		t.Errorf("ratio by zero %q", got)
	}
}
