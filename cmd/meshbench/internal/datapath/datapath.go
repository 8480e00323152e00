// Package datapath is the data path workload: request rate and latency of HTTP through client
// sidecar -> server sidecar -> app, with keep-alive and with a new
// connection per request, and bulk TCP throughput, for haproxy-connect,
// Consul's built-in proxy and no proxy at all.
package datapath

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// Contender names, as the tables show them.
const (
	contHC      = "haproxy-connect"
	contHC2     = "haproxy-connect, 2 threads"
	contHCTCP   = "haproxy-connect, tcp mode"
	contBuiltin = "consul built-in"
	contDirect  = "direct"
)

// rowOrder is the order of the tables' rows.
var rowOrder = []string{contDirect, contBuiltin, contHC, contHC2, contHCTCP}

var (
	modes = []bench.HTTPMode{bench.ModeKeepAlive, bench.ModeNewConn}
	// clients are the concurrent connections wrk keeps open.
	clients = []int{1, 16, 128}
)

// target is one started contender: where the load goes, and how many
// connections its server side has accepted so far.
type target struct {
	httpPort, bulkPort int
	// inbound counts connections accepted by the server side: the server
	// sidecar's mTLS sessions for haproxy-connect, the app's connections
	// for the built-in proxy (it dials the app once per inbound mTLS
	// connection) and for direct.
	inbound func() (int64, error)
	// authz counts the server sidecar's authorization decisions (nil
	// when the contender does not report them).
	authz func() (int64, error)
	// procs are the proxy processes whose trees' CPU the load costs (the
	// client's and the server's); none for direct.
	procs []*bench.Proc
	stop  func() error
}

// cpu is the CPU time the target's proxy process trees have used so far,
// and the part of it in the kernel.
func (t *target) cpu() (all, sys time.Duration, err error) {
	for _, p := range t.procs {
		u, err := bench.Tree(p.Cmd.Process.Pid)
		if err != nil {
			return 0, 0, err
		}
		all += u.CPU
		sys += u.Sys
	}
	return all, sys, nil
}

// contender is one way of carrying the load (a bench.Contender): Start
// brings its target up, Stop takes it down and keeps the error.
type contender struct {
	name    string
	start   func(ctx context.Context) (*target, error)
	t       *target
	stopErr error
}

// Name is the contender's name in the tables.
func (c *contender) Name() string { return c.name }

// Start starts the contender fresh.
func (c *contender) Start(ctx context.Context) (err error) {
	c.t, err = c.start(ctx)
	return err
}

// Stop stops the contender; the error is kept in stopErr.
func (c *contender) Stop() {
	if c.t != nil {
		c.stopErr = c.t.stop()
		c.t = nil
	}
}

var _ bench.Contender = (*contender)(nil)

// row is one table row: a contender, a mode and a concurrency.
type row struct {
	contender, mode string
	clients         int
}

// figures are a cell's figures, one per round.
type figures struct {
	rps, p50, p99, connsPerReq, authzPerReq bench.Rounds
	cpuPer1k                                bench.Rounds // proxy CPU seconds per 1000 requests
	sysPer1k                                bench.Rounds // of which in the kernel
	p999                                    bench.Rounds // open loop only, where a run has 1000 samples
	requests, errors                        int64
	firstErr                                string
}

// addRound appends one round's figures: the mean of each series of r
// (the round's measurements of the cell) and r's counts.
func (f *figures) addRound(r *figures) {
	for _, p := range []struct{ to, from *bench.Rounds }{
		{&f.rps, &r.rps}, {&f.p50, &r.p50}, {&f.p99, &r.p99}, {&f.connsPerReq, &r.connsPerReq},
		{&f.authzPerReq, &r.authzPerReq}, {&f.cpuPer1k, &r.cpuPer1k}, {&f.sysPer1k, &r.sysPer1k}, {&f.p999, &r.p999},
	} {
		if len(*p.from) > 0 {
			*p.to = append(*p.to, bench.Mean(*p.from))
		}
	}
	f.requests += r.requests
	f.errors += r.errors
	if f.firstErr == "" {
		f.firstErr = r.firstErr
	}
}

// cellTime is how long wrk runs for one measurement of a cell: half of
// the usual cell time, since each contender is measured twice a round.
func cellTime(b *bench.Bench) time.Duration { return b.WrkTime() / 2 }

