package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptrace"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// Reload under load: how many local connections and how often each sends
// a request. The pace is modest (500 connections at one request per
// 100 ms each, on a 2-core machine shared with other work): the test is
// about correctness across a reload, not capacity.
const (
	reloadLoadConns    = 500
	reloadLoadInterval = 100 * time.Millisecond
	// afterReload is how long traffic goes on, and is checked, once the
	// old worker has gone.
	afterReload = 5 * time.Second
	// oldWorkerGrace is how much longer than -hard-stop-after the old
	// worker may take to be gone from show proc (see its use).
	oldWorkerGrace = 4 * time.Second
)

// hardStop is the sidecars' -hard-stop-after by protocol. In http mode
// every connection leaves the old worker without it (kept-alive HTTP/1.1
// ones on their next request, HTTP/2 ones once idle after their GOAWAY,
// bootstrap.GoawayIdleTimeout), so it is well above that, and the test
// checks that it did not fire. A TCP connection cannot move: in tcp mode
// the hard stop is what ends the old worker.
var hardStop = map[string]time.Duration{"http": 20 * time.Second, "tcp": 6 * time.Second}

// connLoad is n local clients, each on its own connection kept alive
// between its requests, each sending one request per interval until stop.
type connLoad struct {
	ok, failed atomic.Int64
	// opened counts connections opened (the first of each client
	// included); reused counts requests sent on a connection that had
	// served one before.
	opened, reused atomic.Int64
	// ready counts clients whose first request succeeded.
	ready    atomic.Int64
	firstErr atomic.Value
	done     chan struct{}
	wg       sync.WaitGroup

	mu       sync.Mutex
	failures []loadFailure // the first maxFailures
}

// loadFailure is one failed request: when it ended, and why.
type loadFailure struct {
	at     time.Time
	client int
	err    error
}

const maxFailures = 5000

// loadCounts is a snapshot of a connLoad's counters.
type loadCounts struct{ ok, failed, opened, reused int64 }

func (l *connLoad) counts() loadCounts {
	return loadCounts{l.ok.Load(), l.failed.Load(), l.opened.Load(), l.reused.Load()}
}

func (c loadCounts) sub(o loadCounts) loadCounts {
	return loadCounts{c.ok - o.ok, c.failed - o.failed, c.opened - o.opened, c.reused - o.reused}
}

// startConnLoad starts n clients; newClient(i) makes client i's request
// function, which reports whether the request went on a reused connection.
// The clients start spread over one interval.
func startConnLoad(n int, interval time.Duration, newClient func(i int) func() (reused bool, err error)) *connLoad {
	l := &connLoad{done: make(chan struct{})}
	for i := range n {
		call := newClient(i)
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			wait := time.NewTimer(rand.N(interval))
			defer wait.Stop()
			first := true
			for {
				select {
				case <-l.done:
					return
				case <-wait.C:
				}
				reused, err := call()
				if err != nil {
					l.failed.Add(1)
					l.firstErr.CompareAndSwap(nil, fmt.Errorf("client %d: %w", i, err))
					l.mu.Lock()
					if len(l.failures) < maxFailures {
						l.failures = append(l.failures, loadFailure{time.Now(), i, err})
					}
					l.mu.Unlock()
				} else {
					l.ok.Add(1)
					if first {
						first = false
						l.ready.Add(1)
					}
				}
				if reused {
					l.reused.Add(1)
				} else {
					l.opened.Add(1)
				}
				wait.Reset(interval)
			}
		}()
	}
	return l
}

// stop ends the clients and returns their final counts and first failure.
func (l *connLoad) stop() (loadCounts, error) {
	close(l.done)
	l.wg.Wait()
	err, _ := l.firstErr.Load().(error)
	return l.counts(), err
}

// failuresBetween are the recorded failures that ended in [from, to).
func (l *connLoad) failuresBetween(from, to time.Time) []loadFailure {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []loadFailure
	for _, f := range l.failures {
		if !f.at.Before(from) && f.at.Before(to) {
			out = append(out, f)
		}
	}
	return out
}

