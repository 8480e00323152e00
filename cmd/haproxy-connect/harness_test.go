package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/csv"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/scrape"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// sidecarBin is the haproxy-connect binary under test, built once.
var sidecarBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "hcbin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	sidecarBin = filepath.Join(dir, "haproxy-connect")
	if out, err := exec.Command("go", "build", "-o", sidecarBin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build haproxy-connect: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

type syncBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// sidecar is a running haproxy-connect process.
type sidecar struct {
	id       string
	cmd      *exec.Cmd
	out      *syncBuf
	stateDir string
	stats    string
	rt       *runtime.Client
	done     chan struct{}
	// http reaches stats: from inside the sidecar's host when it runs on
	// a test network host.
	http *http.Client
}

// startSidecar runs the built binary for service id against consul and
// waits until /readyz answers. When consul runs on a test network host
// (testenv.NewNet), the sidecar runs on that host too, next to its agent.
func startSidecar(t *testing.T, consul *testenv.ConsulProc, id string, extra ...string) *sidecar {
	t.Helper()
	s := launchSidecar(t, consul, id, testenv.ShortTempDir(t), extra...)
	s.waitReady(t)
	return s
}

// launchSidecar starts the built binary for service id on stateDir and
// returns at once. At the end of the test it is stopped with SIGTERM, and
// an HAProxy it leaves (it was killed: HAProxy outlives it) is killed.
func launchSidecar(t *testing.T, consul *testenv.ConsulProc, id, stateDir string, extra ...string) *sidecar {
	t.Helper()
	haproxy := testenv.HAProxyBin(t)
	s := &sidecar{id: id, out: &syncBuf{}, stateDir: stateDir, stats: fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t)), done: make(chan struct{}),
		http: http.DefaultClient}
	args := append([]string{"-sidecar-for", id, "-http-addr", consul.Addr, "-haproxy-bin", haproxy,
		"-state-dir", s.stateDir, "-stats-addr", s.stats, "-log-level", "debug",
		// A stop waits for idle kept-alive local connections to send their
		// next request (idle-close-on-response) up to -stop-timeout: keep
		// the end of each test short.
		"-stop-timeout", "3s"}, extra...)
	s.cmd = exec.Command(sidecarBin, args...)
	if h := consul.Host(); h != nil {
		s.cmd = h.Command(sidecarBin, args...)
		s.http = &http.Client{Transport: h.Transport()}
	}
	s.cmd.Stdout, s.cmd.Stderr = s.out, s.out
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// HAProxy inherits the output pipe and may outlive the sidecar.
	s.cmd.WaitDelay = time.Second
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = s.cmd.Wait(); close(s.done) }()
	t.Cleanup(func() {
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.done:
		case <-time.After(20 * time.Second):
			_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
			<-s.done
		}
		if pid := s.masterPID(); pid > 0 && runtime.ProcessAlive(pid) && !stateDirLocked(s.stateDir) {
			runtime.Kill(pid) // left by a killed sidecar that nothing adopted
		}
		if t.Failed() {
			t.Logf("sidecar %s output:\n%s", id, failureLog(s.out.String(), 300, 20))
		}
		// HC_TEST_LOGDIR keeps every sidecar's whole output, for a
		// failure whose cause the excerpt above leaves out.
		if dir := os.Getenv("HC_TEST_LOGDIR"); dir != "" {
			name := strings.NewReplacer("/", "_", " ", "_").Replace(t.Name()) + "." + id + "." + time.Now().Format("150405.000") + ".log"
			_ = os.WriteFile(filepath.Join(dir, name), []byte(s.out.String()), 0o644)
		}
	})
	s.rt = runtime.New(filepath.Join(s.stateDir, "master.sock"), nil)
	t.Cleanup(func() { _ = s.rt.Close() })
	return s
}