// setup is what the contenders share: one Consul agent with the
// registrations and the in-process apps.
type setup struct {
	b      *bench.Bench
	consul *testenv.ConsulProc
	http   *bench.CountingApp
	bulk   int // bulk app port
	// Registered ports: the server's, server-tcp's and bulk's sidecar
	// public listeners, the client sidecar's own public listener, and the
	// client's upstream binds for "server" (http), "server-tcp" (the same
	// app, tcp) and "bulk" (tcp).
	serverSidecar, serverTCPSidecar, bulkSidecar, clientSidecar, upHTTP, upTCP, upBulk int
	// direct is the open-loop generator's own closed-loop rate straight
	// to the app (req/s); capacity is its rate through haproxy-connect
	// (or direct's when haproxy-connect is not run). Both are measured
	// once before the rounds: the open-loop rates are fractions of
	// capacity, because on a small machine a fraction of direct's rate is
	// above what any proxied path carries, and a saturated run measures
	// queueing, not added latency.
	direct, capacity float64
}

// openLoads are the open-loop rates, as fractions of the capacity through
// haproxy-connect.
var openLoads = []float64{0.25, 0.50, 0.75}

// openConns are the keep-alive connections the open-loop generator may
// use: enough that at 75 % of capacity requests seldom wait for one.
const openConns = 64

// openRow is the row key of an open-loop load.
func openRow(name string, load float64) row {
	return row{contender: name, mode: fmt.Sprintf("open %.0f%%", load*100)}
}

// closedLoopRate is the open-loop generator's closed-loop rate to url over
// 16 connections, after a one-second warm-up.
func closedLoopRate(ctx context.Context, b *bench.Bench, url string) (float64, error) {
	bench.ClosedLoop(ctx, url, 16, time.Second)
	res := bench.ClosedLoop(ctx, url, 16, b.WrkTime())
	if res.Rate() <= 0 || res.Failed > 0 {
		return 0, fmt.Errorf("%d ok, %d failed (%v)", res.OK, res.Failed, res.FirstErr)
	}
	return res.Rate(), nil
}

// bulkBytes is the size of one measured bulk transfer.
func bulkBytes(b *bench.Bench) int64 {
	if b.Quick {
		return 64 << 20
	}
	return 256 << 20
}

func Run(ctx context.Context, b *bench.Bench) error {
	if b.Wrk == "" {
		return errors.New("wrk not found (apt-get install -y wrk, or set WRK_BIN)")
	}
	s, err := newSetup(b)
	if err != nil {
		return err
	}
	contenders := []*contender{
		{name: contDirect, start: s.startDirect},
		{name: contBuiltin, start: s.startBuiltin},
		{name: contHC, start: func(ctx context.Context) (*target, error) { return s.startHC(ctx, "server", s.upHTTP) }},
		// The thread-count lever: two HAProxy threads per sidecar, where
		// the default on these 2 CPUs is one.
		{name: contHC2, start: func(ctx context.Context) (*target, error) { return s.startHC(ctx, "server", s.upHTTP, "-threads", "2") }},
		{name: contHCTCP, start: func(ctx context.Context) (*target, error) { return s.startHC(ctx, "server-tcp", s.upTCP) }},
	}
	contenders = slices.DeleteFunc(contenders, func(c *contender) bool { return !b.Wants(c.name) })
	// The open-loop generator's capacity straight to the app and through
	// haproxy-connect, each after a warm-up.
	direct := fmt.Sprintf("http://127.0.0.1:%d/", s.http.Port)
	if s.direct, err = closedLoopRate(ctx, b, direct); err != nil {
		return fmt.Errorf("open-loop generator capacity against the app: %w", err)
	}
	s.capacity = s.direct
	if i := slices.IndexFunc(contenders, func(c *contender) bool { return c.name == contHC }); i >= 0 {
		c := contenders[i]
		if err := c.Start(ctx); err != nil {
			return fmt.Errorf("%s: %w", c.name, err)
		}
		s.capacity, err = closedLoopRate(ctx, b, fmt.Sprintf("http://127.0.0.1:%d/", c.t.httpPort))
		c.Stop()
		if err != nil {
			return fmt.Errorf("open-loop generator capacity through %s: %w", c.name, err)
		}
	}
	b.Logf("datapath: open-loop generator capacity: %.0f req/s straight to the app, %.0f req/s through haproxy-connect", s.direct, s.capacity)
	figs := map[row]*figures{}
	bulk := map[string]bench.Rounds{}
	for r := 0; r < b.Rounds; r++ {
		// Mirrored order within the round (ABCD then DCBA), rotated every
		// round: each contender is measured twice, and the mean of its two
		// halves sits at the round's middle for every contender, so that a
		// drift of the shared machine during the round cancels out of the
		// per-round ratios.
		order := bench.Mirrored(contenders, r)
		roundFigs := map[row]*figures{}
		roundBulk := map[string]bench.Rounds{}
		for i, c := range order {
			b.Logf("datapath round %d/%d, %d/%d: %s", r+1, b.Rounds, i+1, len(order), c.name)
			mbps, err := s.round(ctx, c, roundFigs)
			if err != nil {
				return fmt.Errorf("%s: %w", c.name, err)
			}
			roundBulk[c.name] = append(roundBulk[c.name], mbps)
		}
		for k, f := range roundFigs {
			if figs[k] == nil {
				figs[k] = &figures{}
			}
			figs[k].addRound(f)
		}
		for name, v := range roundBulk {
			bulk[name] = append(bulk[name], bench.Mean(v))
		}
	}
	s.report(figs, bulk)
	return nil
}

