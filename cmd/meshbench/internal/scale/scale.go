// Package scale is the workload "scale": one haproxy-connect sidecar with
// one upstream of 1 000 and of 10 000 endpoints, and with 100 upstreams:
// time from start to ready and to every endpoint served, whole-sidecar
// peak memory, and, in the one-upstream cases, propagation at 100
// changes/s observed on a worker-level stats socket.
package scale

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// shape is one case: upstreams of perUpstream endpoints each; churn says
// whether propagation is measured (one upstream only).
type shape struct {
	name                   string
	upstreams, perUpstream int
	churn                  bool
}

func shapes(quick bool) []shape {
	if quick {
		return []shape{{"1 upstream, 1 000 endpoints", 1, 1000, true}, {"100 upstreams, 10 endpoints each", 100, 10, false}}
	}
	return []shape{
		{"1 upstream, 1 000 endpoints", 1, 1000, true},
		{"1 upstream, 10 000 endpoints", 1, 10000, true},
		{"100 upstreams, 10 endpoints each", 100, 10, false},
	}
}

// changeRate is the propagation pass's changes per second; HAProxy is
// polled at bench.PollPeriod, as in the churn workload.
const changeRate = 100

// figures are one case's rounds.
type figures struct {
	ready, served, mem, ctlMem, p50, p99, max, consulP99, poll, cpuPer1k bench.Rounds
	unseen, changes                                                      int
}

// Run measures every shape, one fresh Consul and sidecar per shape and
// round.
func Run(ctx context.Context, b *bench.Bench) error {
	churnFor := 20 * time.Second
	if b.Quick {
		churnFor = 5 * time.Second
	}
	sec := b.Report.Add("Scale: one sidecar, large upstreams",
		"case", "start to ready", "start to all served", "sidecar peak memory", "of which controller", "propagation p50", "p99", "max",
		"Consul p99 (same pass)", "p99 ÷ Consul p99", "poll interval", "CPU s / 1000 changes", "never in effect")
	var targets []string
	for _, sh := range shapes(b.Quick) {
		f := &figures{}
		for round := 0; round < b.Rounds; round++ {
			b.Logf("scale: round %d/%d, %s", round+1, b.Rounds, sh.name)
			if err := measure(ctx, b, sh, churnFor, f); err != nil {
				return fmt.Errorf("%s: %w", sh.name, err)
			}
		}
		dash := func(r bench.Rounds, fm func(float64) string) string {
			if len(r) == 0 {
				return "—"
			}
			return r.Format(fm)
		}
		unseen := "—"
		if sh.churn {
			unseen = fmt.Sprintf("%d / %d", f.unseen, f.changes)
		}
		sec.Row(sh.name, f.ready.Format(bench.Dur), f.served.Format(bench.Dur), f.mem.Format(bench.MiB), f.ctlMem.Format(bench.MiB),
			dash(f.p50, bench.Dur), dash(f.p99, bench.Dur), dash(f.max, bench.Dur), dash(f.consulP99, bench.Dur),
			ratio(f.p99, f.consulP99), dash(f.poll, bench.Dur),
			dash(f.cpuPer1k, func(v float64) string { return fmt.Sprintf("%.2f", v) }), unseen)
		switch {
		case sh.upstreams == 1 && sh.perUpstream == 1000:
			targets = append(targets, "whole-sidecar memory at 1 000 endpoints "+bench.Target(f.mem.Median(), 64<<20, bench.MiB))
		case sh.upstreams == 1 && sh.perUpstream == 10000:
			targets = append(targets, "propagation p99 at 100 changes/s with 10 000 endpoints "+bench.Target(f.p99.Median(), 0.1, bench.Dur)+
				fmt.Sprintf(" (Consul's own notification in the same pass: p99 %s)", bench.Dur(f.consulP99.Median())))
		}
	}
	if len(targets) > 0 {
		sec.Note("Targets (medians over rounds of this run): %s.", strings.Join(targets, "; "))
	}
	sec.Note("Each case and round: a fresh Consul dev agent; the endpoints are connect-proxy instances written to the catalog, each on a node of its own (instances on other hosts), each listening on its own loopback address with a leaf of its service from Consul's CA and completing TLS handshakes (the sidecar proves an endpoint's identity with a handshake before it places it); a client registered with the upstreams; one haproxy-connect sidecar at its defaults, started when all endpoints are registered. Start to ready: to /readyz answering 200; start to all served: to `show servers state` on a worker-level stats socket added for the benchmark (bench.ObservedHAProxy, not the master socket the sidecar steers HAProxy with) listing every endpoint in service, both polled every 10 ms. Sidecar peak memory: the largest sum of Pss over the sidecar's process tree (controller, HAProxy master, workers), sampled every 250 ms from start to end; of which controller: haproxy-connect's own Pss in that peak sample (the rest is HAProxy's master and workers).")
	sec.Note("Propagation (one-upstream cases): for %s after all are served, one change every 10 ms (%d/s): first deregistrations of distinct endpoints, then their registrations again, each timed from Consul's write acknowledgement to the first poll of `show servers state <backend>` on the worker socket that shows it (in service with its address and port, or gone); polls as in the churn workload (one per %s at most, never more than half of the time busy), so a figure is an upper bound by up to one poll interval, shown. Consul p99: Consul's own notification of the same changes, a blocking query on health/connect/big000 (passing only, no gzip, addresses and ports read with fastjson) run through the same pass on the same agent, matched to the changes the same way; p99 ÷ Consul p99 pairs each round's figures. Each answer carries the whole instance list (about 2 KB per instance), so at these sizes Consul's own answer is the bulk of the work, and two watchers (the sidecar's and this one) share the 2 CPUs with Consul and HAProxy. CPU s / 1000 changes: the sidecar's whole process tree, from the first change to the last one observed. With 10 000 servers a poll takes several milliseconds: read the poll interval with the figures.", churnFor, changeRate, bench.PollPeriod)
	return nil
}

