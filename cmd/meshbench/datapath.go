package main

// The data path workload: request rate and latency of HTTP through client
// sidecar -> server sidecar -> app, with keep-alive and with a new
// connection per request, and bulk TCP throughput, for haproxy-connect,
// Consul's built-in proxy and no proxy at all.

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/scrape"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

func init() { workloads = append(workloads, workload{"datapath", runDataPath}) }

// Contender names, as the tables show them.
const (
	contHC      = "haproxy-connect"
	contHCTCP   = "haproxy-connect, tcp mode"
	contBuiltin = "consul built-in"
	contDirect  = "direct"
)

// dpContenderOrder is the order of the tables' rows.
var dpContenderOrder = []string{contDirect, contBuiltin, contHC, contHCTCP}

// httpMode is how wrk talks to the target.
type httpMode struct {
	name string
	// close sends "Connection: close": the app closes after the response
	// and wrk reconnects, so each request is a new client connection. The
	// built-in proxy is L4, so that is a new mTLS connection too; an
	// HAProxy client sidecar never sends a session's first request over a
	// reused server connection (http-reuse safe), so it opens a new mTLS
	// connection as well. conns/req checks both.
	close bool
}

var (
	modeKeepAlive = httpMode{name: "keep-alive"}
	modeNewConn   = httpMode{name: "new conn", close: true}
	dataPathModes = []httpMode{modeKeepAlive, modeNewConn}
	// dataPathClients are the concurrent connections wrk keeps open.
	dataPathClients = []int{1, 16, 128}
)

// dpTarget is one started contender: where the load goes, and how many
// connections its server side has accepted so far.
type dpTarget struct {
	httpPort, bulkPort int
	// inbound counts connections accepted by the server side: the server
	// sidecar's mTLS sessions for haproxy-connect, the app's connections
	// for the built-in proxy (it dials the app once per inbound mTLS
	// connection) and for direct.
	inbound func() (int64, error)
	// authz counts the server sidecar's authorization decisions (nil
	// when the contender does not report them).
	authz func() (int64, error)
	stop  func() error
}

type dpContender struct {
	name  string
	start func(ctx context.Context) (*dpTarget, error)
}

// dpCell is one table row: a contender, a mode and a concurrency.
type dpCell struct {
	contender, mode string
	clients         int
}

// dpFigures are a cell's figures, one per round.
type dpFigures struct {
	rps, p50, p99, connsPerReq, authzPerReq Rounds
	requests, errors                        int64
	firstErr                                string
}

// dpSetup is what the contenders share: one Consul agent with the
// registrations and the in-process apps.
type dpSetup struct {
	b      *Bench
	consul *testenv.ConsulProc
	http   *countingApp
	bulk   int // bulk app port
	// Registered ports: the server's, server-tcp's and bulk's sidecar
	// public listeners, the client sidecar's own public listener, and the
	// client's upstream binds for "server" (http), "server-tcp" (the same
	// app, tcp) and "bulk" (tcp).
	serverSidecar, serverTCPSidecar, bulkSidecar, clientSidecar, upHTTP, upTCP, upBulk int
}

// wrkCellTime is how long wrk runs for one table cell.
func wrkCellTime(b *Bench) time.Duration {
	if b.Quick {
		return 2 * time.Second
	}
	return 5 * time.Second
}

// bulkBytes is the size of one measured bulk transfer.
func bulkBytes(b *Bench) int64 {
	if b.Quick {
		return 64 << 20
	}
	return 256 << 20
}

