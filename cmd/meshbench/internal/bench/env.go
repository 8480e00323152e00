package bench

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// Env is the machine a benchmark runs on: binaries, a work directory, and
// everything started, stopped in reverse order by Close.
type Env struct {
	Dir                                           string
	HAProxy, Consul, Sidecar, ConsulTemplate, Wrk string
	// Profiling starts sidecars with -pprof-addr (meshbench -profile).
	// Off, they run at their defaults, without it: serving pprof keeps
	// heap profiling on, which costs memory.
	Profiling bool
	mu        sync.Mutex
	cleanups  []func()
}

// Logf prints progress to stderr.
func (e *Env) Logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "meshbench: "+format+"\n", a...)
}

// Defer registers f to run at Close.
func (e *Env) Defer(f func()) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.cleanups = append(e.cleanups, f)
}

// Fresh returns an Env with the same binaries and work dir and nothing
// started. Each workload runs in one (Bench.RunWorkload), and rounds that
// start their own Consul and sidecar run in one of the workload's, each
// closed when it ends: what is left running would share the binaries'
// pages with the next sidecar measured (lowering its Pss) and take CPU
// from it.
func (e *Env) Fresh() *Env {
	return &Env{Dir: e.Dir, HAProxy: e.HAProxy, Consul: e.Consul, Sidecar: e.Sidecar,
		ConsulTemplate: e.ConsulTemplate, Wrk: e.Wrk, Profiling: e.Profiling}
}

// Close stops everything, newest first.
func (e *Env) Close() {
	e.mu.Lock()
	fs := e.cleanups
	e.cleanups = nil
	e.mu.Unlock()
	for i := len(fs) - 1; i >= 0; i-- {
		fs[i]()
	}
}

// Subdir makes a new short directory under the work dir (unix socket paths
// must stay under 108 bytes).
func (e *Env) Subdir(prefix string) (string, error) {
	// MkdirTemp, not a counter: workloads make Envs of their own on the
	// same Dir (one per round), and a name taken twice gave a new
	// sidecar the state dir of one still running (its lock refused it).
	return os.MkdirTemp(e.Dir, prefix)
}

// Ports returns n free loopback ports.
func (e *Env) Ports(n int) ([]int, error) { return testenv.PickPorts(n) }

// StartConsul starts a Consul dev agent.
func (e *Env) StartConsul(opts testenv.ConsulOptions) (*testenv.ConsulProc, error) {
	dir, err := e.Subdir("c")
	if err != nil {
		return nil, err
	}
	c, err := testenv.LaunchConsul(e.Consul, dir, opts)
	if err != nil {
		return nil, err
	}
	e.Defer(c.Stop)
	return c, nil
}

// StartConsulClient starts a Consul client agent that joins server (see
// testenv.LaunchConsulClient).
func (e *Env) StartConsulClient(server *testenv.ConsulProc, opts testenv.ConsulOptions) (*testenv.ConsulProc, error) {
	dir, err := e.Subdir("c")
	if err != nil {
		return nil, err
	}
	c, err := testenv.LaunchConsulClient(e.Consul, dir, server, opts)
	if err != nil {
		return nil, err
	}
	e.Defer(c.Stop)
	return c, nil
}

// StartHAProxy starts haproxy (master-worker, master socket in its dir).
func (e *Env) StartHAProxy(config string) (*testenv.HAProxyProc, error) {
	dir, err := e.Subdir("h")
	if err != nil {
		return nil, err
	}
	h, err := testenv.LaunchHAProxy(e.HAProxy, dir, config)
	if err != nil {
		return nil, err
	}
	e.Defer(h.Stop)
	return h, nil
}

// Proc is a started process.
type Proc struct {
	Cmd  *exec.Cmd
	Log  string
	done chan struct{}
}

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Start runs bin with its output in a log file under the work dir; Close
// stops it (SIGTERM, then SIGKILL to its group after 10 s).
func (e *Env) Start(name, bin string, args ...string) (*Proc, error) {
	logPath := filepath.Join(e.Dir, fmt.Sprintf("%s.%d.log", name, time.Now().UnixNano()))
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Proc{Cmd: cmd, Log: logPath, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); logf.Close(); close(p.done) }()
	e.Defer(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
	})
	return p, nil
}

