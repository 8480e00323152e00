package bench

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"time"
)

// Samples are the measurements of one round (latencies in seconds, rates,
// bytes...).
type Samples []float64

// Percentile returns the p-th percentile (0-100), nearest rank; NaN if empty.
func (s Samples) Percentile(p float64) float64 {
	if len(s) == 0 {
		return math.NaN()
	}
	c := slices.Clone(s)
	slices.Sort(c)
	i := int(math.Ceil(p/100*float64(len(c)))) - 1
	return c[max(0, min(i, len(c)-1))]
}

// Max is the largest sample; NaN if empty.
func (s Samples) Max() float64 {
	if len(s) == 0 {
		return math.NaN()
	}
	return slices.Max(s)
}

// Rounds holds one figure per round; reports show the median with min-max.
type Rounds []float64

// Median of the rounds: the middle value, or the mean of the two middle
// values for an even count; NaN if empty.
func (r Rounds) Median() float64 {
	if len(r) == 0 {
		return math.NaN()
	}
	c := slices.Clone(r)
	slices.Sort(c)
	if n := len(c); n%2 == 0 {
		return (c[n/2-1] + c[n/2]) / 2
	}
	return c[len(c)/2]
}

// Format renders "median (min-max)" with f formatting one value.
func (r Rounds) Format(f func(float64) string) string {
	if len(r) == 0 {
		return "n/a"
	}
	if len(r) == 1 {
		return f(r[0])
	}
	return fmt.Sprintf("%s (%s–%s)", f(r.Median()), f(slices.Min(r)), f(slices.Max(r)))
}

// Dur formats seconds as a duration with 3 significant figures.
func Dur(sec float64) string {
	if math.IsNaN(sec) {
		return "n/a"
	}
	if math.IsInf(sec, 0) {
		// A histogram's last bucket (le="+Inf"): no Duration holds it.
		return fmt.Sprintf("%+.0f", sec)
	}
	d := time.Duration(sec * float64(time.Second))
	switch {
	case d < time.Millisecond:
		return fmt.Sprintf("%.0fµs", sec*1e6)
	case d < 10*time.Millisecond:
		return fmt.Sprintf("%.2fms", sec*1e3)
	case d < time.Second:
		return fmt.Sprintf("%.1fms", sec*1e3)
	}
	return fmt.Sprintf("%.2fs", sec)
}

