// Package bench holds what every meshbench workload shares: the machine
// (Env: binaries, processes, Consul, sidecars), the run's settings (Bench),
// figures per round and their formatting, the report and its Markdown
// writer, and the load tools (wrk, the open-loop generator, the apps).
// It knows no workload.
package bench

import (
	"context"
	"strings"
)

// Bench is one meshbench run.
type Bench struct {
	*Env
	Rounds int
	Quick  bool
	// ProfileDir, when set, receives CPU profiles of haproxy-connect taken
	// during the workloads that support it.
	ProfileDir string
	// Contenders, when set, keeps only the contenders whose name contains
	// one of these (case-insensitive): for focused runs while developing.
	// A run written to BENCHMARKS.md leaves it empty.
	Contenders []string
	Report     *Report
}

// Wants reports whether the contender called name takes part in this run.
func (b *Bench) Wants(name string) bool {
	if len(b.Contenders) == 0 {
		return true
	}
	for _, c := range b.Contenders {
		if strings.Contains(strings.ToLower(name), strings.ToLower(c)) {
			return true
		}
	}
	return false
}

// Workload is one named part of the run; it adds its sections to
// b.Report.
type Workload struct {
	Name string
	Run  func(ctx context.Context, b *Bench) error
}

// RunWorkload runs w in an Env of its own (Env.Fresh) and stops
// everything w started before it returns, so that no workload measures
// beside another's processes.
func (b *Bench) RunWorkload(ctx context.Context, w Workload) error {
	root := b.Env
	b.Env = root.Fresh()
	defer func() {
		b.Env.Close()
		b.Env = root
	}()
	return w.Run(ctx, b)
}

// Contender is one system under test, started fresh for each measurement
// and stopped after it. Workloads keep what they measure through it
// (ports, observers) in their own types.
type Contender interface {
	Name() string
	Start(ctx context.Context) error
	Stop()
}

// Mirrored is the order of one round: the contenders rotated by round (so
// that none always goes first), then the same in reverse (ABCD DCBA). Each
// contender runs twice, and the mean time of its two runs is the round's
// middle for all of them: a drift of the shared machine during the round
// weighs on every contender alike.
func Mirrored[T any](cs []T, round int) []T {
	n := len(cs)
	out := make([]T, 0, 2*n)
	for i := range n {
		out = append(out, cs[(i+round)%n])
	}
	for i := n - 1; i >= 0; i-- {
		out = append(out, out[i])
	}
	return out
}
