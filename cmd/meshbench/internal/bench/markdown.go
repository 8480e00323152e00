package bench

import (
	"fmt"
	"io"
	"os"
	"strings"
)

// analysisMarker starts the hand-written part of BENCHMARKS.md (reading the
// figures against the targets, profiles): a new run keeps it, below the new
// figures, so that it can be checked against them and revised.
const analysisMarker = "<!-- analysis: hand-written, kept by make bench -->"

// WriteBenchmarksMD writes BENCHMARKS.md: how to read it, the report, and
// the hand-written analysis kept from the file at path, if any.
func WriteBenchmarksMD(path string, r *Report) error {
	var kept string
	if old, err := os.ReadFile(path); err == nil {
		if i := strings.Index(string(old), analysisMarker); i >= 0 {
			kept = string(old[i:])
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	writeHeader(f)
	r.Markdown(f)
	if kept != "" {
		fmt.Fprint(f, flagStale(kept, r.Started.UTC().Format(runStamp)))
	}
	return f.Close()
}

// runStamp is how a run's start is written, in the report's "Run:" line
// and in the analysis's heading naming the run it reads.
const runStamp = "2006-01-02 15:04 MST"

// staleFlag starts the line flagStale puts under the marker.
const staleFlag = "> **Later run:**"

// flagStale returns the kept analysis with a flag under its marker when it
// does not name the run whose figures now precede it (the hand-written
// analysis names its run, e.g. "run of 2026-12-01 21:40 UTC"); a flag
// from an earlier rewrite is replaced.
func flagStale(kept, run string) string {
	body := strings.TrimPrefix(kept, analysisMarker)
	body = strings.TrimLeft(body, "\n")
	if strings.HasPrefix(body, staleFlag) {
		if i := strings.Index(body, "\n"); i >= 0 {
			body = strings.TrimLeft(body[i:], "\n")
		} else {
			body = ""
		}
	}
	if strings.Contains(body, run) {
		return analysisMarker + "\n\n" + body
	}
	return analysisMarker + "\n\n" + staleFlag + " the figures above are from the run of " + run +
		"; the analysis below was written for an earlier run (the one it names) and may no longer match them.\n\n" + body
}

func writeHeader(w io.Writer) {
	fmt.Fprint(w, `# Benchmarks

Produced by `+"`make bench`"+` (cmd/meshbench): everything runs on this machine's
loopback, with a real Consul agent and real HAProxy, and every contender does
the same work in the same run. Each figure is the median of the rounds, with
the minimum and maximum in parentheses, because the machine is shared and
noisy; comparisons are ratios of figures from this same run. Nothing here is a
timed assertion in a test. The analysis against the targets, at the end, is
written by hand for the run it names.

`)
}