// ratio is the median of the per-round ratios a ÷ b, or a dash.
func ratio(a, b bench.Rounds) string {
	if len(a) == 0 || len(a) != len(b) {
		return "—"
	}
	return bench.X(bench.PerRound(a, b).Median())
}

// endpointAddr is endpoint j of upstream u: 127.<5+u/250>.<...> so that
// every endpoint of every case has an address of its own.
func endpointAddr(u, j int) string {
	k := u*20000 + j
	return fmt.Sprintf("127.%d.%d.%d", 5+k/62500, k/250%250, k%250+1)
}

const endpointPort = 20000

// endpoint is one registration of the case.
type endpoint struct {
	key   string
	reg   *api.CatalogRegistration
	dereg *api.CatalogDeregistration
}

func endpoints(sh shape) [][]endpoint {
	out := make([][]endpoint, sh.upstreams)
	for u := range sh.upstreams {
		name := fmt.Sprintf("big%03d", u)
		for j := range sh.perUpstream {
			addr := endpointAddr(u, j)
			id, node := fmt.Sprintf("%s-ep%05d", name, j), fmt.Sprintf("%s-node%05d", name, j)
			out[u] = append(out[u], endpoint{key: net.JoinHostPort(addr, strconv.Itoa(endpointPort)),
				reg: &api.CatalogRegistration{Node: node, Address: addr,
					Service: &api.AgentService{ID: id, Service: name + "-sidecar-proxy", Kind: api.ServiceKindConnectProxy,
						Address: addr, Port: endpointPort, Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: name}},
					Check: &api.AgentCheck{Node: node, CheckID: "alive", Name: "alive", Status: api.HealthPassing, ServiceID: id}},
				dereg: &api.CatalogDeregistration{Node: node, ServiceID: id}})
		}
	}
	return out
}

