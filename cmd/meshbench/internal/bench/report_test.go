package bench

import (
	"math"
	"os"
	"strings"
	"testing"
	"time"
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
	for _, tt := range []struct {
		sec  float64
		want string
	}{{0.0005, "500µs"}, {0.0042, "4.20ms"}, {0.25, "250.0ms"}, {5, "5.00s"}, {math.Inf(1), "+Inf"}, {math.NaN(), "n/a"}} {
		if got := Dur(tt.sec); got != tt.want {
			t.Errorf("Dur(%v) = %q, want %q", tt.sec, got, tt.want)
		}
	}
	r := Rounds{0.003, 0.001, 0.002}
	if got := r.Format(Dur); got != "2.00ms (1.00ms–3.00ms)" {
		t.Errorf("rounds format %q", got)
	}
	for _, tt := range []struct {
		r    Rounds
		want float64
	}{{Rounds{3, 1, 2}, 2}, {Rounds{4, 1, 3, 2}, 2.5}, {Rounds{7}, 7}, {Rounds{1, 2}, 1.5}} {
		if got := tt.r.Median(); got != tt.want {
			t.Errorf("median of %v = %v, want %v", tt.r, got, tt.want)
		}
	}
	if !math.IsNaN(Rounds(nil).Median()) {
		t.Error("empty median is not NaN")
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

func TestBenchmarksMDKeepsAnalysis(t *testing.T) {
	path := t.TempDir() + "/BENCHMARKS.md"
	r := &Report{Command: "make bench", Started: time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)}
	r.Add("A", "x").Row("1")
	if err := WriteBenchmarksMD(path, r); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	if err := os.WriteFile(path, append(b, []byte("\n"+analysisMarker+"\n## Run of 2026-12-03 12:00 UTC\nmy notes\n")...), 0o644); err != nil {
		t.Fatal(err)
	}
	r.Sections[0].Rows[0][0] = "2"
	if err := WriteBenchmarksMD(path, r); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(path)
	if !strings.Contains(string(got), "| 2 |") || strings.Contains(string(got), "| 1 |") ||
		!strings.HasSuffix(string(got), analysisMarker+"\n\n## Run of 2026-12-03 12:00 UTC\nmy notes\n") {
		t.Errorf("rewritten file:\n%s", got)
	}

	// A later run: the analysis is flagged, once, however often rewritten.
	r.Started = r.Started.Add(24 * time.Hour)
	for range 2 {
		if err := WriteBenchmarksMD(path, r); err != nil {
			t.Fatal(err)
		}
	}
	got, _ = os.ReadFile(path)
	want := analysisMarker + "\n\n" + staleFlag + " the figures above are from the run of 2026-12-04 12:00 UTC; " +
		"the analysis below was written for an earlier run (the one it names) and may no longer match them.\n\n## Run of 2026-12-03 12:00 UTC\nmy notes\n"
	if !strings.HasSuffix(string(got), want) || strings.Count(string(got), staleFlag) != 1 {
		t.Errorf("file after a later run:\n%s", got)
	}
}
