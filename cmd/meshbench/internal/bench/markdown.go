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
		fmt.Fprint(f, kept)
	}
	return f.Close()
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