// waitReady waits until the sidecar's /readyz answers 200.
func (s *sidecar) waitReady(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := s.http.Get("http://" + s.stats + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		select {
		case <-s.done:
			t.Fatalf("sidecar for %s exited:\n%s", s.id, s.out.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("sidecar for %s not ready in 30s:\n%s", s.id, failureLog(s.out.String(), 100, 10))
		}
	}
}

// stateDirLocked reports whether a haproxy-connect holds dir's lock.
func stateDirLocked(dir string) bool {
	f, err := os.Open(filepath.Join(dir, "lock"))
	if err != nil {
		return false
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return true
	}
	_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	return false
}

// masterPID is the HAProxy master PID in the sidecar's pid file (0 if none).
func (s *sidecar) masterPID() int {
	pid, _ := runtime.ReadPID(filepath.Join(s.stateDir, "haproxy.pid"))
	return pid
}

// failureLog is a sidecar's output for a failed test: its own lines (the
// sidecar's log and HAProxy's notices; the last own of them, and before
// them every HAProxy notice and every warning or error of the sidecar's,
// which the debug lines of a load would otherwise push out), and of
// HAProxy's traffic log the lines of requests or connections that did not
// succeed (up to access of them) and the last access lines.
func failureLog(out string, own, access int) string {
	var mine, traffic, failed []string
	keep := map[int]bool{} // indexes in mine kept above the last own
	for _, l := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		switch {
		case accessLine.MatchString(l):
			traffic = append(traffic, l)
			if failedAccess.MatchString(l) {
				failed = append(failed, l)
			}
		default:
			if notable.MatchString(l) {
				keep[len(mine)] = true
			}
			mine = append(mine, l)
		}
	}
	var b strings.Builder
	from := max(0, len(mine)-own)
	left := 0
	for i, l := range mine {
		if i < from && !keep[i] {
			left++
			continue
		}
		if left > 0 {
			fmt.Fprintf(&b, "(%d lines of its own left out)\n", left)
			left = 0
		}
		b.WriteString(l + "\n")
	}
	if n := len(failed); n > 0 && access > 0 {
		fmt.Fprintf(&b, "(%d access log lines of a failure; the first %d:)\n", n, min(n, access))
		for _, l := range failed[:min(n, access)] {
			b.WriteString(l + "\n")
		}
	}
	if n := len(traffic); n > 0 {
		fmt.Fprintf(&b, "(%d access log lines; the last %d:)\n", n, min(n, access))
		for _, l := range traffic[max(0, n-access):] {
			b.WriteString(l + "\n")
		}
	}
	return strings.TrimSuffix(b.String(), "\n")
}

// accessLine matches HAProxy's access log lines: they start with the
// client's address and port.
var accessLine = regexp.MustCompile(`^(\d{1,3}\.){3}\d{1,3}:\d+ |^\[[0-9a-f:]+\]:\d+ `)

// failedAccess matches the access log lines of a failure, in any of the
// sidecar's formats: a 4xx or 5xx status, a request HAProxy could not
// parse or route, or a termination state other than a normal end.
//
// The status follows the timers (httplog) or the path (the public
// listener's format); HAProxy's termination states start with one of
// CSPRIDLKUcs and then one of RQCHDLT, "----" or "--" for a normal end.
var failedAccess = regexp.MustCompile(`/\S* [45]\d\d |<BADREQ>|<NOSRV>| [CSPRIDLKUcs][RQCHDLT-][-A-Z]{2} | [CSPRIDLKUcs][RQCHDLT-]$`)

// notable matches HAProxy's own notices and the sidecar's warnings and
// errors.
var notable = regexp.MustCompile(`^\[(NOTICE|WARNING|ALERT)\]|^\S+\t(warn|error|dpanic|panic|fatal)\t`)

// statRows reads "show stat" CSV: a map of column to value per row.
func statRows(out string) ([]map[string]string, error) {
	rows, err := csv.NewReader(strings.NewReader(strings.TrimPrefix(out, "# "))).ReadAll()
	if err != nil || len(rows) == 0 {
		return nil, fmt.Errorf("show stat: %v: %q", err, out)
	}
	var ms []map[string]string
	for _, r := range rows[1:] {
		m := make(map[string]string, len(r))
		for i, v := range r {
			if i < len(rows[0]) {
				m[rows[0][i]] = v
			}
		}
		ms = append(ms, m)
	}
	return ms, nil
}

// reloads is the master's reload counter. The master socket refuses
// connections while the master re-executes for a reload, which parses the
// configuration and builds every slot's TLS context again: about 0.4 s
// on a quiet machine, and 6.8 s was seen under TestReloadUnderLoad's load
// with both CPUs also busy elsewhere. The sidecar waits it out; so does
// this.
func (s *sidecar) reloads(t *testing.T) int {
	t.Helper()
	var pl runtime.ProcList
	var err error
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if pl, err = s.rt.Procs(context.Background()); err == nil {
			return pl.Master.Reloads
		}
	}
	t.Fatal(err)
	return 0
}

