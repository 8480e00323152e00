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
	"strings"
	"syscall"
	"time"

	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/authz"
	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/churn"
	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/datapath"
	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/footprint"
	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/l7"
	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/routing"
	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/runtimecost"
	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/scale"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// workloads run in this order, each adding its sections to the report.
var workloads = []bench.Workload{
	{Name: "churn", Run: churn.Run},
	{Name: "runtime", Run: runtimecost.Run},
	{Name: "datapath", Run: datapath.Run},
	{Name: "authz", Run: authz.Run},
	{Name: "l7", Run: l7.Run},
	{Name: "routing", Run: routing.Run},
	{Name: "footprint", Run: footprint.Run},
	{Name: "scale", Run: scale.Run},
}

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
	env := &bench.Env{}
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
	env.Profiling = profile != ""
	defer env.Close()

	b := &bench.Bench{Env: env, Rounds: rounds, Quick: quick, ProfileDir: profile, Report: &bench.Report{
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
	for _, w := range workloads {
		if len(selected) > 0 && !selected[w.Name] {
			continue
		}
		env.Logf("workload %s", w.Name)
		start := time.Now()
		// A failed workload is reported and the others still run: the
		// report is written, and meshbench exits non-zero at the end.
		if err := b.RunWorkload(ctx, w); err != nil {
			env.Logf("workload %s failed: %v", w.Name, err)
			b.Report.Add(fmt.Sprintf("Workload %s FAILED", w.Name)).Note("%v", err)
			failed = append(failed, w.Name)
		} else {
			env.Logf("workload %s done in %s", w.Name, time.Since(start).Round(time.Second))
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	b.Report.Text(os.Stdout)
	if md != "" {
		if err := bench.WriteBenchmarksMD(md, b.Report); err != nil {
			return err
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("workloads failed: %s", strings.Join(failed, ", "))
	}
	return nil
}

func versions(e *bench.Env) []string {
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
