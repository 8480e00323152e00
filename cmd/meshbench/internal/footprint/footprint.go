// Package footprint is the footprint workload: one haproxy-connect sidecar
// with many upstreams and endpoints under churn, its CPU and memory.
package footprint

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// Run: one haproxy-connect sidecar with 50 upstreams and 1 000
// endpoints in all, under churn; the controller's CPU seconds and peak RSS
// (from /proc), HAProxy's own memory, and the HAProxy worker count sampled
// every 250 ms (old workers must not pile up: churn never reloads).
func Run(ctx context.Context, b *bench.Bench) error {
	const upstreams, perUpstream = 50, 20
	churnFor := 30 * time.Second
	if b.Quick {
		churnFor = 5 * time.Second
	}
	const churnRate = 100 // changes per second
	sec := b.Report.Add(fmt.Sprintf("Footprint: %d upstreams, %d endpoints, churn at %d changes/s for %s", upstreams, upstreams*perUpstream, churnRate, churnFor),
		"round", "start to ready", "start to all served", "changes", "changes/s", "startup CPU", "churn CPU", "churn CPU per 1 000 changes", "sidecar peak memory", "controller peak RSS", "HAProxy worker RSS", "workers (max seen)", "reloads")
	var cpuPer1k, peak, mem bench.Rounds
	for round := 1; round <= b.Rounds; round++ {
		r, err := measureRound(ctx, b, upstreams, perUpstream, churnFor, churnRate)
		if err != nil {
			return err
		}
		cpuPer1k = append(cpuPer1k, r.cpu.Seconds()/float64(r.changes)*1000)
		peak = append(peak, float64(r.peakRSS))
		mem = append(mem, float64(r.peakMem))
		sec.Row(fmt.Sprint(round), bench.Dur(r.ready.Seconds()), bench.Dur(r.serving.Seconds()), fmt.Sprint(r.changes), bench.Num(r.rate), bench.Dur(r.startCPU.Seconds()), bench.Dur(r.cpu.Seconds()), bench.Dur(r.cpu.Seconds()/float64(r.changes)*1000),
			bench.MiB(float64(r.peakMem)), bench.MiB(float64(r.peakRSS)), bench.MiB(float64(r.workerRSS)), fmt.Sprint(r.maxWorkers), fmt.Sprint(r.reloads))
	}
	sec.Note("Median over %d rounds: whole-sidecar CPU %s per 1 000 endpoint changes; whole-sidecar peak memory %s (target %s), controller peak RSS %s.",
		b.Rounds, cpuPer1k.Format(bench.Dur), mem.Format(bench.MiB), bench.Target(mem.Median(), 64<<20, bench.MiB), peak.Format(bench.MiB))
	sec.Note("Sidecar = the process tree of haproxy-connect: the controller (watches, planner, runtime client, SPOE agent), the HAProxy master and its workers, at the sidecar's defaults (access logs on). CPU is user + system time from /proc/<pid>/stat of every process in the tree, plus the time of children they reaped (old workers). Start to ready: from starting haproxy-connect to its /readyz answering 200 (polled every 10 ms); start to all served: to `show servers state` on a worker-level stats socket added for the benchmark (bench.ObservedHAProxy) listing all 1 000 endpoints in service (polled every 10 ms; each endpoint is proven by a TLS handshake before it is placed). Startup CPU is until HAProxy serves all 1 000 endpoints; churn CPU is the rest. Sidecar peak memory is the largest sum of the tree's Pss (proportional set size: pages the master shares with its forked workers counted once), sampled every 250 ms from start to end; the target is 64 MB for the whole sidecar at 1 000 endpoints. Controller peak RSS is the haproxy-connect process's own VmHWM. Changes are issued on a 100/s ticker, each in its own goroutine (Consul's register call takes longer than 10 ms under load). HAProxy worker RSS is the current worker's VmRSS at the end (50 backends of TLS server slots). Workers are counted from the master's `show proc` every 250 ms.")
	return nil
}