// serve listens on every endpoint's address with a leaf of its upstream's
// service and completes TLS handshakes until env closes.
func serve(env *bench.Env, c *api.Client, eps [][]endpoint) error {
	for u, ups := range eps {
		addrs := make([]string, len(ups))
		for j, e := range ups {
			addrs[j] = e.key
		}
		if err := env.ServeHandshakes(c, fmt.Sprintf("big%03d", u), addrs); err != nil {
			return err
		}
	}
	return nil
}

// inService reads the servers in service (address:port) of backend, or of
// every upstream backend when backend is "", on the worker socket.
func inService(sock, backend string) (map[string]bool, error) {
	text, err := bench.Command(sock, strings.TrimSpace("show servers state "+backend))
	if err != nil {
		return nil, err
	}
	st, err := runtime.ParseServersState(text)
	if err != nil {
		return nil, err
	}
	out := make(map[string]bool, len(st))
	for _, s := range st {
		if strings.HasPrefix(s.Backend, "up_") && !s.Maint() {
			out[net.JoinHostPort(s.Addr, strconv.Itoa(s.Port))] = true
		}
	}
	return out, nil
}

func measure(ctx context.Context, b *bench.Bench, sh shape, churnFor time.Duration, f *figures) error {
	env := b.Fresh()
	defer env.Close()
	consul, err := env.StartConsul(testenv.ConsulOptions{})
	if err != nil {
		return err
	}
	c := consul.Client
	eps := endpoints(sh)
	if err := serve(env, c, eps); err != nil {
		return err
	}
	var all []endpoint
	for _, ups := range eps {
		all = append(all, ups...)
	}
	if err := bench.Parallel(16, len(all), func(k int) error {
		_, err := c.Catalog().Register(all[k].reg, nil)
		return err
	}); err != nil {
		return fmt.Errorf("register endpoints: %w", err)
	}
	ports, err := env.Ports(sh.upstreams + 2)
	if err != nil {
		return err
	}
	var ups []api.Upstream
	for u := range sh.upstreams {
		ups = append(ups, api.Upstream{DestinationName: fmt.Sprintf("big%03d", u), LocalBindPort: ports[2+u]})
	}
	if err := bench.RegisterWithSidecar(c, "client", ports[0], ports[1], nil, ups...); err != nil {
		return err
	}
	started := time.Now()
	sc, err := env.StartObservedSidecar(consul, "client")
	if err != nil {
		return err
	}
	f.ready = append(f.ready, time.Since(started).Seconds())
	pid := sc.Cmd.Process.Pid
	stopPeak := bench.PeakMem(ctx, pid, 250*time.Millisecond)
	defer stopPeak()
	want := len(all)
	if err := bench.WaitFor(ctx, 10*time.Minute, func() error {
		in, err := inService(sc.Observe, "")
		if err != nil {
			return err
		}
		if len(in) != want {
			return fmt.Errorf("%d of %d endpoints in service", len(in), want)
		}
		return nil
	}); err != nil {
		return err
	}
	f.served = append(f.served, time.Since(started).Seconds())
	if sh.churn {
		name := ""
		if b.ProfileDir != "" {
			name = fmt.Sprintf("scale-%d-%d-round%d", sh.upstreams, sh.perUpstream, len(f.p99)+1)
		}
		if err := propagate(ctx, c, consul.Addr, sc, eps[0], churnFor, b.ProfileDir, name, f); err != nil {
			return err
		}
	}
	peak := stopPeak()
	f.mem = append(f.mem, float64(peak.Mem))
	f.ctlMem = append(f.ctlMem, float64(peak.RootMem))
	return nil
}