// Sidecar is a running haproxy-connect.
type Sidecar struct {
	*Proc
	StateDir string
	Stats    string
	Pprof    string // the -pprof-addr listener; empty unless Env.Profiling
	// Observe is the worker-level stats socket of StartObservedSidecar
	// (empty otherwise).
	Observe string
	RT      *runtime.Client
}

// StartSidecar runs haproxy-connect for service id at its defaults (access
// logs on, to its log file) plus extra flags, and waits for /readyz.
func (e *Env) StartSidecar(consul *testenv.ConsulProc, id string, extra ...string) (*Sidecar, error) {
	dir, err := e.Subdir("s")
	if err != nil {
		return nil, err
	}
	ports, err := e.Ports(2)
	if err != nil {
		return nil, err
	}
	s := &Sidecar{StateDir: dir, Stats: fmt.Sprintf("127.0.0.1:%d", ports[0]),
		RT: runtime.New(filepath.Join(dir, "master.sock"), nil)}
	args := []string{"-sidecar-for", id, "-http-addr", consul.Addr, "-haproxy-bin", e.HAProxy,
		"-state-dir", dir, "-stats-addr", s.Stats}
	if e.Profiling {
		s.Pprof = fmt.Sprintf("127.0.0.1:%d", ports[1])
		args = append(args, "-pprof-addr", s.Pprof)
	}
	args = append(args, extra...)
	if s.Proc, err = e.Start("sidecar-"+id, e.Sidecar, args...); err != nil {
		return nil, err
	}
	err = WaitFor(context.Background(), 30*time.Second, func() error {
		select {
		case <-s.Done():
			return Stop(fmt.Errorf("sidecar %s exited, see %s", id, s.Log))
		default:
		}
		resp, err := http.Get("http://" + s.Stats + "/readyz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("readyz %d", resp.StatusCode)
		}
		return nil
	})
	return s, err
}

// StartObservedSidecar is StartSidecar with HAProxy run through
// ObservedHAProxy: the sidecar's own configuration, plus a worker-level
// stats socket (Sidecar.Observe) for the benchmark to observe it by.
func (e *Env) StartObservedSidecar(consul *testenv.ConsulProc, id string, extra ...string) (*Sidecar, error) {
	bin, sock, err := e.ObservedHAProxy()
	if err != nil {
		return nil, err
	}
	s, err := e.StartSidecar(consul, id, append([]string{"-haproxy-bin", bin}, extra...)...)
	if s != nil {
		s.Observe = sock
	}
	return s, err
}

// stopErr ends WaitFor at once.
type stopErr struct{ error }

// Stop wraps err so that WaitFor returns it without retrying.
func Stop(err error) error { return stopErr{err} }

// WaitFor polls f every 10 ms until it succeeds, d passes, or f returns Stop(err).
func WaitFor(ctx context.Context, d time.Duration, f func() error) error {
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return nil
		}
		var s stopErr
		if errors.As(err, &s) {
			return s.error
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not within %s: %w", d, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// Passing is a check passing from the start.
func Passing() api.AgentServiceChecks {
	return api.AgentServiceChecks{{Name: "alive", TTL: "24h", Status: api.HealthPassing}}
}

// RegisterWithSidecar registers service name on port with a sidecar on
// sidecarPort, both passing at once.
func RegisterWithSidecar(c *api.Client, name string, port, sidecarPort int, proxyCfg map[string]any, ups ...api.Upstream) error {
	return c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: name, Name: name, Port: port, Address: "127.0.0.1", Checks: Passing(),
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
			Port: sidecarPort, Address: "127.0.0.1", Checks: Passing(),
			Proxy: &api.AgentServiceConnectProxyConfig{Config: proxyCfg, Upstreams: ups},
		}},
	})
}

// HTTPApp serves a small fixed body on a free loopback port until Close.
func (e *Env) HTTPApp(body string) (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		_, _ = w.Write([]byte(body))
	}), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	e.Defer(func() { srv.Close() })
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// ProcUsage is a process's CPU time and peak resident memory, from /proc.
type ProcUsage struct {
	CPU     time.Duration
	PeakRSS int64 // bytes (VmHWM)
	RSS     int64 // bytes (VmRSS)
}