// httpConnClient is a local HTTP client on a connection of its own, kept
// alive between requests (a new one when HAProxy closed it). Odd clients
// POST a body: Go's transport replays an idempotent request (the GETs)
// that met a kept-alive connection closing under it, but not a POST, so
// the POSTs fail if HAProxy closes a connection as a request arrives.
func httpConnClient(t *testing.T, url string, i int) func() (bool, error) {
	tr := &http.Transport{MaxConnsPerHost: 1, MaxIdleConnsPerHost: 1, IdleConnTimeout: time.Minute}
	t.Cleanup(tr.CloseIdleConnections)
	client := &http.Client{Timeout: 15 * time.Second, Transport: tr}
	method, body := "GET", ""
	if i%2 == 1 {
		method, body = "POST", "payload"
	}
	return func() (bool, error) {
		var reused bool
		ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
			GotConn: func(g httptrace.GotConnInfo) { reused = g.Reused },
		})
		var rd io.Reader
		if body != "" {
			rd = strings.NewReader(body)
		}
		req, err := http.NewRequestWithContext(ctx, method, url, rd)
		if err != nil {
			return false, err
		}
		resp, err := client.Do(req)
		if err != nil {
			return reused, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			return reused, fmt.Errorf("%s: read body: %w", method, err)
		}
		if resp.StatusCode != 200 || strings.TrimSpace(string(b)) != "hello from server" {
			return reused, fmt.Errorf("%s: status %d %q", method, resp.StatusCode, b)
		}
		return reused, nil
	}
}

// tcpConnClient is a local client of a lineApp on a connection of its own,
// kept between exchanges. Before each exchange it checks, as a connection
// pool does, whether the other side closed the idle connection, and then
// opens a new one: after -hard-stop-after, the old worker's connections
// are closed under their clients. An exchange the close cuts fails.
func tcpConnClient(t *testing.T, port int) func() (bool, error) {
	var (
		conn   net.Conn
		rd     *bufio.Reader
		opened time.Time
	)
	t.Cleanup(func() {
		if conn != nil {
			conn.Close()
		}
	})
	drop := func() { conn.Close(); conn, rd = nil, nil }
	return func() (bool, error) {
		if conn != nil && closedIdle(conn, rd) {
			drop()
		}
		reused := conn != nil
		if conn == nil {
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
			if err != nil {
				return false, err
			}
			conn, rd, opened = c, bufio.NewReader(c), time.Now()
		}
		_ = conn.SetDeadline(time.Now().Add(15 * time.Second))
		if _, err := fmt.Fprintln(conn, "hello"); err != nil {
			drop()
			return reused, &connError{opened, fmt.Errorf("write: %w", err)}
		}
		line, err := rd.ReadString('\n')
		if err != nil || strings.TrimSpace(line) != "hello from server" {
			drop()
			return reused, &connError{opened, fmt.Errorf("answer %q: %v", line, err)}
		}
		return reused, nil
	}
}

// connError is an exchange that failed on a connection opened at opened.
type connError struct {
	opened time.Time
	err    error
}

func (e *connError) Error() string { return e.err.Error() }
func (e *connError) Unwrap() error { return e.err }

// closedIdle reports whether an idle connection was closed (or sent
// something unasked) by the other side: a peek that does not wait. (A Go
// read with a deadline already passed returns without looking.)
func closedIdle(c net.Conn, rd *bufio.Reader) bool {
	if rd.Buffered() > 0 {
		return true
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return true
	}
	closed := false
	err = raw.Read(func(fd uintptr) bool {
		var b [1]byte
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		closed = n > 0 || (n == 0 && err == nil) || (err != nil && err != syscall.EAGAIN)
		return true
	})
	return closed || err != nil
}

