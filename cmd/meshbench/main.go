// Command meshbench measures haproxy-connect against what a user would pick
// instead (consul-template + reload, HAProxy DNS SRV resolvers, Consul's
// built-in proxy), with no proxy and Consul's own notification latency as
// the limits, all on loopback in one run, and writes BENCHMARKS.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/haproxy-connect/haproxy-connect/testenv"
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

type workload struct {
	name string
	run  func(ctx context.Context, b *Bench) error
}

// workloads register themselves (init in their files); they run in
// workloadOrder, each adding its sections to the report.
var workloads []workload

var workloadOrder = []string{"churn", "runtime", "datapath", "authz", "l7", "footprint"}

func main() {
	rounds := flag.Int("rounds", 3, "rounds per figure (median, min and max are reported)")
	only := flag.String("only", "", "comma-separated workloads to run (default: all)")
	quick := flag.Bool("quick", false, "fewer samples per round, for a smoke run")
	md := flag.String("md", "", "write the report as Markdown to this file (e.g. BENCHMARKS.md)")
	dir := flag.String("dir", "", "work directory (default: a new temp dir, removed at the end)")
	profile := flag.String("profile", "", "save CPU profiles of haproxy-connect under this directory")
	contenders := flag.String("contenders", "", "comma-separated name fragments: run only the contenders matching one (churn, datapath)")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *rounds, *only, *quick, *md, *dir, *profile, *contenders); err != nil {
		fmt.Fprintln(os.Stderr, "meshbench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, rounds int, only string, quick bool, md, dir, profile, contenders string) error {
	env := &Env{}
	var err error
	if env.HAProxy, err = testenv.FindBinary("haproxy", "HAPROXY_BIN", "/usr/sbin/haproxy"); err != nil {
		return err
	}
	if env.Consul, err = testenv.FindBinary("consul", "CONSUL_BIN"); err != nil {
		return err
	}
	if env.Sidecar, err = testenv.FindBinary("haproxy-connect", "SIDECAR_BIN"); err != nil {
		return err
	}
	env.ConsulTemplate, _ = testenv.FindBinary("consul-template", "CONSUL_TEMPLATE_BIN")
	env.Wrk, _ = testenv.FindBinary("wrk", "WRK_BIN")
	if dir == "" {
		if dir, err = os.MkdirTemp("/tmp", "mb"); err != nil {
			return err
		}
		defer os.RemoveAll(dir)
	}
	env.Dir = dir
	defer env.Close()

	b := &Bench{Env: env, Rounds: rounds, Quick: quick, ProfileDir: profile, Report: &Report{
		Command: "make bench (" + strings.Join(os.Args, " ") + ")", Started: time.Now(), Versions: versions(env),
	}}
	for _, c := range strings.Split(contenders, ",") {
		if c = strings.TrimSpace(c); c != "" {
			b.Contenders = append(b.Contenders, c)
		}
	}
	selected := map[string]bool{}
	for _, w := range strings.Split(only, ",") {
		if w = strings.TrimSpace(w); w != "" {
			selected[w] = true
		}
	}
	var failed []string
	slices.SortStableFunc(workloads, func(a, b workload) int {
		return slices.Index(workloadOrder, a.name) - slices.Index(workloadOrder, b.name)
	})
	for _, w := range workloads {
		if len(selected) > 0 && !selected[w.name] {
			continue
		}
		env.Logf("workload %s", w.name)
		start := time.Now()
		// A failed workload is reported and the others still run: the
		// report is written, and meshbench exits non-zero at the end.
		if err := w.run(ctx, b); err != nil {
			env.Logf("workload %s failed: %v", w.name, err)
			b.Report.Add(fmt.Sprintf("Workload %s FAILED", w.name)).Note("%v", err)
			failed = append(failed, w.name)
		} else {
			env.Logf("workload %s done in %s", w.name, time.Since(start).Round(time.Second))
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	b.Report.Text(os.Stdout)
	if md != "" {
		if err := writeBenchmarksMD(md, b.Report); err != nil {
			return err
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("workloads failed: %s", strings.Join(failed, ", "))
	}
	return nil
}

func versions(e *Env) []string {
	first := func(bin string, args ...string) string {
		if bin == "" {
			return "not installed"
		}
		out, err := exec.Command(bin, args...).CombinedOutput()
		if err != nil && len(out) == 0 { // wrk -v prints its version and exits 1
			return "unknown (" + err.Error() + ")"
		}
		return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	}
	cpus := "?"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				cpus = strings.TrimSpace(strings.SplitN(l, ":", 2)[1])
				break
			}
		}
	}
	return []string{
		"HAProxy: " + first(e.HAProxy, "-v"),
		"Consul: " + first(e.Consul, "version"),
		"consul-template: " + first(e.ConsulTemplate, "-version"),
		"wrk: " + first(e.Wrk, "-v"),
		"Go: " + runtime.Version(),
		fmt.Sprintf("Machine: %d CPUs (%s), %s/%s", runtime.NumCPU(), cpus, runtime.GOOS, runtime.GOARCH),
	}
}