// Usage reads /proc/<pid>/stat and /proc/<pid>/status.
func Usage(pid int) (ProcUsage, error) {
	var u ProcUsage
	var err error
	if u.CPU, err = testenv.CPUTime(pid); err != nil {
		return u, err
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return u, err
	}
	for _, l := range strings.Split(string(status), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "VmHWM":
			u.PeakRSS = kb << 10
		case "VmRSS":
			u.RSS = kb << 10
		}
	}
	return u, nil
}

var errNoPprof = errors.New("the sidecar serves no pprof: set Env.Profiling")

// Profile saves a CPU profile of the sidecar over d into dir/name.pprof, in
// the background; wait on the returned channel.
func (s *Sidecar) Profile(dir, name string, d time.Duration) <-chan error {
	done := make(chan error, 1)
	if s.Pprof == "" {
		done <- errNoPprof
		return done
	}
	go func() {
		resp, err := http.Get(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", s.Pprof, int(d.Seconds())))
		if err != nil {
			done <- err
			return
		}
		defer resp.Body.Close()
		if err := os.MkdirAll(dir, 0o755); err != nil {
			done <- err
			return
		}
		f, err := os.Create(filepath.Join(dir, name+".pprof"))
		if err != nil {
			done <- err
			return
		}
		defer f.Close()
		_, err = io.Copy(f, resp.Body)
		done <- err
	}()
	return done
}

// HeapProfile saves the sidecar's heap profile (in-use and allocated
// memory as of its last garbage collection) into dir/name.pprof.
func (s *Sidecar) HeapProfile(dir, name string) error {
	if s.Pprof == "" {
		return errNoPprof
	}
	resp, err := http.Get(fmt.Sprintf("http://%s/debug/pprof/heap", s.Pprof))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("heap profile: %s", resp.Status)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.Create(filepath.Join(dir, name+".pprof"))
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(f, resp.Body)
	return err
}

// WaitUpstreams waits until GET through each client upstream port answers
// the app's body.
func WaitUpstreams(ctx context.Context, body string, ports ...int) error {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	return WaitFor(ctx, 30*time.Second, func() error {
		for _, p := range ports {
			resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/", p))
			if err != nil {
				return fmt.Errorf("upstream port %d: %w", p, err)
			}
			got, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil {
				return err
			}
			if resp.StatusCode != 200 || string(got) != body {
				return fmt.Errorf("upstream port %d: %d %q", p, resp.StatusCode, got)
			}
		}
		return nil
	})
}

// WriteFiles writes each file (mode 0600) before HAProxy reads them.
func WriteFiles(files []bootstrap.File) error {
	for _, f := range files {
		if err := os.WriteFile(f.Path, []byte(f.Content), 0o600); err != nil {
			return err
		}
	}
	return nil
}

// Stop stops a process started with Env.Start before the end of the run
// (Env.Close then finds it already gone); a nil p is ignored.
func (p *Proc) Stop() {
	if p == nil {
		return
	}
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.Done():
	case <-time.After(10 * time.Second):
		_ = syscall.Kill(-p.Cmd.Process.Pid, syscall.SIGKILL)
		<-p.Done()
	}
}

// ServeHandshakes listens on each of addrs with a leaf of service from
// Consul's CA and completes TLS handshakes there until e closes: endpoints
// a sidecar can prove the identity of, which serve nothing else.
func (e *Env) ServeHandshakes(c *api.Client, service string, addrs []string) error {
	leaf, _, err := c.Agent().ConnectCALeaf(service, nil)
	if err != nil {
		return fmt.Errorf("leaf of %s: %w", service, err)
	}
	cert, err := tls.X509KeyPair([]byte(leaf.CertPEM), []byte(leaf.PrivateKeyPEM))
	if err != nil {
		return fmt.Errorf("leaf of %s: %w", service, err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequestClientCert}
	for _, addr := range addrs {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return err
		}
		e.Defer(func() { ln.Close() })
		go testenv.Serve(tls.NewListener(ln, cfg), func(conn net.Conn) {
			_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
			_ = conn.(*tls.Conn).Handshake()
		})
	}
	return nil
}
