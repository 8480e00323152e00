package scrape

import (
	"math"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

const exposition = `# HELP reloads_total Reloads.
# TYPE reloads_total counter
reloads_total{reason="roots"} 2
reloads_total{reason="registration+roots"} 1
# TYPE endpoints gauge
endpoints{upstream="up_a",dc="dc1"} 3
# TYPE took_seconds histogram
took_seconds_bucket{le="0.001"} 1
took_seconds_bucket{le="0.01"} 3
took_seconds_bucket{le="+Inf"} 4
took_seconds_sum 2.5
took_seconds_count 4
`

func TestValue(t *testing.T) {
	f, err := Parse(strings.NewReader(exposition))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		metric  string
		labels  []string
		want    float64
		wantErr string
	}{
		{"counter with its label", "reloads_total", []string{"reason", "roots"}, 2, ""},
		{"labels in another order", "endpoints", []string{"dc", "dc1", "upstream", "up_a"}, 3, ""},
		{"histogram sum", "took_seconds_sum", nil, 2.5, ""},
		{"histogram count", "took_seconds_count", nil, 4, ""},
		{"a label short", "endpoints", []string{"upstream", "up_a"}, 0, "no sample endpoints{upstream=\"up_a\"}"},
		{"no such label value", "reloads_total", []string{"reason", "listener"}, 0, "no sample"},
		{"no such metric", "nothing_total", nil, 0, "no metric nothing_total"},
		{"odd labels", "reloads_total", []string{"reason"}, 0, "not name, value pairs"},
		{"a histogram as a value", "took_seconds", nil, 0, "is a histogram"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := f.Value(tt.metric, tt.labels...)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("error %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
			case got != tt.want:
				t.Errorf("got %g, want %g", got, tt.want)
			}
		})
	}
	if sum, err := f.Sum("reloads_total"); err != nil || sum != 3 {
		t.Errorf("sum %g %v, want 3", sum, err)
	}
	h, err := f.Histogram("took_seconds")
	if err != nil {
		t.Fatal(err)
	}
	want := []Bucket{{0.001, 1}, {0.01, 3}, {math.Inf(1), 4}}
	if diff := cmp.Diff(want, h); diff != "" {
		t.Errorf("buckets (-want +got):\n%s", diff)
	}
}

func TestParseRejects(t *testing.T) {
	for _, bad := range []string{
		"x{le=\"0.1\"} many\n",
		"# TYPE x counter\nx -1e\n",
		"x{a=\"unterminated} 1\n",
	} {
		if _, err := Parse(strings.NewReader(bad)); err == nil {
			t.Errorf("Parse(%q): no error", bad)
		}
	}
}