// passing is a check that is passing from the start, so tests do not wait
// for Consul's first TCP check.
func passing() api.AgentServiceChecks {
	return api.AgentServiceChecks{{Name: "alive", TTL: "1h", Status: api.HealthPassing}}
}

// register registers a service with a sidecar on sidecarPort.
func register(t *testing.T, c *api.Client, name string, port, sidecarPort int, proxyCfg map[string]any, ups ...api.Upstream) {
	t.Helper()
	err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: name, Name: name, Port: port, Address: "127.0.0.1", Checks: passing(),
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
			Port: sidecarPort, Address: "127.0.0.1", Checks: passing(),
			Proxy: &api.AgentServiceConnectProxyConfig{Config: proxyCfg, Upstreams: ups},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
}

// mesh is the seed's minimal example: the app "server" behind its sidecar,
// and "client" whose upstream "server" listens on ports[3], one sidecar each,
// against one Consul agent.
type mesh struct {
	consul *testenv.ConsulProc
	c      *api.Client
	// ports: server sidecar, client app, client sidecar, client's upstream.
	ports []int
	// app is the server application's port.
	app            int
	upstream       api.Upstream
	server, client *sidecar
}

// startMesh starts the mesh with protocol proto: for http the app answers
// "hello from server", for tcp it writes that line. clientArgs go to the
// client's sidecar.
func startMesh(t *testing.T, opts testenv.ConsulOptions, proto string, clientArgs ...string) *mesh {
	t.Helper()
	if proto == "http" {
		return startMeshWith(t, opts, proto, httpApp(t, "server"), clientArgs...)
	}
	return startMeshWith(t, opts, proto, tcpApp(t, "hello from server"), clientArgs...)
}

// startMeshWith is startMesh with the server application listening on app.
func startMeshWith(t *testing.T, opts testenv.ConsulOptions, proto string, app int, clientArgs ...string) *mesh {
	t.Helper()
	m := &mesh{consul: testenv.Consul(t, opts), ports: testenv.FreePorts(t, 4), app: app}
	m.c = m.consul.Client
	register(t, m.c, "server", m.app, m.ports[0], map[string]any{"protocol": proto})
	m.upstream = api.Upstream{DestinationName: "server", LocalBindPort: m.ports[3], Config: map[string]any{"protocol": proto}}
	register(t, m.c, "client", m.ports[1], m.ports[2], nil, m.upstream)
	m.server = startSidecar(t, m.consul, "server")
	m.client = startSidecar(t, m.consul, "client", clientArgs...)
	return m
}

// httpApp serves "hello from <name>" on a free loopback port.
func httpApp(t *testing.T, name string) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return serveApp(t, ln, name)
}

// serveApp answers "hello from <name>" on ln until the test ends, and
// returns its port.
func serveApp(t *testing.T, ln net.Listener, name string) int {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s\n", name)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().(*net.TCPAddr).Port
}

// tcpApp answers every connection with one line and closes.
func tcpApp(t *testing.T, line string) int {
	return testenv.ServeTCP(t, func(c net.Conn) { fmt.Fprintln(c, line) })
}

// load calls f in a loop until the returned stop is called; stop reports
// how many calls succeeded and failed, and the first failure.
func load(f func() error) (stop func() (ok, failed int64, first error)) {
	return loadN(1, f)
}

// loadN is load with n concurrent loops.
func loadN(n int, f func() error) (stop func() (ok, failed int64, first error)) {
	var okN, failedN atomic.Int64
	// A pointer: errors of several types may come, and atomic.Value
	// panics when a swap brings another type than the one it holds.
	var firstErr atomic.Pointer[error]
	done := make(chan struct{})
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-done:
					return
				default:
				}
				if err := f(); err != nil {
					failedN.Add(1)
					firstErr.CompareAndSwap(nil, &err)
					continue
				}
				okN.Add(1)
			}
		}()
	}
	return func() (int64, int64, error) {
		close(done)
		wg.Wait()
		var err error
		if p := firstErr.Load(); p != nil {
			err = *p
		}
		return okN.Load(), failedN.Load(), err
	}
}