func newSetup(b *bench.Bench) (*setup, error) {
	consul, err := b.StartConsul(testenv.ConsulOptions{})
	if err != nil {
		return nil, err
	}
	s := &setup{b: b, consul: consul}
	if s.http, err = bench.StartCountingApp(b.Env, "hello from server\n"); err != nil {
		return nil, err
	}
	if s.bulk, err = startBulkApp(b.Env); err != nil {
		return nil, err
	}
	ports, err := b.Ports(8)
	if err != nil {
		return nil, err
	}
	s.serverSidecar, s.bulkSidecar, s.clientSidecar, s.upHTTP, s.upBulk = ports[0], ports[1], ports[2], ports[3], ports[4]
	s.serverTCPSidecar, s.upTCP = ports[6], ports[7]
	clientApp := ports[5] // nothing listens there: the client only calls out
	c := consul.Client
	// bind_address keeps both proxies' public listeners on loopback (the
	// built-in proxy binds 0.0.0.0 by default).
	httpCfg := map[string]any{"protocol": "http", "bind_address": "127.0.0.1"}
	tcpCfg := map[string]any{"protocol": "tcp", "bind_address": "127.0.0.1"}
	if err := bench.RegisterWithSidecar(c, "server", s.http.Port, s.serverSidecar, httpCfg); err != nil {
		return nil, err
	}
	if err := bench.RegisterWithSidecar(c, "server-tcp", s.http.Port, s.serverTCPSidecar, tcpCfg); err != nil {
		return nil, err
	}
	if err := bench.RegisterWithSidecar(c, "bulk", s.bulk, s.bulkSidecar, tcpCfg); err != nil {
		return nil, err
	}
	err = bench.RegisterWithSidecar(c, "client", clientApp, s.clientSidecar, map[string]any{"bind_address": "127.0.0.1"},
		api.Upstream{DestinationName: "server", LocalBindAddress: "127.0.0.1", LocalBindPort: s.upHTTP, Config: map[string]any{"protocol": "http"}},
		api.Upstream{DestinationName: "server-tcp", LocalBindAddress: "127.0.0.1", LocalBindPort: s.upTCP, Config: map[string]any{"protocol": "tcp"}},
		api.Upstream{DestinationName: "bulk", LocalBindAddress: "127.0.0.1", LocalBindPort: s.upBulk, Config: map[string]any{"protocol": "tcp"}})
	if err != nil {
		return nil, err
	}
	return s, nil
}

// round starts contender c, runs every HTTP cell and one bulk transfer,
// and stops it. It returns the bulk throughput in MB/s.
func (s *setup) round(ctx context.Context, c *contender, figs map[row]*figures) (float64, error) {
	if err := c.Start(ctx); err != nil {
		return 0, err
	}
	mbps, err := s.measure(ctx, c.name, c.t, figs)
	c.Stop()
	if err == nil && c.stopErr != nil {
		err = fmt.Errorf("stop: %w", c.stopErr)
	}
	return mbps, err
}