func runDataPath(ctx context.Context, b *Bench) error {
	if b.Wrk == "" {
		return errors.New("wrk not found (apt-get install -y wrk, or set WRK_BIN)")
	}
	s, err := setupDataPath(b)
	if err != nil {
		return err
	}
	contenders := []dpContender{
		{contDirect, s.startDirect},
		{contBuiltin, s.startBuiltin},
		{contHC, func(ctx context.Context) (*dpTarget, error) { return s.startHC(ctx, "server", s.upHTTP) }},
		{contHCTCP, func(ctx context.Context) (*dpTarget, error) { return s.startHC(ctx, "server-tcp", s.upTCP) }},
	}
	contenders = slices.DeleteFunc(contenders, func(c dpContender) bool { return !b.Wants(c.name) })
	figs := map[dpCell]*dpFigures{}
	bulk := map[string]Rounds{}
	for r := 0; r < b.Rounds; r++ {
		// Rotate the order so that no contender always runs first (or
		// last) in a round, while the shared machine drifts.
		for i := range contenders {
			c := contenders[(i+r)%len(contenders)]
			b.Logf("datapath round %d/%d: %s", r+1, b.Rounds, c.name)
			mbps, err := s.round(ctx, c, figs)
			if err != nil {
				return fmt.Errorf("%s: %w", c.name, err)
			}
			bulk[c.name] = append(bulk[c.name], mbps)
		}
	}
	s.report(figs, bulk)
	return nil
}