// serverCounters is the non-zero failure and retry counters of backend's
// servers in s's current worker ("show stat": eresp, wretr, wredis,
// srv_abrt, cli_abrt, econ), or why they could not be read.
func serverCounters(s *sidecar, backend string) string {
	out, err := s.masterCommand("@1 show stat -1 4 -1")
	if err != nil {
		return err.Error()
	}
	rows, err := statRows(out)
	if err != nil {
		return err.Error()
	}
	var counts []string
	for _, r := range rows {
		if r["pxname"] != backend {
			continue
		}
		for _, name := range []string{"eresp", "wretr", "wredis", "srv_abrt", "cli_abrt", "econ"} {
			if v := r[name]; v != "" && v != "0" {
				counts = append(counts, fmt.Sprintf("%s %s=%s", r["svname"], name, v))
			}
		}
	}
	if len(counts) == 0 {
		return "none"
	}
	return strings.Join(counts, ", ")
}

// serverConns is what "show servers conn" says of the connections of
// backend's servers that have had any: in use now, most in use at once,
// HAProxy's estimate of those needed, and idle; or why it could not be
// read.
func serverConns(s *sidecar, backend string) string {
	out, err := s.masterCommand("@1 show servers conn " + backend)
	if err != nil {
		return err.Error()
	}
	var head []string
	var conns []string
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) > 1 && f[0] == "#" {
			head = f[1:]
			continue
		}
		// idle_per_thr[N] is N columns: the row is longer than the head.
		if len(f) < len(head) || len(head) == 0 {
			continue
		}
		row := map[string]string{}
		for i, name := range head {
			row[name] = f[i]
		}
		if row["used_max"] == "0" {
			continue
		}
		conns = append(conns, fmt.Sprintf("%s used_cur=%s used_max=%s need_est=%s idle_cur=%s", f[0], row["used_cur"], row["used_max"], row["need_est"], row["idle_cur"]))
	}
	if head == nil {
		return fmt.Sprintf("show servers conn: %q", out)
	}
	if len(conns) == 0 {
		return "none"
	}
	return strings.Join(conns, ", ")
}

// TestReloadUnderLoad: a sidecar reloads for a new upstream while 500
// local clients, each on its own kept-alive connection, and a few clients
// opening a connection per request, call the client's upstream. Not one
// request fails, across the reload and for afterReload after the old
// worker has gone; there is exactly one reload, and the old worker is gone
// within the sidecar's -hard-stop-after, in http mode without needing it.
// The sidecar that reloads is the client's (its local clients' connections
// move to the new worker) or the server's (the client sidecar's pooled
// connections to it move). In tcp mode connections cannot move: each kept
// one may lose the exchange in flight at the hard stop, and nothing else
// may fail.
func TestReloadUnderLoad(t *testing.T) {
	for _, tc := range []struct{ proto, side string }{{"http", "client"}, {"http", "server"}, {"tcp", "client"}} {
		t.Run(tc.proto+"/"+tc.side, func(t *testing.T) {
			m := startReloadMesh(t, tc.proto)
			testReloadUnderLoad(t, m, tc.proto, tc.side)
		})
	}
}

// startReloadMesh is the two-sidecar mesh with protocol proto, both
// sidecars with -hard-stop-after hardStop[proto], and a server application
// that answers HTTP requests or lines on kept connections.
func startReloadMesh(t *testing.T, proto string) *mesh {
	t.Helper()
	app := lineApp(t)
	if proto == "http" {
		app = httpApp(t, "server")
	}
	m := &mesh{consul: testenv.Consul(t, testenv.ConsulOptions{}), ports: testenv.FreePorts(t, 4), app: app}
	m.c = m.consul.Client
	register(t, m.c, "server", m.app, m.ports[0], map[string]any{"protocol": proto})
	m.upstream = api.Upstream{DestinationName: "server", LocalBindPort: m.ports[3], Config: map[string]any{"protocol": proto}}
	register(t, m.c, "client", m.ports[1], m.ports[2], nil, m.upstream)
	args := []string{"-hard-stop-after", hardStop[proto].String()}
	m.server = startSidecar(t, m.consul, "server", args...)
	m.client = startSidecar(t, m.consul, "client", args...)
	return m
}

// maxconn is the Maxconn of the sidecar's current worker. The rendered
// configuration sets none: HAProxy derives it from the open files limit,
// which it raises to the hard limit (about half of that).
func maxconn(t *testing.T, s *sidecar) int {
	t.Helper()
	info, err := s.rt.Do(context.Background(), runtime.ShowInfo())
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(l, "Maxconn: "); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatalf("show info: %q", l)
			}
			return n
		}
	}
	t.Fatalf("show info has no Maxconn:\n%s", info)
	return 0
}