func (s *setup) measure(ctx context.Context, name string, t *target, figs map[row]*figures) (float64, error) {
	url := fmt.Sprintf("http://127.0.0.1:%d/", t.httpPort)
	// Warm up: connections, TLS session state, Consul caches, Go's heap.
	if _, err := bench.RunWrk(ctx, s.b.Wrk, url, 16, time.Second, false); err != nil {
		return 0, fmt.Errorf("warm-up: %w", err)
	}
	for _, m := range modes {
		for _, n := range clients {
			cell := row{name, m.Name, n}
			f := figs[cell]
			if f == nil {
				f = &figures{}
				figs[cell] = f
			}
			before, err := t.inbound()
			if err != nil {
				return 0, err
			}
			var authzBefore int64
			if t.authz != nil {
				if authzBefore, err = t.authz(); err != nil {
					return 0, err
				}
			}
			cpuBefore, sysBefore, err := t.cpu()
			if err != nil {
				return 0, err
			}
			res, err := bench.RunWrk(ctx, s.b.Wrk, url, n, cellTime(s.b), m.Close)
			if err != nil {
				return 0, fmt.Errorf("%s c=%d: %w", m.Name, n, err)
			}
			cpuAfter, sysAfter, err := t.cpu()
			if err != nil {
				return 0, err
			}
			if len(t.procs) > 0 && res.Requests > 0 {
				f.cpuPer1k = append(f.cpuPer1k, (cpuAfter-cpuBefore).Seconds()/float64(res.Requests)*1000)
				f.sysPer1k = append(f.sysPer1k, (sysAfter-sysBefore).Seconds()/float64(res.Requests)*1000)
			}
			after, err := t.inbound()
			if err != nil {
				return 0, err
			}
			if t.authz != nil && res.Requests > 0 {
				authzAfter, err := t.authz()
				if err != nil {
					return 0, err
				}
				f.authzPerReq = append(f.authzPerReq, float64(authzAfter-authzBefore)/float64(res.Requests))
			}
			f.rps = append(f.rps, res.RPS)
			f.p50 = append(f.p50, res.P50)
			f.p99 = append(f.p99, res.P99)
			f.requests += res.Requests
			if res.Requests > 0 {
				f.connsPerReq = append(f.connsPerReq, float64(after-before)/float64(res.Requests))
			}
			if e := res.Errors(); e > 0 {
				f.errors += e
				if f.firstErr == "" {
					f.firstErr = res.ErrorText()
				}
			}
		}
	}
	// Open loop: fixed rates below saturation, latency from each
	// request's intended send time.
	for _, load := range openLoads {
		f := figs[openRow(name, load)]
		if f == nil {
			f = &figures{}
			figs[openRow(name, load)] = f
		}
		res := bench.OpenLoop(ctx, url, load*s.capacity, openConns, cellTime(s.b))
		f.rps = append(f.rps, res.Rate())
		f.p50 = append(f.p50, res.Lat.Percentile(50))
		f.p99 = append(f.p99, res.Lat.Percentile(99))
		if len(res.Lat) >= 1000 {
			f.p999 = append(f.p999, res.Lat.Percentile(99.9))
		}
		f.requests += res.OK + res.Failed
		if res.Failed > 0 {
			f.errors += res.Failed
			if f.firstErr == "" {
				f.firstErr = res.FirstErr.Error()
			}
		}
	}
	// Bulk: a small transfer first (connection paths, buffers), then the
	// measured one. The warm-up is retried for a few seconds: once, on a
	// loaded machine, the built-in proxy reset its first bulk connection
	// after the HTTP cells, and the whole workload failed on it.
	if err := bench.WaitFor(ctx, 10*time.Second, func() error {
		_, err := bulkTransfer(ctx, t.bulkPort, 1<<20)
		return err
	}); err != nil {
		return 0, fmt.Errorf("bulk warm-up: %w", err)
	}
	n := bulkBytes(s.b)
	sec, err := bulkTransfer(ctx, t.bulkPort, n)
	if err != nil {
		return 0, fmt.Errorf("bulk: %w", err)
	}
	return float64(n) / 1e6 / sec, nil
}

func (s *setup) startDirect(context.Context) (*target, error) {
	return &target{httpPort: s.http.Port, bulkPort: s.bulk, inbound: s.http.Accepted, stop: func() error { return nil }}, nil
}

func (s *setup) registeredPorts() []int {
	return []int{s.serverSidecar, s.serverTCPSidecar, s.bulkSidecar, s.clientSidecar, s.upHTTP, s.upTCP, s.upBulk}
}