// get200 is a load call: GET on port must answer 200.
func get200(port int) func() error {
	return func() error {
		code, _, err := get(port)
		if err == nil && code != 200 {
			err = fmt.Errorf("status %d", code)
		}
		return err
	}
}

// noKeepAlive is an HTTP client that opens a new connection per request.
var noKeepAlive = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// get returns the status and body of GET http://127.0.0.1:port/.
func get(port int) (int, string, error) {
	resp, err := noKeepAlive.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b)), err
}

// serves is a check that GET on port answers 200 with body.
func serves(port int, body string) func() error {
	return func() error {
		code, got, err := get(port)
		if err != nil || code != 200 || got != body {
			return fmt.Errorf("%d %q %v", code, got, err)
		}
		return nil
	}
}

// addServerEndpoint registers one more endpoint of "server": a relay on a
// new port to the server sidecar at sidecarPort. It returns the relay's port.
func addServerEndpoint(t *testing.T, c *api.Client, id string, sidecarPort int) int {
	t.Helper()
	port := testenv.Relay(t, fmt.Sprintf("127.0.0.1:%d", sidecarPort))
	if err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: id, Name: "server-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Port: port, Address: "127.0.0.1",
		Checks: passing(), Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "server", DestinationServiceID: "server"},
	}); err != nil {
		t.Fatal(err)
	}
	return port
}

// inService lists the servers of backend not in maintenance, as sorted
// "addr:port".
func (s *sidecar) inService(backend string) ([]string, error) {
	st, err := s.rt.ServersState(context.Background(), backend)
	if err != nil {
		return nil, err
	}
	var got []string
	for _, srv := range st {
		if !srv.Maint() {
			got = append(got, net.JoinHostPort(srv.Addr, strconv.Itoa(srv.Port)))
		}
	}
	slices.Sort(got)
	return got, nil
}

// inBackend is a check that a server of backend, not in maintenance,
// points at port.
func (s *sidecar) inBackend(backend string, port int) func() error {
	return func() error {
		st, err := s.rt.ServersState(context.Background(), backend)
		if err != nil {
			return err
		}
		for _, srv := range st {
			if !srv.Maint() && srv.Port == port {
				return nil
			}
		}
		return fmt.Errorf("%s servers: %+v", backend, st)
	}
}

