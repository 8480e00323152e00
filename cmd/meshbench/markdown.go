package main

import (
	"fmt"
	"io"
)

// writeBenchmarksMD writes BENCHMARKS.md: how to read it, then the report.
func writeBenchmarksMD(w io.Writer, r *Report) {
	fmt.Fprint(w, `# Benchmarks

Produced by `+"`make bench`"+` (cmd/meshbench): everything runs on this machine's
loopback, with a real Consul agent and real HAProxy, and every contender does
the same work in the same run. Each figure is the median of the rounds, with
the minimum and maximum in parentheses, because the machine is shared and
noisy; comparisons are ratios of figures from this same run. Nothing here is a
timed assertion in a test.

`)
	r.Markdown(w)
}