// startHC starts haproxy-connect sidecars for serverID ("server" in http
// mode, "server-tcp" in tcp mode), bulk and client; the HTTP load goes to
// the client's upstream port for serverID.
func (s *setup) startHC(ctx context.Context, serverID string, upPort int, extra ...string) (*target, error) {
	var procs []*bench.Proc
	stop := func() error { return stopContender(s.registeredPorts(), procs...) }
	var server *bench.Sidecar
	for _, id := range []string{serverID, "bulk", "client"} {
		sc, err := s.b.StartSidecar(s.consul, id, extra...)
		if sc != nil && sc.Proc != nil {
			procs = append(procs, sc.Proc)
		}
		if err != nil {
			_ = stop()
			return nil, err
		}
		if id == serverID {
			server = sc
		}
	}
	if err := s.waitPath(ctx, upPort, procs); err != nil {
		_ = stop()
		return nil, err
	}
	sock := filepath.Join(server.StateDir, "master.sock")
	return &target{
		httpPort: upPort, bulkPort: s.upBulk, stop: stop, procs: []*bench.Proc{procs[0], procs[2]},
		inbound: func() (int64, error) { return bench.FrontendSessions(sock, bootstrap.PublicFrontend) },
		authz:   func() (int64, error) { return bench.SidecarDecisions(server.Stats) },
	}, nil
}

// startBuiltin starts "consul connect proxy -sidecar-for" for server, bulk
// and client: it reads the same registrations (ports, upstreams).
func (s *setup) startBuiltin(ctx context.Context) (*target, error) {
	var procs []*bench.Proc
	stop := func() error { return stopContender(s.registeredPorts(), procs...) }
	for _, id := range []string{"server", "bulk", "client"} {
		p, err := s.b.Start("builtin-"+id, s.b.Consul, "connect", "proxy", "-sidecar-for", id, "-http-addr", s.consul.Addr)
		if err != nil {
			_ = stop()
			return nil, err
		}
		procs = append(procs, p)
	}
	if err := s.waitPath(ctx, s.upHTTP, procs); err != nil {
		_ = stop()
		return nil, err
	}
	return &target{httpPort: s.upHTTP, bulkPort: s.upBulk, inbound: s.http.Accepted, stop: stop, procs: []*bench.Proc{procs[0], procs[2]}}, nil
}

// waitPath waits until an HTTP request (to the client's upstream on
// httpPort) and a small bulk transfer go through the client's upstreams.
func (s *setup) waitPath(ctx context.Context, httpPort int, procs []*bench.Proc) error {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	return bench.WaitFor(ctx, 30*time.Second, func() error {
		for _, p := range procs {
			select {
			case <-p.Done():
				return bench.Stop(fmt.Errorf("%s exited, see %s", filepath.Base(p.Cmd.Path), p.Log))
			default:
			}
		}
		resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/", httpPort))
		if err != nil {
			return err
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return err
		}
		if resp.StatusCode != 200 || string(body) != s.http.Body {
			return fmt.Errorf("upstream server: %d %q", resp.StatusCode, body)
		}
		_, err = bulkTransfer(ctx, s.upBulk, 1024)
		return err
	})
}

// stopContender stops procs (SIGTERM, then SIGKILL to the group after 15 s)
// and waits until nothing accepts on ports any more, so that the next
// contender can bind them.
func stopContender(ports []int, procs ...*bench.Proc) error {
	for _, p := range procs {
		_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	}
	for _, p := range procs {
		select {
		case <-p.Done():
		case <-time.After(15 * time.Second):
			_ = syscall.Kill(-p.Cmd.Process.Pid, syscall.SIGKILL)
			<-p.Done()
		}
	}
	return bench.WaitFor(context.Background(), 15*time.Second, func() error {
		for _, port := range ports {
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
			if err == nil {
				c.Close()
				return fmt.Errorf("port %d still accepts", port)
			}
		}
		return nil
	})
}