// tcpLine connects to port and returns the first line, or an error when the
// connection is closed without one.
func tcpLine(port int) (string, error) {
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

// eventually polls f every 20 ms until it returns nil or d passes, and
// returns how long it took.
func eventually(t *testing.T, d time.Duration, what string, f func() error) time.Duration {
	t.Helper()
	start := time.Now()
	var err error
	for time.Since(start) < d {
		if err = f(); err == nil {
			return time.Since(start)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s: not within %s: %v", what, d, err)
	return 0
}

func intention(t *testing.T, c *api.Client, src, dst string, action api.IntentionAction) (index uint64) {
	t.Helper()
	_, _, err := c.ConfigEntries().Set(&api.ServiceIntentionsConfigEntry{
		Kind: api.ServiceIntentions, Name: dst,
		Sources: []*api.SourceIntention{{Name: src, Action: action}},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	e, _, err := c.ConfigEntries().Get(api.ServiceIntentions, dst, nil)
	if err != nil {
		t.Fatal(err)
	}
	return e.GetModifyIndex()
}

// keptAlive returns a GET of url over tr, which keeps its connection
// between calls, and whether the last call reused one. The transport's
// idle connections are closed when the test ends.
func keptAlive(t *testing.T, tr *http.Transport, url string) (call func() (int, error), reused *atomic.Bool) {
	t.Cleanup(tr.CloseIdleConnections)
	reused = new(atomic.Bool)
	ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
		GotConn: func(i httptrace.GotConnInfo) { reused.Store(i.Reused) },
	})
	client := &http.Client{Timeout: 5 * time.Second, Transport: tr}
	return func() (int, error) {
		req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
		resp, err := client.Do(req)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, nil
	}, reused
}

// metric reads one sample of the sidecar's /metrics: the metric's name
// (a histogram's may end in _sum or _count) and its labels as name, value
// pairs, all of them.
func (s *sidecar) metric(name string, labels ...string) (float64, error) {
	if strings.ContainsAny(name, "{}") {
		return 0, fmt.Errorf("metric %q: pass labels as name, value arguments", name)
	}
	f, err := s.metrics()
	if err != nil {
		return 0, err
	}
	return f.Value(name, labels...)
}

// metrics reads the sidecar's /metrics.
func (s *sidecar) metrics() (scrape.Families, error) {
	return scrape.Get(context.Background(), s.http, "http://"+s.stats+"/metrics")
}

// sawIntentions is a check that the sidecar's intention watch has seen
// the intentions as of index, and so decides under them.
func (s *sidecar) sawIntentions(index uint64) func() error {
	return func() error {
		v, err := s.metric("haproxy_connect_authz_intentions_index")
		if err != nil {
			return err
		}
		if uint64(v) < index {
			return fmt.Errorf("intentions index %d, want %d or more", uint64(v), index)
		}
		return nil
	}
}

func TestFailureLog(t *testing.T) {
	out := strings.Join([]string{
		"2026-12-01T21:21:00.084Z\tinfo\tserving connect proxy",
		"127.0.0.1:41784 src=spiffe://td/ns/default/dc/dc1/svc/client GET / 200 138 11 local_app/app",
		"[NOTICE]   (16607) : New worker (16609) forked",
		"2026-12-01T21:21:00.090Z\tdebug\truntime command",
		"[::1]:5000 [01/Dec/2026:21:21:00.1] up_server up_server/s1 0/0/0/0/0 200 183 - - ---- 1/1/0/0/0 0/0 \"POST / HTTP/1.1\"",
		"127.0.0.1:41786 src=- GET / 403 192 0 public_listener/<NOSRV>",
		"127.0.0.1:53240 [03/Dec/2026:22:11:41.283] up_server up_server/s1 0/240/0/-1/244 502 209 - - SH-- 497/497/352/352/3 0/0 \"GET / HTTP/1.1\"",
		"127.0.0.1:39884 src=- crt=08 spoe_err=- <BADREQ> <BADREQ> 0 0 298 public_listener/<NOSRV>",
		"127.0.0.1:39886 src=spiffe://td/ns/default/dc/dc1/svc/client crt=08 spoe_err=- 1412 5 local_app/app --",
		"127.0.0.1:39888 src=spiffe://td/ns/default/dc/dc1/svc/client crt=08 spoe_err=- 0 3 local_app/app SD",
		"2026-12-01T21:21:01.000Z\tdebug\truntime command",
		"2026-12-01T21:21:01.936Z\twarn\tinbound connection not decided",
		"2026-12-01T21:21:02.000Z\tinfo\tstopped",
	}, "\n") + "\n"
	tests := []struct {
		name        string
		own, access int
		want        string
	}{
		{"all", 10, 10, "2026-12-01T21:21:00.084Z\tinfo\tserving connect proxy\n[NOTICE]   (16607) : New worker (16609) forked\n2026-12-01T21:21:00.090Z\tdebug\truntime command\n" +
			"2026-12-01T21:21:01.000Z\tdebug\truntime command\n2026-12-01T21:21:01.936Z\twarn\tinbound connection not decided\n2026-12-01T21:21:02.000Z\tinfo\tstopped\n" +
			"(4 access log lines of a failure; the first 4:)\n" +
			"127.0.0.1:41786 src=- GET / 403 192 0 public_listener/<NOSRV>\n" +
			"127.0.0.1:53240 [03/Dec/2026:22:11:41.283] up_server up_server/s1 0/240/0/-1/244 502 209 - - SH-- 497/497/352/352/3 0/0 \"GET / HTTP/1.1\"\n" +
			"127.0.0.1:39884 src=- crt=08 spoe_err=- <BADREQ> <BADREQ> 0 0 298 public_listener/<NOSRV>\n" +
			"127.0.0.1:39888 src=spiffe://td/ns/default/dc/dc1/svc/client crt=08 spoe_err=- 0 3 local_app/app SD\n" +
			"(7 access log lines; the last 7:)\n" +
			"127.0.0.1:41784 src=spiffe://td/ns/default/dc/dc1/svc/client GET / 200 138 11 local_app/app\n" +
			"[::1]:5000 [01/Dec/2026:21:21:00.1] up_server up_server/s1 0/0/0/0/0 200 183 - - ---- 1/1/0/0/0 0/0 \"POST / HTTP/1.1\"\n" +
			"127.0.0.1:41786 src=- GET / 403 192 0 public_listener/<NOSRV>\n" +
			"127.0.0.1:53240 [03/Dec/2026:22:11:41.283] up_server up_server/s1 0/240/0/-1/244 502 209 - - SH-- 497/497/352/352/3 0/0 \"GET / HTTP/1.1\"\n" +
			"127.0.0.1:39884 src=- crt=08 spoe_err=- <BADREQ> <BADREQ> 0 0 298 public_listener/<NOSRV>\n" +
			"127.0.0.1:39886 src=spiffe://td/ns/default/dc/dc1/svc/client crt=08 spoe_err=- 1412 5 local_app/app --\n" +
			"127.0.0.1:39888 src=spiffe://td/ns/default/dc/dc1/svc/client crt=08 spoe_err=- 0 3 local_app/app SD"},
		// The notice and the warning stay; the debug lines before the last
		// own go.
		{"capped", 1, 1, "(1 lines of its own left out)\n[NOTICE]   (16607) : New worker (16609) forked\n(2 lines of its own left out)\n" +
			"2026-12-01T21:21:01.936Z\twarn\tinbound connection not decided\n2026-12-01T21:21:02.000Z\tinfo\tstopped\n" +
			"(4 access log lines of a failure; the first 1:)\n127.0.0.1:41786 src=- GET / 403 192 0 public_listener/<NOSRV>\n" +
			"(7 access log lines; the last 1:)\n127.0.0.1:39888 src=spiffe://td/ns/default/dc/dc1/svc/client crt=08 spoe_err=- 0 3 local_app/app SD"},
		{"no access lines", 2, 0, "(1 lines of its own left out)\n[NOTICE]   (16607) : New worker (16609) forked\n(2 lines of its own left out)\n" +
			"2026-12-01T21:21:01.936Z\twarn\tinbound connection not decided\n2026-12-01T21:21:02.000Z\tinfo\tstopped\n(7 access log lines; the last 0:)"},
	}
	for _, tt := range tests {
		if got := failureLog(out, tt.own, tt.access); got != tt.want {
			t.Errorf("%s:\ngot:\n%s\nwant:\n%s", tt.name, got, tt.want)
		}
	}
}

// meshCert is the leaf Consul issues for service, as a client or server
// certificate of the mesh.
func meshCert(t *testing.T, c *api.Client, service string) tls.Certificate {
	t.Helper()
	leaf, _, err := c.Agent().ConnectCALeaf(service, nil)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair([]byte(leaf.CertPEM), []byte(leaf.PrivateKeyPEM))
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// servedWhileDown waits until the server at addr in backend is marked DOWN
// by passive checks (requests through the upstream port up make it fail),
// then sends 200 requests: each one that starts and ends while that
// server is DOWN must be answered by the healthy instance with wantBody,
// and at least 20 must. The failing server comes back after its good
// checks and is marked down again by its next errors, so requests outside
// a DOWN window are not judged.
func servedWhileDown(t *testing.T, sc *sidecar, backend, addr string, up int, wantBody string) {
	t.Helper()
	status := func() (string, error) {
		st, err := sc.rt.ServerStats(context.Background())
		if err != nil {
			return "", err
		}
		for _, s := range st {
			if s.Backend == backend && s.Addr == addr {
				return s.Status, nil
			}
		}
		return "", fmt.Errorf("no server of %s at %s: %+v", backend, addr, st)
	}
	eventually(t, 20*time.Second, "the failing instance marked down in "+backend, func() error {
		_, _, _ = get(up)
		st, err := status()
		if err == nil && !strings.HasPrefix(st, "DOWN") {
			err = fmt.Errorf("status %q", st)
		}
		return err
	})
	served := 0
	for range 200 {
		before, err := status()
		if err != nil {
			t.Fatal(err)
		}
		code, body, err := get(up)
		after, _ := status()
		if !strings.HasPrefix(before, "DOWN") || !strings.HasPrefix(after, "DOWN") {
			continue
		}
		served++
		if err != nil || code != 200 || body != wantBody {
			t.Fatalf("a request while the failing instance is down: %d %q %v", code, body, err)
		}
	}
	if served < 20 {
		t.Errorf("only %d requests ran while the failing instance was down", served)
	}
}