// testReloadUnderLoad runs the load through m (protocol proto), makes side
// ("client" or "server") reload once for a new upstream, and checks the
// requests, the reload count and the old worker's end.
//
// In tcp mode a connection cannot move: the old worker keeps the
// connections it holds until -hard-stop-after and then closes them. So
// there a kept-alive client may lose the one exchange in flight at that
// instant, once, and no other.
func testReloadUnderLoad(t *testing.T, m *mesh, proto, side string) {
	port := m.ports[3]
	reloading := m.client
	if side == "server" {
		reloading = m.server
	}
	var newKept func(i int) func() (bool, error)
	var freshCall func() error
	if proto == "http" {
		url := fmt.Sprintf("http://127.0.0.1:%d/", port)
		newKept = func(i int) func() (bool, error) { return httpConnClient(t, url, i) }
		freshCall = serves(port, "hello from server")
	} else {
		newKept = func(int) func() (bool, error) { return tcpConnClient(t, port) }
		freshCall, _ = lineCaller(port, false)
	}
	eventually(t, 10*time.Second, "the mesh serves", freshCall)
	for _, s := range []*sidecar{m.client, m.server} {
		if n := maxconn(t, s); n < 2*reloadLoadConns {
			t.Fatalf("HAProxy's maxconn is %d, below the %d connections of this test: HAProxy derives it from the open files hard limit (ulimit -Hn), raise it", n, 2*reloadLoadConns)
		}
	}

	kept := startConnLoad(reloadLoadConns, reloadLoadInterval, newKept)
	fresh := startConnLoad(4, reloadLoadInterval, func(int) func() (bool, error) {
		return func() (bool, error) { return false, freshCall() }
	})
	stopped := false
	stopAll := func() (keptN, freshN loadCounts, keptErr, freshErr error) {
		stopped = true
		keptN, keptErr = kept.stop()
		freshN, freshErr = fresh.stop()
		return
	}
	defer func() {
		if !stopped {
			stopAll()
		}
	}()
	eventually(t, 30*time.Second, "every kept-alive client has an answer", func() error {
		if n := kept.ready.Load(); n < reloadLoadConns {
			return fmt.Errorf("%d of %d clients answered", n, reloadLoadConns)
		}
		return nil
	})
	before := reloading.reloads(t)
	pl, err := reloading.rt.Procs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	old, ok := pl.Current()
	if !ok {
		t.Fatalf("no current worker: %+v", pl)
	}
	atReload := kept.counts()
	// The connections a reload of the server sidecar's HAProxy sends a
	// GOAWAY on (runtime/HAPROXY26.md).
	t.Logf("client sidecar's connections to up_server before the reload: %s", serverConns(m.client, "up_server"))

	// A new upstream in the registration is one reload; its endpoints do
	// not matter.
	extra := testenv.FreePort(t)
	other := api.Upstream{DestinationName: "other", LocalBindPort: extra, Config: map[string]any{"protocol": proto}}
	registered := time.Now()
	if side == "client" {
		register(t, m.c, "client", m.ports[1], m.ports[2], nil, m.upstream, other)
	} else {
		register(t, m.c, "server", m.app, m.ports[0], map[string]any{"protocol": proto}, other)
	}
	eventually(t, 10*time.Second, "the sidecar reloaded", func() error {
		if reloading.reloads(t) <= before {
			return errors.New("not yet")
		}
		return nil
	})
	reloaded := time.Since(registered)
	// The old worker has a bound: -hard-stop-after, counted from when the
	// new worker told it to stop, which may come a little after the
	// master's reload count moved; the hard stop then shuts every stream
	// and exits at most 1 s later (hard_stop, src/proxy.c). Without the
	// bound it would stay for as long as its connections do: the TCP
	// ones here never end.
	eventually(t, hardStop[proto]+oldWorkerGrace, "the old worker is gone", func() error {
		pl, err := reloading.rt.Procs(context.Background())
		if err != nil {
			return err
		}
		for _, w := range pl.Workers {
			if w.PID == old.PID {
				return fmt.Errorf("worker %d still there (%d workers)", old.PID, len(pl.Workers))
			}
		}
		return nil
	})
	goneAt := time.Now()
	gone := goneAt.Sub(registered)
	atGone := kept.counts()
	// The new upstream's port is bound: the new worker has the new
	// configuration.
	if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", extra), 2*time.Second); err != nil {
		t.Errorf("the new upstream's port: %v", err)
	} else {
		c.Close()
	}
	time.Sleep(afterReload)
	keptN, freshN, keptErr, freshErr := stopAll()

	during, after := atGone.sub(atReload), keptN.sub(atGone)
	t.Logf("after the registration: reload seen at %s, old worker gone at %s", reloaded.Round(time.Millisecond), gone.Round(time.Millisecond))
	t.Logf("kept-alive clients: %d requests ok, %d failed (first: %v); until the old worker went: %d ok, %d failed, %d connections opened; after: %d ok, %d failed, %d on reused connections",
		keptN.ok, keptN.failed, keptErr, during.ok, during.failed, during.opened, after.ok, after.failed, after.reused)
	t.Logf("new connection per request: %d ok, %d failed (first: %v)", freshN.ok, freshN.failed, freshErr)
	// HAProxy does not log a request it closes without a response on a
	// kept-alive local connection (so that the client retries): the
	// calling sidecar's counters say what its servers did.
	t.Logf("client sidecar's up_server servers: %s", serverCounters(m.client, "up_server"))
	for name, l := range map[string]*connLoad{"kept-alive": kept, "new connection": fresh} {
		fs := l.failuresBetween(time.Time{}, time.Now())
		for _, f := range fs[:min(len(fs), 5)] {
			t.Logf("%s client %d failed %s after the registration: %v", name, f.client, f.at.Sub(registered).Round(time.Millisecond), f.err)
		}
	}
	if proto == "http" && keptN.failed > 0 {
		t.Errorf("%d of %d requests on kept-alive connections failed; first: %v", keptN.failed, keptN.ok+keptN.failed, keptErr)
	}
	if proto == "tcp" {
		// A failure the hard stop explains: on a connection opened
		// before the registration (so held by the old worker), and
		// after the hard stop, which comes hardStop after the old
		// worker was told to stop, itself after the registration.
		perClient := map[int]int{}
		var cut int64
		for _, f := range kept.failuresBetween(time.Time{}, time.Now()) {
			var ce *connError
			if errors.As(f.err, &ce) && ce.opened.Before(registered) && !f.at.Before(registered.Add(hardStop[proto])) {
				perClient[f.client]++
				cut++
			}
		}
		t.Logf("tcp: %d exchanges cut by the hard stop, on %d connections", cut, len(perClient))
		if other := keptN.failed - cut; other > 0 {
			t.Errorf("%d of %d exchanges on kept-alive connections failed other than at the hard stop; first: %v", other, keptN.ok+keptN.failed, keptErr)
		}
		for c, n := range perClient {
			if n > 1 {
				t.Errorf("client %d lost %d exchanges at the hard stop, want at most 1", c, n)
			}
		}
	}
	if freshN.failed > 0 || freshN.ok == 0 {
		t.Errorf("%d of %d requests on new connections failed; first: %v", freshN.failed, freshN.ok+freshN.failed, freshErr)
	}
	// The clients keep their connections on the new worker.
	if after.ok == 0 || after.reused == 0 {
		t.Errorf("after the old worker went: %d requests ok, %d on reused connections", after.ok, after.reused)
	}
	// HAProxy logs the hard stop, with the worker's PID.
	hardStopped := strings.Contains(reloading.out.String(), fmt.Sprintf("(%d) : soft-stop running for too long, performing a hard-stop", old.PID))
	if want := proto == "tcp"; hardStopped != want {
		t.Errorf("the old worker ended by the hard stop: %v, want %v", hardStopped, want)
	}
	if got := reloading.reloads(t) - before; got != 1 {
		t.Errorf("%d reloads for one new upstream, want 1", got)
	}
}