func (s *setup) report(figs map[row]*figures, bulk map[string]bench.Rounds) {
	b := s.b
	sec := b.Report.Add("Data path: HTTP through client sidecar → server sidecar → app",
		"mode", "clients", "contender", "req/s", "p50", "p99", "conns/req", "authz/req", "errors",
		"req/s ÷ built-in", "p99 ÷ built-in", "p99 − direct", "proxy CPU s / 1000 req", "of which kernel", "CPU ÷ built-in")
	var errNotes []string
	for _, m := range modes {
		for _, n := range clients {
			base := figs[row{contBuiltin, m.Name, n}]
			direct := figs[row{contDirect, m.Name, n}]
			for _, name := range rowOrder {
				f := figs[row{name, m.Name, n}]
				if f == nil {
					continue
				}
				added := "–"
				if name != contDirect && direct != nil {
					added = bench.DiffRounds(f.p99, direct.p99).Format(bench.SignedDur)
				}
				vsRPS, vsP99, vsCPU := "n/a", "n/a", "–"
				if base != nil {
					vsRPS = bench.PerRound(f.rps, base.rps).Format(bench.X)
					vsP99 = bench.PerRound(f.p99, base.p99).Format(bench.X)
					if len(f.cpuPer1k) > 0 && len(base.cpuPer1k) > 0 {
						vsCPU = bench.PerRound(f.cpuPer1k, base.cpuPer1k).Format(bench.X)
					}
				}
				cpu, sys := "–", "–"
				if len(f.cpuPer1k) > 0 {
					cpu = f.cpuPer1k.Format(func(v float64) string { return fmt.Sprintf("%.3f", v) })
					sys = f.sysPer1k.Format(func(v float64) string { return fmt.Sprintf("%.3f", v) })
				}
				sec.Row(m.Name, strconv.Itoa(n), name, f.rps.Format(bench.Num), f.p50.Format(bench.Dur), f.p99.Format(bench.Dur),
					f.connsPerReq.Format(bench.PerReq), bench.OptPerReq(f.authzPerReq),
					strconv.FormatInt(f.errors, 10), vsRPS, vsP99, added, cpu, sys, vsCPU)
				if f.errors > 0 {
					errNotes = append(errNotes, fmt.Sprintf("%s, %s, %d clients: %d errors in %d requests (%s)",
						name, m.Name, n, f.errors, f.requests, f.firstErr))
				}
			}
		}
	}
	if t := httpTargets(figs); len(t) > 0 {
		sec.Note("Targets (medians of per-round ratios of this run, haproxy-connect in http mode against the built-in proxy): %s.", strings.Join(t, "; "))
	}
	sec.Note("Load: wrk (a separate process, -t2, -t1 for 1 client) for %s per measurement, after a 1 s warm-up; each "+
		"contender is started, measured and stopped in turn, twice per round in mirrored order (ABCD DCBA, rotated every "+
		"round), and a round's figure of a cell is the mean of its two measurements (for p50 and p99: the mean of the two "+
		"percentiles). Ratios to the built-in proxy and differences to direct are paired within each round, then the "+
		"median (min–max) over rounds is shown. "+
		"Contenders: %s = two haproxy-connect sidecars (client and server, at their defaults: access logs on, written to a file, and -threads: 1 on 2 CPUs or fewer, as here), "+
		"protocol http (h2 between the sidecars, which the client's upstream offers and the server's listener accepts); "+
		"%s = the same with -threads 2 on every sidecar (the thread-count lever); "+
		"%s = the same with protocol tcp on the registrations (L4 at both sidecars, as the built-in proxy); %s = `consul connect "+
		"proxy -sidecar-for` for client and server (L4: it forwards HTTP as TCP); %s = wrk straight to the app.",
		cellTime(b).Round(time.Second), contHC, contHC2, contHCTCP, contBuiltin, contDirect)
	sec.Note("Proxy CPU: user + system seconds of the proxies' whole process trees (client and server: for haproxy-connect " +
		"the controller, the HAProxy master and its workers; for the built-in proxy its two processes), from /proc/<pid>/stat " +
		"before and after each wrk run, per 1000 requests wrk completed; \"of which kernel\" is their system time (stime), where " +
		"the proxies' socket calls run, and, on loopback, the receiving side's network stack for every segment a proxy sends. " +
		"The target for haproxy-connect is at most half the built-in proxy's CPU per request (CPU ÷ built-in ≤ 0.5x); each " +
		"target line below splits haproxy-connect's CPU per request into its kernel and user time, each as a ratio to the " +
		"built-in proxy's whole CPU per request, paired per round. Direct has no proxy.")
	sec.Note("new conn = wrk sends `Connection: close`, and wrk reconnects for each request. " +
		"conns/req counts new connections at the server side per request: mTLS sessions on the server " +
		"sidecar's public listener (HAProxy stats) for haproxy-connect, connections the app accepted for the " +
		"built-in proxy (which dials the app once per inbound mTLS connection) and for direct. About 1 " +
		"means one mTLS handshake per request (a little above 1: connections still open, without a completed " +
		"request, when wrk stops). In http mode the client sidecar pools its mTLS connections to the server sidecar " +
		"(`http-reuse always`: each carries the client's identity, whichever local connection it serves) and multiplexes " +
		"requests on them (h2), so a new " +
		"local connection costs no handshake and conns/req stays near 0; in tcp mode, and for the built-in proxy, " +
		"each local connection is one mTLS connection onward. wrk opens its connections afresh in each run, so in keep-alive " +
		"mode too a cell's p99 includes their setup at its start: at 128 clients, through the tcp mode sidecars and the " +
		"built-in proxy, 128 mTLS handshakes at once on 2 CPUs, which is most of their p99 there (conns/req about 128 " +
		"over the cell's requests).")
	sec.Note("authz/req is the server sidecar's SPOE authorization decisions (its /metrics, allow + deny) per " +
		"request, for haproxy-connect only; the built-in proxy authorizes once per inbound connection (conns/req).")
	sec.Note("Latency is wrk's, from writing a request to reading its response; it does not include wrk's own TCP " +
		"connect to the local proxy (but does include the proxy's mTLS connect onward). p99 − direct is the " +
		"median over rounds of (p99 of the contender − p99 of direct in the same round); ratios are of medians.")
	sec.Note("The app is a Go net/http server inside meshbench (a fixed 18-byte body): app, proxies, wrk and "+
		"Consul share this machine's %d cores, so the proxies' CPU is taken from the same budget as the load "+
		"generator's; figures compare contenders under the same conditions, they are not capacity figures.", runtime.NumCPU())
	errText := "no wrk errors (socket errors or non-2xx responses) in any cell."
	if len(errNotes) > 0 {
		errText = "wrk errors (socket errors + non-2xx responses, summed over rounds): " + strings.Join(errNotes, "; ") + "."
	}
	sec.Note("%s", errText)

	s.reportOpenLoop(figs)

	tsec := b.Report.Add("Data path: TCP bulk transfer through client sidecar → server sidecar → app",
		"contender", "MB/s", "÷ built-in", "÷ direct")
	for _, name := range rowOrder {
		r, ok := bulk[name]
		if !ok || name == contHCTCP { // the same tcp-mode bulk path as contHC's
			continue
		}
		tsec.Row(name, r.Format(bench.Num), bench.PerRound(r, bulk[contBuiltin]).Format(bench.X), bench.PerRound(r, bulk[contDirect]).Format(bench.X))
	}
	tsec.Note("Two connections per contender and round (one in each half of the mirrored order; a round's figure is their mean, and ratios are paired within each round): a Go client asks the app (in meshbench) for %d MB and reads it to the "+
		"end (byte count checked), after a 1 MB warm-up transfer; MB/s = 10^6 bytes per second from dial to EOF. "+
		"Protocol tcp on both registrations (haproxy-connect in tcp mode).", bulkBytes(b)>>20)
}