type result struct {
	changes, maxWorkers, reloads int
	rate                         float64 // changes per second reached
	cpu, startCPU                time.Duration
	peakRSS, workerRSS           int64
	peakMem                      int64 // the whole sidecar's (bench.PeakMem)
	// ready is from starting the sidecar to its /readyz answering 200;
	// serving, to HAProxy serving every endpoint.
	ready, serving time.Duration
}

func measureRound(ctx context.Context, b *bench.Bench, upstreams, perUpstream int, churnFor time.Duration, rate int) (result, error) {
	var res result
	env := b.Fresh()
	defer env.Close()
	consul, err := env.StartConsul(testenv.ConsulOptions{})
	if err != nil {
		return res, err
	}
	c := consul.Client
	ports, err := env.Ports(upstreams + 3)
	if err != nil {
		return res, err
	}
	// Endpoints: connect-proxy instances of svc<i>, passing at once, each
	// on a node of its own in the catalog, as instances on other hosts are
	// (the churn workload explains why not on the local agent: each local
	// connect-proxy starts the agent's per-proxy machinery, and 1 000 of
	// them overloaded it here so that its catalog sync lagged by minutes).
	// Each listens with a leaf of its service (fetched from Consul's CA)
	// and only completes TLS handshakes: the sidecar proves an endpoint's
	// identity with a handshake before it places it, and an endpoint that
	// cannot be reached is never placed. No traffic is sent: this workload
	// measures the control plane.
	endpoint := func(svc, j int) (*api.CatalogRegistration, *api.CatalogDeregistration) {
		name := fmt.Sprintf("svc%02d", svc)
		id, node, addr := fmt.Sprintf("%s-ep%03d", name, j), fmt.Sprintf("%s-node%03d", name, j), fmt.Sprintf("127.1.%d.%d", svc, j+1)
		return &api.CatalogRegistration{Node: node, Address: addr,
				Service: &api.AgentService{ID: id, Service: name + "-sidecar-proxy", Kind: api.ServiceKindConnectProxy,
					Address: addr, Port: 20000, Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: name}},
				Check: &api.AgentCheck{Node: node, CheckID: "alive", Name: "alive", Status: api.HealthPassing, ServiceID: id}},
			&api.CatalogDeregistration{Node: node, ServiceID: id}
	}
	if err := serveEndpoints(env, c, upstreams, perUpstream); err != nil {
		return res, err
	}
	if err := bench.Parallel(8, upstreams*perUpstream, func(k int) error {
		reg, _ := endpoint(k/perUpstream, k%perUpstream)
		_, err := c.Catalog().Register(reg, nil)
		return err
	}); err != nil {
		return res, fmt.Errorf("register endpoints: %w", err)
	}
	var ups []api.Upstream
	for i := 0; i < upstreams; i++ {
		ups = append(ups, api.Upstream{DestinationName: fmt.Sprintf("svc%02d", i), LocalBindPort: ports[3+i]})
	}
	if err := bench.RegisterWithSidecar(c, "client", ports[0], ports[1], nil, ups...); err != nil {
		return res, err
	}
	started := time.Now()
	sc, err := env.StartObservedSidecar(consul, "client")
	if err != nil {
		return res, err
	}
	res.ready = time.Since(started)
	pid := sc.Cmd.Process.Pid
	stopPeak := bench.PeakMem(ctx, pid, 250*time.Millisecond)
	defer stopPeak()
	// Wait until HAProxy serves all 1 000 endpoints, read on the worker's
	// observation socket, not on the master socket the sidecar steers
	// HAProxy with.
	if err := bench.WaitFor(ctx, 60*time.Second, func() error {
		text, err := bench.Command(sc.Observe, "show servers state")
		if err != nil {
			return err
		}
		st, err := runtime.ParseServersState(text)
		if err != nil {
			return err
		}
		n := 0
		for _, s := range st {
			if strings.HasPrefix(s.Backend, "up_") && !s.Maint() {
				n++
			}
		}
		if n != upstreams*perUpstream {
			return fmt.Errorf("%d of %d endpoints in service", n, upstreams*perUpstream)
		}
		return nil
	}); err != nil {
		return res, err
	}
	res.serving = time.Since(started)
	before, err := sc.RT.Procs(ctx)
	if err != nil {
		return res, err
	}
	atStart, err := bench.Tree(pid)
	if err != nil {
		return res, err
	}
	res.startCPU = atStart.CPU

	var profiled <-chan error
	if b.ProfileDir != "" {
		profiled = sc.Profile(b.ProfileDir, "footprint-churn", churnFor)
	}
	// Sample the worker count while churning.
	stopSampling := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stopSampling:
				return
			case <-t.C:
			}
			if pl, err := sc.RT.Procs(ctx); err == nil {
				res.maxWorkers = max(res.maxWorkers, len(pl.Workers))
			}
		}
	}()

	// Churn: each tick deregisters a random live endpoint or re-registers
	// a missing one, keeping about 10 % of them out. The Consul call runs in
	// its own goroutine so a slow call does not lower the rate, at most 32
	// at once (Consul refuses more than 200 connections per client, 429):
	// when they are all busy the tick waits, and the rate reached is
	// reported.
	var mu sync.Mutex
	var churnErr error
	var calls sync.WaitGroup
	out := map[int]bool{}
	busy := map[int]bool{}
	inflight := make(chan struct{}, 32)
	churnStart := time.Now()
	tick := time.NewTicker(time.Second / time.Duration(rate))
	end := time.Now().Add(churnFor)
	for time.Now().Before(end) && ctx.Err() == nil {
		<-tick.C
		mu.Lock()
		k := rand.IntN(upstreams * perUpstream)
		if len(out) >= upstreams*perUpstream/10 {
			for o := range out { // at the limit: bring one back
				k = o
				break
			}
		}
		if busy[k] {
			mu.Unlock()
			continue
		}
		busy[k] = true
		wasOut := out[k]
		mu.Unlock()
		res.changes++
		calls.Add(1)
		inflight <- struct{}{}
		go func() {
			defer calls.Done()
			defer func() { <-inflight }()
			reg, dereg := endpoint(k/perUpstream, k%perUpstream)
			var err error
			if wasOut {
				_, err = c.Catalog().Register(reg, nil)
			} else {
				_, err = c.Catalog().Deregister(dereg, nil)
			}
			mu.Lock()
			defer mu.Unlock()
			delete(busy, k)
			if err != nil {
				churnErr = err
				return
			}
			if wasOut {
				delete(out, k)
			} else {
				out[k] = true
			}
		}()
	}
	tick.Stop()
	calls.Wait()
	res.rate = float64(res.changes) / time.Since(churnStart).Seconds()
	if churnErr != nil {
		return res, churnErr
	}
	time.Sleep(time.Second) // let the last changes land
	close(stopSampling)
	wg.Wait()
	if profiled != nil {
		if err := <-profiled; err != nil {
			b.Logf("profile: %v", err)
		}
	}

	u, err := bench.Tree(pid)
	if err != nil {
		return res, err
	}
	res.cpu, res.peakMem = u.CPU-res.startCPU, stopPeak().Mem
	ctl, err := bench.Usage(pid)
	if err != nil {
		return res, err
	}
	res.peakRSS = ctl.PeakRSS
	after, err := sc.RT.Procs(ctx)
	if err != nil {
		return res, err
	}
	res.reloads = after.Master.Reloads - before.Master.Reloads
	if cur, ok := after.Current(); ok {
		if wu, err := bench.Usage(cur.PID); err == nil {
			res.workerRSS = wu.RSS
		}
	}
	return res, nil
}

// serveEndpoints listens on every endpoint's address (127.1.<svc>.<j+1>,
// port 20000) with a leaf certificate of svc<svc> and completes TLS
// handshakes there until env closes.
func serveEndpoints(env *bench.Env, c *api.Client, upstreams, perUpstream int) error {
	for svc := range upstreams {
		addrs := make([]string, perUpstream)
		for j := range addrs {
			addrs[j] = fmt.Sprintf("127.1.%d.%d:20000", svc, j+1)
		}
		if err := env.ServeHandshakes(c, fmt.Sprintf("svc%02d", svc), addrs); err != nil {
			return err
		}
	}
	return nil
}