func setupDataPath(b *Bench) (*dpSetup, error) {
	consul, err := b.StartConsul(testenv.ConsulOptions{})
	if err != nil {
		return nil, err
	}
	s := &dpSetup{b: b, consul: consul}
	if s.http, err = startCountingApp(b.Env, "hello from server\n"); err != nil {
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
	if err := RegisterWithSidecar(c, "server", s.http.port, s.serverSidecar, httpCfg); err != nil {
		return nil, err
	}
	if err := RegisterWithSidecar(c, "server-tcp", s.http.port, s.serverTCPSidecar, tcpCfg); err != nil {
		return nil, err
	}
	if err := RegisterWithSidecar(c, "bulk", s.bulk, s.bulkSidecar, tcpCfg); err != nil {
		return nil, err
	}
	err = RegisterWithSidecar(c, "client", clientApp, s.clientSidecar, map[string]any{"bind_address": "127.0.0.1"},
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
func (s *dpSetup) round(ctx context.Context, c dpContender, figs map[dpCell]*dpFigures) (float64, error) {
	t, err := c.start(ctx)
	if err != nil {
		return 0, err
	}
	mbps, err := s.measure(ctx, c.name, t, figs)
	if serr := t.stop(); err == nil && serr != nil {
		err = fmt.Errorf("stop: %w", serr)
	}
	return mbps, err
}

func (s *dpSetup) measure(ctx context.Context, name string, t *dpTarget, figs map[dpCell]*dpFigures) (float64, error) {
	url := fmt.Sprintf("http://127.0.0.1:%d/", t.httpPort)
	// Warm up: connections, TLS session state, Consul caches, Go's heap.
	if _, err := runWrk(ctx, s.b.Wrk, url, 16, time.Second, false); err != nil {
		return 0, fmt.Errorf("warm-up: %w", err)
	}
	for _, m := range dataPathModes {
		for _, n := range dataPathClients {
			cell := dpCell{name, m.name, n}
			f := figs[cell]
			if f == nil {
				f = &dpFigures{}
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
			res, err := runWrk(ctx, s.b.Wrk, url, n, wrkCellTime(s.b), m.close)
			if err != nil {
				return 0, fmt.Errorf("%s c=%d: %w", m.name, n, err)
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
	// Bulk: a small transfer first (connection paths, buffers), then the
	// measured one.
	if _, err := bulkTransfer(ctx, t.bulkPort, 1<<20); err != nil {
		return 0, fmt.Errorf("bulk warm-up: %w", err)
	}
	n := bulkBytes(s.b)
	sec, err := bulkTransfer(ctx, t.bulkPort, n)
	if err != nil {
		return 0, fmt.Errorf("bulk: %w", err)
	}
	return float64(n) / 1e6 / sec, nil
}

func (s *dpSetup) startDirect(context.Context) (*dpTarget, error) {
	return &dpTarget{httpPort: s.http.port, bulkPort: s.bulk, inbound: s.http.accepted, stop: func() error { return nil }}, nil
}

func (s *dpSetup) registeredPorts() []int {
	return []int{s.serverSidecar, s.serverTCPSidecar, s.bulkSidecar, s.clientSidecar, s.upHTTP, s.upTCP, s.upBulk}
}

// startHC starts haproxy-connect sidecars for serverID ("server" in http
// mode, "server-tcp" in tcp mode), bulk and client; the HTTP load goes to
// the client's upstream port for serverID.
func (s *dpSetup) startHC(ctx context.Context, serverID string, upPort int) (*dpTarget, error) {
	var procs []*Proc
	stop := func() error { return stopContender(s.registeredPorts(), procs...) }
	var server *Sidecar
	for _, id := range []string{serverID, "bulk", "client"} {
		sc, err := s.b.StartSidecar(s.consul, id)
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
	return &dpTarget{
		httpPort: upPort, bulkPort: s.upBulk, stop: stop,
		inbound: func() (int64, error) { return frontendSessions(sock, bootstrap.PublicFrontend) },
		authz:   func() (int64, error) { return sidecarDecisions(server.Stats) },
	}, nil
}

// startBuiltin starts "consul connect proxy -sidecar-for" for server, bulk
// and client: it reads the same registrations (ports, upstreams).
func (s *dpSetup) startBuiltin(ctx context.Context) (*dpTarget, error) {
	var procs []*Proc
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
	return &dpTarget{httpPort: s.upHTTP, bulkPort: s.upBulk, inbound: s.http.accepted, stop: stop}, nil
}

// waitPath waits until an HTTP request (to the client's upstream on
// httpPort) and a small bulk transfer go through the client's upstreams.
func (s *dpSetup) waitPath(ctx context.Context, httpPort int, procs []*Proc) error {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	return WaitFor(ctx, 30*time.Second, func() error {
		for _, p := range procs {
			select {
			case <-p.Done():
				return Stop(fmt.Errorf("%s exited, see %s", filepath.Base(p.Cmd.Path), p.Log))
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
		if resp.StatusCode != 200 || string(body) != s.http.body {
			return fmt.Errorf("upstream server: %d %q", resp.StatusCode, body)
		}
		_, err = bulkTransfer(ctx, s.upBulk, 1024)
		return err
	})
}

// stopContender stops procs (SIGTERM, then SIGKILL to the group after 15 s)
// and waits until nothing accepts on ports any more, so that the next
// contender can bind them.
func stopContender(ports []int, procs ...*Proc) error {
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
	return WaitFor(context.Background(), 15*time.Second, func() error {
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

func (s *dpSetup) report(figs map[dpCell]*dpFigures, bulk map[string]Rounds) {
	b := s.b
	sec := b.Report.Add("Data path: HTTP through client sidecar → server sidecar → app",
		"mode", "clients", "contender", "req/s", "p50", "p99", "conns/req", "authz/req", "errors",
		"req/s ÷ built-in", "p99 ÷ built-in", "p99 − direct")
	var errNotes []string
	for _, m := range dataPathModes {
		for _, n := range dataPathClients {
			base := figs[dpCell{contBuiltin, m.name, n}]
			direct := figs[dpCell{contDirect, m.name, n}]
			for _, name := range dpContenderOrder {
				f := figs[dpCell{name, m.name, n}]
				if f == nil {
					continue
				}
				added := "–"
				if name != contDirect && direct != nil {
					added = diffRounds(f.p99, direct.p99).Format(signedDur)
				}
				vsRPS, vsP99 := "n/a", "n/a"
				if base != nil {
					vsRPS, vsP99 = Ratio(f.rps.Median(), base.rps.Median()), Ratio(f.p99.Median(), base.p99.Median())
				}
				sec.Row(m.name, strconv.Itoa(n), name, f.rps.Format(Num), f.p50.Format(Dur), f.p99.Format(Dur),
					f.connsPerReq.Format(perReq), optPerReq(f.authzPerReq),
					strconv.FormatInt(f.errors, 10), vsRPS, vsP99, added)
				if f.errors > 0 {
					errNotes = append(errNotes, fmt.Sprintf("%s, %s, %d clients: %d errors in %d requests (%s)",
						name, m.name, n, f.errors, f.requests, f.firstErr))
				}
			}
		}
	}
	sec.Note("Load: wrk (a separate process, -t2, -t1 for 1 client) for %s per cell, after a 1 s warm-up; each "+
		"contender is started, measured and stopped in turn within a round, in an order rotated every round. "+
		"Contenders: %s = two haproxy-connect sidecars (client and server, access logs off, default -threads: 2 here), "+
		"protocol http (h2 between the sidecars, which the client's upstream offers and the server's listener accepts); "+
		"%s = the same with protocol tcp on the registrations (L4 at both sidecars, as the built-in proxy); %s = `consul connect "+
		"proxy -sidecar-for` for client and server (L4: it forwards HTTP as TCP); %s = wrk straight to the app.",
		wrkCellTime(b), contHC, contHCTCP, contBuiltin, contDirect)
	sec.Note("new conn = wrk sends `Connection: close`, and wrk reconnects for each request. " +
		"conns/req counts new connections at the server side per request: mTLS sessions on the server " +
		"sidecar's public listener (HAProxy stats) for haproxy-connect, connections the app accepted for the " +
		"built-in proxy (which dials the app once per inbound mTLS connection) and for direct. About 1 " +
		"means one mTLS handshake per request (a little above 1: connections still open, without a completed " +
		"request, when wrk stops). In http mode the client sidecar pools its mTLS connections to the server sidecar " +
		"(`http-reuse always`: each carries the client's identity, whichever local connection it serves) and multiplexes " +
		"requests on them (h2), so a new " +
		"local connection costs no handshake and conns/req stays near 0; in tcp mode, and for the built-in proxy, " +
		"each local connection is one mTLS connection onward.")
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

	tsec := b.Report.Add("Data path: TCP bulk transfer through client sidecar → server sidecar → app",
		"contender", "MB/s", "÷ built-in", "÷ direct")
	for _, name := range dpContenderOrder {
		r, ok := bulk[name]
		if !ok || name == contHCTCP { // the same tcp-mode bulk path as contHC's
			continue
		}
		tsec.Row(name, r.Format(Num), Ratio(r.Median(), bulk[contBuiltin].Median()), Ratio(r.Median(), bulk[contDirect].Median()))
	}
	tsec.Note("One connection per round: a Go client asks the app (in meshbench) for %d MB and reads it to the "+
		"end (byte count checked), after a 1 MB warm-up transfer; MB/s = 10^6 bytes per second from dial to EOF. "+
		"Protocol tcp on both registrations (haproxy-connect in tcp mode).", bulkBytes(b)>>20)
}

// signedDur is Dur for a difference that may be negative.
func signedDur(sec float64) string {
	if sec < 0 {
		return "−" + Dur(-sec)
	}
	return Dur(sec)
}

func perReq(v float64) string { return fmt.Sprintf("%.3f", v) }

func optPerReq(r Rounds) string {
	if len(r) == 0 {
		return "–"
	}
	return r.Format(perReq)
}

// sidecarDecisions sums haproxy_connect_authz_decisions_total (allow and
// deny) from a sidecar's /metrics at statsAddr.
func sidecarDecisions(statsAddr string) (int64, error) {
	f, err := sidecarMetrics(statsAddr)
	if err != nil {
		return 0, err
	}
	return decisions(f)
}

// sidecarMetrics reads a sidecar's /metrics at statsAddr.
func sidecarMetrics(statsAddr string) (scrape.Families, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return scrape.Get(ctx, http.DefaultClient, "http://"+statsAddr+"/metrics")
}

// decisions sums the allow and deny samples of
// haproxy_connect_authz_decisions_total (not "undecided": no verdict).
func decisions(f scrape.Families) (int64, error) {
	var sum float64
	for _, result := range []string{"allow", "deny"} {
		v, err := f.Value("haproxy_connect_authz_decisions_total", "result", result)
		if err != nil {
			return 0, err
		}
		sum += v
	}
	return int64(sum), nil
}

// diffRounds is a[i] - b[i] for each round present in both.
func diffRounds(a, b Rounds) Rounds {
	var d Rounds
	for i := 0; i < len(a) && i < len(b); i++ {
		d = append(d, a[i]-b[i])
	}
	return d
}

// countingApp is the HTTP app: a fixed body, keep-alive, counting the
// connections it accepts.
type countingApp struct {
	port int
	body string
	n    atomic.Int64
}

func (a *countingApp) accepted() (int64, error) { return a.n.Load(), nil }

type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

func startCountingApp(e *Env, body string) (*countingApp, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	a := &countingApp{port: ln.Addr().(*net.TCPAddr).Port, body: body}
	length := strconv.Itoa(len(body))
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", length)
		w.Header().Set("Content-Type", "text/plain")
		_, _ = io.WriteString(w, body)
	}), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(countingListener{ln, &a.n})
	e.Defer(func() { srv.Close() })
	return a, nil
}

// startBulkApp serves bulk transfers: a client sends an 8-byte big-endian
// length, the app writes that many bytes and closes.
func startBulkApp(e *Env) (int, error) {
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

// wrkResult is what one wrk run reports. Latencies are in seconds.
type wrkResult struct {
	RPS, P50, P99 float64
	Requests      int64
	// Socket errors by kind, and responses other than 2xx/3xx.
	Connect, Read, Write, Timeout, Non2xx int64
}

// Errors counts every failed request wrk saw.
func (r wrkResult) Errors() int64 { return r.Connect + r.Read + r.Write + r.Timeout + r.Non2xx }

// ErrorText describes the errors as wrk reports them.
func (r wrkResult) ErrorText() string {
	return fmt.Sprintf("socket errors: connect %d, read %d, write %d, timeout %d; non-2xx %d",
		r.Connect, r.Read, r.Write, r.Timeout, r.Non2xx)
}

// runWrk runs wrk against url with n connections (2 threads, 1 for one
// connection) for d, whole seconds.
func runWrk(ctx context.Context, bin, url string, n int, d time.Duration, closeConn bool) (wrkResult, error) {
	var extra []string
	if closeConn {
		extra = []string{"-H", "Connection: close"}
	}
	return runWrkArgs(ctx, bin, url, n, d, extra...)
}

// runWrkArgs is runWrk with wrk arguments of the caller's (a script, a
// header).
func runWrkArgs(ctx context.Context, bin, url string, n int, d time.Duration, extra ...string) (wrkResult, error) {
	args := []string{"-t", strconv.Itoa(min(2, n)), "-c", strconv.Itoa(n),
		"-d", fmt.Sprintf("%ds", max(1, int(d.Round(time.Second)/time.Second))), "--latency"}
	args = append(args, extra...)
	cmd := exec.CommandContext(ctx, bin, append(args, url)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return wrkResult{}, fmt.Errorf("wrk %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	res, err := parseWrk(string(out))
	if err != nil {
		return res, fmt.Errorf("wrk %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return res, nil
}

var (
	wrkPercentile = regexp.MustCompile(`^\s*(50|99)(?:\.0+)?%\s+([0-9.]+)(us|ms|s|m|h)\s*$`)
	wrkRequests   = regexp.MustCompile(`^\s*(\d+) requests in `)
	wrkRPS        = regexp.MustCompile(`^Requests/sec:\s+([0-9.]+)\s*$`)
	wrkSocket     = regexp.MustCompile(`^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)\s*$`)
	wrkNon2xx     = regexp.MustCompile(`^\s*Non-2xx or 3xx responses: (\d+)\s*$`)
)

// parseWrk reads wrk's --latency report: Requests/sec, the 50% and 99%
// lines of the latency distribution, the request count and the error
// lines (absent when zero).
func parseWrk(out string) (wrkResult, error) {
	var r wrkResult
	var haveRPS, have50, have99, haveReq bool
	unit := map[string]float64{"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
	atoi := func(s string) int64 { v, _ := strconv.ParseInt(s, 10, 64); return v }
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		if m := wrkPercentile.FindStringSubmatch(line); m != nil {
			v, err := strconv.ParseFloat(m[2], 64)
			if err != nil {
				return r, fmt.Errorf("latency %q: %w", line, err)
			}
			v *= unit[m[3]]
			if m[1] == "50" {
				r.P50, have50 = v, true
			} else {
				r.P99, have99 = v, true
			}
		} else if m := wrkRequests.FindStringSubmatch(line); m != nil {
			r.Requests, haveReq = atoi(m[1]), true
		} else if m := wrkRPS.FindStringSubmatch(line); m != nil {
			v, err := strconv.ParseFloat(m[1], 64)
			if err != nil {
				return r, fmt.Errorf("requests/sec %q: %w", line, err)
			}
			r.RPS, haveRPS = v, true
		} else if m := wrkSocket.FindStringSubmatch(line); m != nil {
			r.Connect, r.Read, r.Write, r.Timeout = atoi(m[1]), atoi(m[2]), atoi(m[3]), atoi(m[4])
		} else if m := wrkNon2xx.FindStringSubmatch(line); m != nil {
			r.Non2xx = atoi(m[1])
		}
	}
	if !haveRPS || !haveReq || !have50 || !have99 {
		return r, errors.New("no Requests/sec, request count or 50%/99% latency in the output (was --latency given?)")
	}
	if r.Requests == 0 {
		// wrk prints nan latencies then; nothing went through.
		r.P50, r.P99 = math.NaN(), math.NaN()
	}
	return r, nil
}

// frontendSessions returns the cumulative sessions (stot) of an HAProxy
// frontend, asked through the master socket sock ("@1 show stat").
func frontendSessions(sock, frontend string) (int64, error) {
	out, err := haproxyMasterCommand(sock, "@1 show stat -1 1 -1")
	if err != nil {
		return 0, err
	}
	return parseStot(out, frontend)
}

// parseStot finds the FRONTEND row of frontend in "show stat" CSV and
// returns its stot column.
func parseStot(csv, frontend string) (int64, error) {
	col := -1
	for _, line := range strings.Split(csv, "\n") {
		if rest, ok := strings.CutPrefix(line, "# "); ok {
			for i, h := range strings.Split(rest, ",") {
				if h == "stot" {
					col = i
				}
			}
			continue
		}
		f := strings.Split(line, ",")
		if col < 0 || len(f) <= col || f[0] != frontend || f[1] != "FRONTEND" {
			continue
		}
		return strconv.ParseInt(f[col], 10, 64)
	}
	return 0, fmt.Errorf("no stot for frontend %s in show stat output: %q", frontend, truncateText(csv, 300))
}

func truncateText(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// haproxyMasterCommand sends one line to an HAProxy master socket, half-closes,
// and reads the answer to EOF (the master keeps the connection open for
// more commands otherwise).
func haproxyMasterCommand(sock, cmd string) (string, error) {
	c, err := net.DialTimeout("unix", sock, 2*time.Second)
	if err != nil {
		return "", fmt.Errorf("master socket %s: %w", sock, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, cmd+"\n"); err != nil {
		return "", fmt.Errorf("master socket %s: %w", sock, err)
	}
	if err := c.(*net.UnixConn).CloseWrite(); err != nil {
		return "", fmt.Errorf("master socket %s: %w", sock, err)
	}
	out, err := io.ReadAll(c)
	if err != nil {
		return string(out), fmt.Errorf("master socket %s: %q: %w", sock, cmd, err)
	}
	return string(out), nil
}