// Num formats a count or rate.
func Num(v float64) string {
	if math.IsNaN(v) {
		return "n/a"
	}
	if v >= 100 || v == math.Trunc(v) {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

// Ratio formats a/b as "12.3x"; "n/a" when either is missing or b is 0.
func Ratio(a, b float64) string {
	if math.IsNaN(a) || math.IsNaN(b) || b == 0 {
		return "n/a"
	}
	switch r := a / b; {
	case r >= 100:
		return fmt.Sprintf("%.0fx", r)
	case r >= 10:
		return fmt.Sprintf("%.1fx", r)
	default:
		return fmt.Sprintf("%.2gx", r)
	}
}

// Section is one workload's results.
type Section struct {
	Title string
	Notes []string
	Head  []string
	Rows  [][]string
}

// Report is what meshbench prints and writes to BENCHMARKS.md.
type Report struct {
	Command  string
	Versions []string
	Started  time.Time
	Sections []*Section
}

// Add appends a section and returns it.
func (r *Report) Add(title string, head ...string) *Section {
	s := &Section{Title: title, Head: head}
	r.Sections = append(r.Sections, s)
	return s
}

// Row appends a table row.
func (s *Section) Row(cells ...string) { s.Rows = append(s.Rows, cells) }

// Note appends a paragraph under the table.
func (s *Section) Note(format string, a ...any) { s.Notes = append(s.Notes, fmt.Sprintf(format, a...)) }

// Markdown writes the report as Markdown.
func (r *Report) Markdown(w io.Writer) {
	fmt.Fprintf(w, "Run: `%s` on %s.\n\n", r.Command, r.Started.UTC().Format(runStamp))
	for _, v := range r.Versions {
		fmt.Fprintf(w, "- %s\n", v)
	}
	fmt.Fprintln(w)
	for _, s := range r.Sections {
		fmt.Fprintf(w, "### %s\n\n", s.Title)
		if len(s.Head) > 0 {
			fmt.Fprintf(w, "| %s |\n", strings.Join(s.Head, " | "))
			fmt.Fprintf(w, "|%s\n", strings.Repeat("---|", len(s.Head)))
			for _, row := range s.Rows {
				fmt.Fprintf(w, "| %s |\n", strings.Join(row, " | "))
			}
			fmt.Fprintln(w)
		}
		for _, n := range s.Notes {
			fmt.Fprintf(w, "%s\n\n", n)
		}
	}
}

// Text writes the report as aligned plain-text tables.
func (r *Report) Text(w io.Writer) {
	for _, s := range r.Sections {
		fmt.Fprintf(w, "\n== %s\n", s.Title)
		if len(s.Head) > 0 {
			widths := make([]int, len(s.Head))
			for i, h := range s.Head {
				widths[i] = len([]rune(h))
			}
			for _, row := range s.Rows {
				for i, c := range row {
					if i < len(widths) {
						widths[i] = max(widths[i], len([]rune(c)))
					}
				}
			}
			line := func(cells []string) {
				for i, c := range cells {
					fmt.Fprintf(w, "%-*s  ", widths[i], c)
				}
				fmt.Fprintln(w)
			}
			line(s.Head)
			for _, row := range s.Rows {
				line(row)
			}
		}
		for _, n := range s.Notes {
			fmt.Fprintf(w, "  %s\n", n)
		}
	}
}

// SignedDur is Dur for a difference that may be negative.
func SignedDur(sec float64) string {
	if sec < 0 {
		return "−" + Dur(-sec)
	}
	return Dur(sec)
}
func PerReq(v float64) string { return fmt.Sprintf("%.3f", v) }
func OptPerReq(r Rounds) string {
	if len(r) == 0 {
		return "–"
	}
	return r.Format(PerReq)
}

// DiffRounds is a[i] - b[i] for each round present in both.
func DiffRounds(a, b Rounds) Rounds {
	var d Rounds
	for i := 0; i < len(a) && i < len(b); i++ {
		d = append(d, a[i]-b[i])
	}
	return d
}

// MiB formats bytes in MiB.
func MiB(v float64) string { return fmt.Sprintf("%.1f MiB", v/(1<<20)) }

// Target says whether v (lower is better) meets target: "met: v ≤
// target" or "missed by <v-target>: v against ≤ target"; f formats values.
func Target(v, target float64, f func(float64) string) string {
	switch {
	case math.IsNaN(v):
		return "≤ " + f(target) + ": n/a"
	case v <= target:
		return fmt.Sprintf("met: %s ≤ %s", f(v), f(target))
	}
	return fmt.Sprintf("missed by %s: %s against ≤ %s", f(v-target), f(v), f(target))
}

// TargetRatio is Target for a ratio: "missed: 5.4x against ≤ 1.5x (3.6x
// the target)".
func TargetRatio(v, target float64) string {
	switch {
	case math.IsNaN(v):
		return "≤ " + X(target) + ": n/a"
	case v <= target:
		return fmt.Sprintf("met: %s ≤ %s", X(v), X(target))
	}
	return fmt.Sprintf("missed: %s against ≤ %s (%s the target)", X(v), X(target), Ratio(v, target))
}

// TargetAtLeast is Target for a figure where higher is better.
func TargetAtLeast(v, target float64, f func(float64) string) string {
	switch {
	case math.IsNaN(v):
		return "≥ " + f(target) + ": n/a"
	case v >= target:
		return fmt.Sprintf("met: %s ≥ %s", f(v), f(target))
	}
	return fmt.Sprintf("missed by %s: %s against ≥ %s", f(target-v), f(v), f(target))
}

// Mean of the values; NaN if empty.
func Mean(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	var sum float64
	for _, x := range v {
		sum += x
	}
	return sum / float64(len(v))
}

// PerRound is a[i]/b[i] for each round present in both: a ratio paired
// within each round, so that the machine's drift between rounds cancels.
func PerRound(a, b Rounds) Rounds {
	var r Rounds
	for i := 0; i < len(a) && i < len(b); i++ {
		if b[i] != 0 && !math.IsNaN(a[i]) && !math.IsNaN(b[i]) {
			r = append(r, a[i]/b[i])
		}
	}
	return r
}

// X formats a ratio as Ratio does ("1.3x").
func X(v float64) string { return Ratio(v, 1) }