// startBulkApp serves bulk transfers: a client sends an 8-byte big-endian
// length, the app writes that many bytes and closes.
func startBulkApp(e *bench.Env) (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	e.Defer(func() { ln.Close() })
	buf := make([]byte, 256<<10)
	go testenv.Serve(ln, func(c net.Conn) {
		_ = c.SetDeadline(time.Now().Add(5 * time.Minute))
		var hdr [8]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		for left := int64(binary.BigEndian.Uint64(hdr[:])); left > 0; {
			n := min(left, int64(len(buf)))
			if _, err := c.Write(buf[:n]); err != nil {
				return
			}
			left -= n
		}
	})
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// bulkTransfer asks the bulk app behind port for n bytes, reads them to EOF
// and returns the seconds from dial to EOF.
func bulkTransfer(ctx context.Context, port int, n int64) (float64, error) {
	start := time.Now()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
	var hdr [8]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(n))
	if _, err := c.Write(hdr[:]); err != nil {
		return 0, err
	}
	got, err := io.CopyBuffer(io.Discard, c, make([]byte, 256<<10))
	sec := time.Since(start).Seconds()
	if err != nil {
		return 0, fmt.Errorf("after %d of %d bytes: %w", got, n, err)
	}
	if got != n {
		return 0, fmt.Errorf("got %d of %d bytes", got, n)
	}
	return sec, nil
}