// propagate removes, then adds back, distinct endpoints of ups at
// changeRate, and matches each change with the first poll of HAProxy that
// shows it, and with the first answer of Consul's own blocking query on the
// upstream (the floor, in the same pass).
func propagate(ctx context.Context, c *api.Client, consulAddr string, sc *bench.Sidecar, ups []endpoint, churnFor time.Duration, profileDir, profileName string, f *figures) error {
	n := min(int(churnFor.Seconds()*changeRate)/2, len(ups)/2)
	seen, consul := bench.NewTimeline(), bench.NewTimeline()
	pctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		bench.PollLoop(pctx, func(context.Context) (map[string]bool, error) { return inService(sc.Observe, "up_big000") }, seen)
	}()
	go func() {
		defer wg.Done()
		bench.WatchConsul(pctx, consulAddr, true, "big000", consul.Observe)
	}()
	stop := func() { cancel(); wg.Wait() }
	want := map[string]bool{}
	for _, e := range ups {
		want[e.key] = true
	}
	// Both observers start from the whole set, so that every change of the
	// pass is a transition of theirs.
	if err := bench.WaitFor(ctx, time.Minute, func() error {
		if err := seen.Check(want); err != nil {
			return fmt.Errorf("HAProxy: %w", err)
		}
		return consul.Check(want)
	}); err != nil {
		stop()
		return err
	}
	seen.Restart()
	consul.Restart()
	cpu0, err := bench.Tree(sc.Cmd.Process.Pid)
	if err != nil {
		stop()
		return err
	}
	var profiled <-chan error
	if profileDir != "" {
		// The heap with every endpoint served, before the churn: what
		// the controller's share of the memory figure holds.
		if err := sc.HeapProfile(profileDir, profileName+"-heap"); err != nil {
			stop()
			return err
		}
		profiled = sc.Profile(profileDir, profileName, time.Duration(2*n)*time.Second/changeRate)
	}
	changes := make([]bench.Change, 0, 2*n)
	var cmu sync.Mutex
	var werr error
	var calls sync.WaitGroup
	tick := time.NewTicker(time.Second / changeRate)
	for k := 0; k < 2*n && ctx.Err() == nil; k++ {
		<-tick.C
		e, add := ups[k%n], k >= n
		calls.Add(1)
		go func() {
			defer calls.Done()
			start := time.Now()
			var err error
			if add {
				_, err = c.Catalog().Register(e.reg, nil)
			} else {
				_, err = c.Catalog().Deregister(e.dereg, nil)
			}
			now := time.Now()
			cmu.Lock()
			defer cmu.Unlock()
			if err != nil {
				werr = err
				return
			}
			changes = append(changes, bench.Change{Key: e.key, Add: add, Ack: now, Took: now.Sub(start)})
		}()
	}
	tick.Stop()
	calls.Wait()
	if werr != nil {
		stop()
		return werr
	}
	// The end state: every endpoint back in service.
	endErr := bench.WaitFor(ctx, time.Minute, func() error { return seen.Check(want) })
	stop()
	if endErr != nil {
		return fmt.Errorf("after the changes: %w", endErr)
	}
	cpu1, err := bench.Tree(sc.Cmd.Process.Pid)
	if err != nil {
		return err
	}
	if profiled != nil {
		if err := <-profiled; err != nil {
			return fmt.Errorf("profile: %w", err)
		}
	}
	lat, unseen := bench.Match(changes, seen.Transitions())
	clat, _ := bench.Match(changes, consul.Transitions())
	f.unseen += unseen
	f.changes += len(changes)
	if len(lat) > 0 && len(clat) > 0 {
		f.p50 = append(f.p50, lat.Percentile(50))
		f.p99 = append(f.p99, lat.Percentile(99))
		f.max = append(f.max, lat.Max())
		f.consulP99 = append(f.consulP99, clat.Percentile(99))
	}
	if iv := seen.MeanInterval(); iv > 0 {
		f.poll = append(f.poll, iv.Seconds())
	}
	if len(changes) > 0 {
		f.cpuPer1k = append(f.cpuPer1k, (cpu1.CPU-cpu0.CPU).Seconds()/float64(len(changes))*1000)
	}
	return nil
}