// reportOpenLoop adds the open-loop section: added latency over direct at
// fixed rates below saturation.
func (s *setup) reportOpenLoop(figs map[row]*figures) {
	b := s.b
	sec := b.Report.Add("Data path: added latency at fixed rates (open loop, keep-alive)",
		"load", "rate", "contender", "achieved req/s", "p50", "p99", "p99.9", "errors", "p99 − direct", "p99.9 − direct")
	var targets []string
	for _, load := range openLoads {
		direct := figs[openRow(contDirect, load)]
		for _, name := range rowOrder {
			f := figs[openRow(name, load)]
			if f == nil {
				continue
			}
			p999, added, added999 := "—", "–", "–"
			if len(f.p999) > 0 {
				p999 = f.p999.Format(bench.Dur)
			}
			if name != contDirect && direct != nil {
				d := bench.DiffRounds(f.p99, direct.p99)
				added = d.Format(bench.SignedDur)
				if len(f.p999) > 0 && len(direct.p999) > 0 {
					added999 = bench.DiffRounds(f.p999, direct.p999).Format(bench.SignedDur)
				}
				if name == contHC && load == 0.50 {
					targets = append(targets, fmt.Sprintf("haproxy-connect p99 − direct at 50 %% load (%.0f req/s, %.0f %% of direct's capacity): ",
						load*s.capacity, 100*load*s.capacity/s.direct)+bench.Target(d.Median(), 0.0003, bench.SignedDur))
				}
			}
			achieved := f.rps.Format(bench.Num)
			if f.rps.Median() < 0.95*load*s.capacity {
				achieved += " (saturated)"
			}
			sec.Row(fmt.Sprintf("%.0f %%", load*100), fmt.Sprintf("%.0f/s", load*s.capacity), name, achieved,
				f.p50.Format(bench.Dur), f.p99.Format(bench.Dur), p999, strconv.FormatInt(f.errors, 10), added, added999)
		}
	}
	if len(targets) > 0 {
		sec.Note("Targets (medians of per-round differences of this run): %s.", strings.Join(targets, "; "))
	}
	sec.Note("Load: meshbench's own open-loop generator (bench.OpenLoop): GET requests at a fixed rate, each started at its "+
		"intended time whether or not earlier ones have been answered, over up to %d keep-alive connections, opened before "+
		"the schedule starts (a request that finds them all busy waits for one), for %s per measurement, twice per round in the mirrored order of the section "+
		"above; each latency is measured from the request's intended send time, so a stall of the proxy or of the generator "+
		"is charged to the requests it delays (no coordinated omission). Rates are 25 %%, 50 %% and 75 %% of the same "+
		"generator's capacity through haproxy-connect (16 connections, closed loop, measured once before the rounds: %.0f req/s; "+
		"straight to the app it is %.0f req/s, so the rates are %.0f %%, %.0f %% and %.0f %% of direct's), so every contender "+
		"gets the same rate; the generator shares the 2 CPUs with the proxies, and 50 %% of direct's capacity is above what a "+
		"proxied path carries here, which would measure queueing, not added latency. \"saturated\": the achieved rate stayed below 95 %% of the intended one, so that contender (or the "+
		"generator beside it) could not carry the load, and its latencies are queueing, not added latency. p99.9 is shown "+
		"where a run has 1000 samples or more. p99 − direct pairs each round's figures.",
		openConns, cellTime(b).Round(time.Second), s.capacity, s.direct,
		100*openLoads[0]*s.capacity/s.direct, 100*openLoads[1]*s.capacity/s.direct, 100*openLoads[2]*s.capacity/s.direct)
}

// httpTargets are issue 15's data path targets, met or missed: keep-alive
// rate at least the built-in proxy's at 1 and 16 clients with a lower p99,
// twice it at 128; CPU per request at most half the built-in proxy's.
func httpTargets(figs map[row]*figures) []string {
	var out []string
	for _, n := range clients {
		hc, bi := figs[row{contHC, bench.ModeKeepAlive.Name, n}], figs[row{contBuiltin, bench.ModeKeepAlive.Name, n}]
		if hc == nil || bi == nil {
			continue
		}
		want := 1.0
		if n == 128 {
			want = 2
		}
		t := fmt.Sprintf("keep-alive, %d clients: req/s ÷ built-in %s", n, bench.TargetAtLeast(bench.PerRound(hc.rps, bi.rps).Median(), want, bench.X))
		if n < 128 {
			t += ", p99 ÷ built-in " + bench.TargetRatio(bench.PerRound(hc.p99, bi.p99).Median(), 1)
		}
		if len(hc.cpuPer1k) > 0 && len(bi.cpuPer1k) > 0 {
			t += ", CPU per request ÷ built-in " + bench.TargetRatio(bench.PerRound(hc.cpuPer1k, bi.cpuPer1k).Median(), 0.5)
			if len(hc.sysPer1k) == len(hc.cpuPer1k) {
				t += fmt.Sprintf(" (of the built-in proxy's whole CPU per request, haproxy-connect's kernel time is %s and its user time %s)",
					bench.PerRound(hc.sysPer1k, bi.cpuPer1k).Format(bench.X),
					bench.PerRound(bench.DiffRounds(hc.cpuPer1k, hc.sysPer1k), bi.cpuPer1k).Format(bench.X))
			}
		}
		out = append(out, t)
	}
	return out
}
