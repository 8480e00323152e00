// Command haproxy-connect runs HAProxy as the Consul Connect sidecar of one
// service: it finds the proxy registration, starts HAProxy in master-worker
// mode, the SPOE intentions agent and the controller, and serves metrics. It
// only wires the packages together.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	goruntime "runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sync/errgroup"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/controller"
	"github.com/haproxy-connect/haproxy-connect/l7"
	"github.com/haproxy-connect/haproxy-connect/promex"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/spoa"
	"github.com/haproxy-connect/haproxy-connect/tcpdeny"
)

type options struct {
	sidecarFor, proxyID, httpAddr, token string
	haproxyBin, stateDir, statsAddr      string
	pprofAddr                            string
	logLevel, logFormat                  string
	minSlots, threads, maxEndpoints      int
	maxAnswerBytes                       int64
	accessLog                            bool
	startTimeout, hardStopAfter          time.Duration
	stopTimeout                          time.Duration
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "status" {
		os.Exit(statusMain(os.Args[2:], os.Stdout, os.Stderr))
	}
	var o options
	fs := flag.NewFlagSet("haproxy-connect", flag.ContinueOnError)
	fs.StringVar(&o.sidecarFor, "sidecar-for", "", "ID of the service whose connect-proxy registration to serve")
	fs.StringVar(&o.proxyID, "proxy-id", "", "ID of the connect-proxy registration to serve (instead of -sidecar-for)")
	fs.StringVar(&o.httpAddr, "http-addr", "", "Consul HTTP API address (default: CONSUL_HTTP_ADDR, else 127.0.0.1:8500)")
	fs.StringVar(&o.token, "token", "", "Consul ACL token (default: CONSUL_HTTP_TOKEN)")
	fs.StringVar(&o.haproxyBin, "haproxy-bin", "haproxy", "path to haproxy")
	fs.StringVar(&o.stateDir, "state-dir", "", "directory for the config, PEM files and sockets (default: a new private temp dir)")
	fs.StringVar(&o.statsAddr, "stats-addr", "", "listen address for /metrics, /healthz and /readyz (off when empty)")
	fs.StringVar(&o.pprofAddr, "pprof-addr", "", "listen address for /debug/pprof (off when empty; profiles expose memory contents: keep it on loopback)")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug|info|warn|error")
	fs.StringVar(&o.logFormat, "log-format", "console", "console|json")
	fs.IntVar(&o.minSlots, "min-slots", 8, "smallest number of server slots per upstream")
	fs.IntVar(&o.maxEndpoints, "max-endpoints", controller.DefaultMaxEndpoints, "most endpoints of one upstream; past it a stable subset is kept (logged and counted)")
	fs.Int64Var(&o.maxAnswerBytes, "max-answer-bytes", controller.DefaultMaxAnswerBytes, "most bytes read from one Consul answer; a longer one is dropped (logged and counted)")
	fs.IntVar(&o.threads, "threads", defaultThreads(goruntime.GOMAXPROCS(0)), "HAProxy worker threads (default: 1 when this process may use 2 CPUs or fewer, after cgroup limits, else that many; 0: HAProxy's default)")
	fs.BoolVar(&o.accessLog, "access-log", true, "HAProxy logs each connection/request (with the client SPIFFE ID) to stdout")
	fs.DurationVar(&o.startTimeout, "start-timeout", 30*time.Second, "how long to retry Consul at start")
	fs.DurationVar(&o.hardStopAfter, "hard-stop-after", controller.DefaultHardStopAfter, "how long an old HAProxy worker keeps the connections it holds after a reload (HTTP ones move to the new worker on their next request, or once idle after a GOAWAY; TCP ones are cut after this)")
	fs.DurationVar(&o.stopTimeout, "stop-timeout", 15*time.Second, "on SIGTERM or SIGINT, how long HAProxy may finish the requests and connections it serves (its listeners close at once) before it is killed")
	if err := fs.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "haproxy-connect:", err)
		os.Exit(1)
	}
}

func newLogger(level, format string) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("-log-level %q: want debug, info, warn or error", level)
	}
	cfg := zap.NewProductionConfig()
	cfg.Level = zap.NewAtomicLevelAt(lvl)
	cfg.Sampling = nil
	cfg.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
	switch format {
	case "json":
	case "console":
		cfg.Encoding = "console"
	default:
		return nil, fmt.Errorf("-log-format %q: want console or json", format)
	}
	return cfg.Build()
}

func run(o options) error {
	if (o.sidecarFor == "") == (o.proxyID == "") {
		return errors.New("give exactly one of -sidecar-for <service-id> or -proxy-id <proxy-id>")
	}
	if o.pprofAddr == "" {
		// Nothing can read a heap profile: stop sampling for one. Every
		// sampled allocation site keeps a record for the life of the
		// process, in a hash table whose pages each new site touches.
		goruntime.MemProfileRate = 0
	}
	log, err := newLogger(o.logLevel, o.logFormat)
	if err != nil {
		return err
	}
	defer func() { _ = log.Sync() }()
	bin, err := exec.LookPath(o.haproxyBin)
	if err != nil {
		return fmt.Errorf("haproxy not found (%s): install it or pass -haproxy-bin", o.haproxyBin)
	}
	stateDir, err := prepareStateDir(o.stateDir)
	if err != nil {
		return err
	}
	unlock, err := lockStateDir(stateDir)
	if err != nil {
		return err
	}
	defer unlock()

	ccfg := api.DefaultConfig() // honours the CONSUL_HTTP_* variables, as the consul CLI does
	if o.httpAddr != "" {
		ccfg.Address = o.httpAddr
	}
	if o.token != "" {
		ccfg.Token = o.token
	}
	// The local agent compresses every answer a Go client accepts gzip for:
	// on loopback that is CPU spent twice for nothing (found by meshbench's
	// churn workload), so ask for answers plain. The endpoint watches, whose
	// answers are the large ones, ask for that themselves (controller's
	// healthReader); this covers api's calls.
	ccfg.Transport.DisableCompression = true
	client, err := api.NewClient(ccfg)
	if err != nil {
		return fmt.Errorf("consul client: %w", err)
	}
	// Every Consul answer is bounded in size; NewClient has set the HTTP
	// client it uses (its own for a unix:// address).
	answerLimit := controller.NewAnswerLimit(o.maxAnswerBytes, log.Named("consul"))
	answerLimit.Limit(ccfg.HttpClient)

	// A signal is a requested stop: HAProxy stops too. Any other end of
	// this process leaves HAProxy serving (see controller.Run).
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	proxy, err := findProxy(ctx, log, client, ccfg.Address, o)
	if err != nil {
		return err
	}
	log.Info("serving connect proxy", zap.String("proxy_id", proxy.ID), zap.String("service", proxy.Proxy.DestinationServiceName),
		zap.String("state_dir", stateDir), zap.String("master_socket", filepath.Join(stateDir, "master.sock")))

	spoaSocket := filepath.Join(stateDir, "spoa.sock")
	ln, err := listenUnix(spoaSocket)
	if err != nil {
		return fmt.Errorf("spoe agent listener: %w", err)
	}
	// Each intentions change bumps the agent's generation; the controller
	// publishes it to HAProxy so that kept-alive HTTP connections are
	// authorized again. The watch that calls the hook starts below, after
	// ctl is set.
	var ctl *controller.Controller
	// Once the agent decides under a new generation, the established
	// connections of a tcp listener are decided again (package tcpdeny),
	// through a runtime client of their own on the master socket.
	var sweeper *tcpdeny.Sweeper
	// The agent decides L4 and L7 (per request, on HTTP listeners) from
	// the destination's intentions it watches (WatchIntentions below).
	auth := spoa.New(proxy.Proxy.DestinationServiceName, nil, log.Named("spoa"),
		spoa.WithInvalidateHook(func(gen uint64) { ctl.SetAuthzGeneration(gen); ctl.WaitAuthzGeneration(gen) }),
		spoa.WithSwitchHook(func(uint64) { sweeper.Kick() }),
		spoa.WithL7MapHook(func(t []l7.Compiled) { ctl.SetL7Map(t) }),
		spoa.WithSourceHook(func(cert [32]byte, source string) { ctl.NameSource(cert, source) }),
		spoa.WithServedRootsGrace(o.hardStopAfter))
	sweeper = tcpdeny.New(runtime.New(filepath.Join(stateDir, controller.MasterSocket), log.Named("tcpdeny")),
		auth, bootstrap.PublicFrontend, log.Named("tcpdeny"))
	ctl, err = controller.New(controller.Config{
		Consul: ccfg, ProxyID: proxy.ID, StateDir: stateDir, HAProxyBin: bin,
		SPOASocket: spoaSocket, Log: log.Named("controller"), MinSlots: o.minSlots, AccessLog: o.accessLog,
		Threads: o.threads, HardStopAfter: o.hardStopAfter, MaxEndpoints: o.maxEndpoints, AnswerLimit: answerLimit,
		OnAdopt: auth.RaiseGeneration,
		OnRootsServed: func(pem string, fresh bool) {
			if err := auth.RootsServed(pem, fresh); err != nil {
				log.Warn("the SPOE agent verifies every client certificate chain itself", zap.Error(err))
			}
		},
	})
	if err != nil {
		return err
	}

	// The group runs until the controller has stopped HAProxy (a signal)
	// or one of its members fails. The controller alone sees the signal,
	// so that the agent keeps deciding while HAProxy finishes its
	// requests.
	runCtx, endRun := context.WithCancel(context.Background())
	defer endRun()
	g, gctx := errgroup.WithContext(runCtx)
	ctlCtx, stopCtl := context.WithCancel(gctx)
	defer stopCtl()
	go func() {
		select {
		case <-ctx.Done():
			stopCtl()
		case <-gctx.Done():
		}
	}()
	g.Go(func() error {
		err := auth.Serve(ln)
		if gctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("spoe agent: %w", err)
	})
	g.Go(func() error {
		<-gctx.Done()
		return ln.Close()
	})
	g.Go(func() error {
		auth.WatchIntentions(gctx, client)
		return nil
	})
	g.Go(func() error {
		sweeper.Run(gctx)
		return nil
	})
	g.Go(func() error {
		// Until its first answer, the agent leaves every inbound
		// connection undecided (refused, asked again).
		return auth.WatchRoots(gctx, client)
	})
	g.Go(func() error {
		if err := ctl.Run(ctlCtx); err != nil {
			return err
		}
		if ctx.Err() == nil {
			return nil // another member failed: HAProxy keeps serving
		}
		log.Info("stop requested: stopping haproxy", zap.Duration("stop_timeout", o.stopTimeout))
		err := ctl.Stop(o.stopTimeout)
		endRun()
		return err
	})
	if o.statsAddr != "" {
		serveHTTP(gctx, g, "stats server", statsServer(o.statsAddr, statsHandler(ctl, metricsGatherer(ctl, auth, sweeper, stateDir, log), log.Named("stats"))))
	}
	if o.pprofAddr != "" {
		serveHTTP(gctx, g, "pprof server", pprofServer(o.pprofAddr))
	}
	err = g.Wait()
	if ctx.Err() == nil {
		log.Error("exiting; haproxy keeps serving its last state, and the next haproxy-connect on this state directory adopts it",
			zap.String("state_dir", stateDir), zap.Error(err))
		if err == nil {
			err = errors.New("exited without a stop signal")
		}
		return err
	}
	log.Info("stopped", zap.Error(err))
	return err
}

// lockStateDir takes the state directory's lock for the life of this
// process: one controller per HAProxy. A second haproxy-connect on the same
// directory fails here, before it touches anything. The lock is an flock on
// <dir>/lock, which the kernel drops when this process exits however it
// exits; HAProxy does not inherit it (Go opens files close-on-exec).
func lockStateDir(dir string) (unlock func(), err error) {
	path := filepath.Join(dir, "lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state dir lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b := make([]byte, 32)
		n, _ := f.ReadAt(b, 0)
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("state dir %s is in use by another haproxy-connect (pid %s)", dir, strings.TrimSpace(string(b[:n])))
		}
		return nil, fmt.Errorf("state dir lock %s: %w", path, err)
	}
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return func() { f.Close() }, nil
}

// findProxy resolves the proxy registration, retrying while Consul cannot
// be reached for up to o.startTimeout. A missing or ambiguous registration
// fails at once.
func findProxy(ctx context.Context, log *zap.Logger, client *api.Client, addr string, o options) (*api.AgentService, error) {
	deadline := time.Now().Add(o.startTimeout)
	var last error
	for attempt := 0; ; attempt++ {
		id := o.proxyID
		var err error
		if id == "" {
			var services map[string]*api.AgentService
			services, err = client.Agent().ServicesWithFilterOpts("", (&api.QueryOptions{}).WithContext(ctx))
			if err == nil {
				id, err = controller.FindSidecar(services, o.sidecarFor)
				if errors.Is(err, controller.ErrNoSidecar) {
					// With ACLs, the agent leaves out what the token may not
					// read, and says so in no error.
					return nil, fmt.Errorf("%w (with ACLs the agent lists only the services the token may read: it needs service:read on the sidecar's registration)", err)
				}
				if err != nil {
					return nil, err
				}
			}
		}
		if err == nil {
			var svc *api.AgentService
			svc, _, err = client.Agent().Service(id, (&api.QueryOptions{}).WithContext(ctx))
			if err == nil {
				if svc.Kind != api.ServiceKindConnectProxy || svc.Proxy == nil {
					return nil, fmt.Errorf("service %q is not a connect-proxy", id)
				}
				return svc, nil
			}
			var se api.StatusError
			if errors.As(err, &se) && se.Code == http.StatusNotFound {
				return nil, fmt.Errorf("no service registration %q on the local agent", id)
			}
		}
		last = err
		// 403: Consul answers, but refuses the token (unknown, "ACL not
		// found", or lacking a permission). Retried as well: a token can
		// be created, or replicated to this datacenter, after the start.
		var se api.StatusError
		refused := errors.As(err, &se) && se.Code == http.StatusForbidden
		if time.Now().After(deadline) || ctx.Err() != nil {
			if refused {
				return nil, fmt.Errorf("consul at %s refused the token for %s (give it with -token, CONSUL_HTTP_TOKEN_FILE or CONSUL_HTTP_TOKEN; the README's \"Running it in production\" has the policy it needs): %v", addr, o.startTimeout, last)
			}
			return nil, fmt.Errorf("consul at %s unreachable for %s: %v", addr, o.startTimeout, last)
		}
		if attempt%5 == 0 {
			if refused {
				log.Warn("consul refused the token, retrying", zap.Error(err))
			} else {
				log.Warn("consul not reachable yet, retrying", zap.Error(err))
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

// prepareStateDir returns the absolute path of the private state
// directory, creating it 0700 when it does not exist (a new temp dir when
// dir is empty). The directory holds the master socket (full control of
// HAProxy), the SPOE agent's socket, the leaf's private key and the config
// HAProxy runs, so one that exists is used only if checkStateDir accepts it.
// The master socket path must fit in a unix socket address (108 bytes).
func prepareStateDir(dir string) (string, error) { return prepareStateDirAs(dir, os.Geteuid()) }

// prepareStateDirAs is prepareStateDir for a process running as uid.
func prepareStateDirAs(dir string, uid int) (string, error) {
	var err error
	if dir == "" {
		dir, err = os.MkdirTemp("", "haproxy-connect-")
		if err != nil {
			return "", fmt.Errorf("state dir: %w", err)
		}
		fmt.Fprintln(os.Stderr, "haproxy-connect: state dir", dir)
	}
	if dir, err = filepath.Abs(dir); err != nil {
		return "", err
	}
	if _, err := os.Lstat(dir); errors.Is(err, os.ErrNotExist) {
		// Parents that are missing are created 0700 too; Mkdir of the
		// last element fails if something appeared there meanwhile, and
		// the check below then judges what did.
		if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil {
			return "", fmt.Errorf("state dir: %w", err)
		}
		if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return "", fmt.Errorf("state dir: %w", err)
		}
	}
	if err := checkStateDir(dir, uid); err != nil {
		return "", err
	}
	if n := len(filepath.Join(dir, "master.sock")); n > 100 {
		return "", fmt.Errorf("state dir %s is too long for a unix socket path (%d bytes, max 100)", dir, n)
	}
	return dir, nil
}

// checkStateDir refuses a state directory that another user could change
// under us: a symlink (whoever owns the link's directory can point it
// elsewhere), not a directory, owned by another user than uid, or writable
// by its group or by everyone (anyone could plant a socket or a PEM file,
// or swap one). Its parent directories are not checked.
func checkStateDir(dir string, uid int) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	switch st, _ := fi.Sys().(*syscall.Stat_t); {
	case fi.Mode()&os.ModeSymlink != 0:
		return fmt.Errorf("state dir %s is a symlink: give the directory it points to", dir)
	case !fi.IsDir():
		return fmt.Errorf("state dir %s is not a directory", dir)
	case st == nil:
		return fmt.Errorf("state dir %s: cannot read its owner", dir)
	case int(st.Uid) != uid:
		return fmt.Errorf("state dir %s is owned by uid %d, not by this process (uid %d)", dir, st.Uid, uid)
	case fi.Mode().Perm()&0o022 != 0:
		return fmt.Errorf("state dir %s is writable by its group or by others (mode %04o): chmod go-w it", dir, fi.Mode().Perm())
	}
	return nil
}

// listenUnix listens on a unix socket at path, mode 0600. The SPOE agent
// answers as an intentions oracle with the sidecar's token: on loopback TCP
// any local process could ask it. A socket left by an earlier run is
// replaced; anything else at path is an error. The state directory is 0700
// and ours (checkStateDir), so nobody else can reach the socket in the
// moment between bind and chmod.
func listenUnix(path string) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, err
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// HTTP server limits. The stats server answers small GETs: a client that
// sends its headers slowly, or never reads its answer, is cut off instead
// of holding a goroutine and a socket forever. The pprof server's write
// timeout leaves room for a CPU profile (?seconds=N must stay below it:
// net/http/pprof refuses longer ones).
const (
	httpReadHeaderTimeout = 5 * time.Second
	httpReadTimeout       = 10 * time.Second
	httpIdleTimeout       = 2 * time.Minute
	statsWriteTimeout     = 30 * time.Second
	pprofWriteTimeout     = 10 * time.Minute
	httpMaxHeaderBytes    = 64 << 10
)

func statsServer(addr string, h http.Handler) *http.Server {
	return &http.Server{
		Addr: addr, Handler: h,
		ReadHeaderTimeout: httpReadHeaderTimeout, ReadTimeout: httpReadTimeout,
		WriteTimeout: statsWriteTimeout, IdleTimeout: httpIdleTimeout, MaxHeaderBytes: httpMaxHeaderBytes,
	}
}

// pprofServer serves net/http/pprof on its own listener, off by default:
// profiles and the goroutine dump show memory contents and internals, so
// they do not share the stats address, which is often opened to a scraper.
func pprofServer(addr string) *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return &http.Server{
		Addr: addr, Handler: mux,
		ReadHeaderTimeout: httpReadHeaderTimeout, ReadTimeout: httpReadTimeout,
		WriteTimeout: pprofWriteTimeout, IdleTimeout: httpIdleTimeout, MaxHeaderBytes: httpMaxHeaderBytes,
	}
}

// serveHTTP runs srv in g until ctx ends, then shuts it down within 5 s.
func serveHTTP(ctx context.Context, g *errgroup.Group, what string, srv *http.Server) {
	g.Go(func() error {
		if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("%s: %w", what, err)
		}
		return nil
	})
	g.Go(func() error {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return srv.Shutdown(sctx)
	})
}

func statsHandler(ctl *controller.Controller, metrics prometheus.Gatherer, log *zap.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !ctl.Ready() {
			http.Error(w, "haproxy not running the applied configuration yet", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	// A collector that fails is logged and left out; the rest is served.
	mux.Handle("/metrics", promhttp.HandlerFor(metrics, promhttp.HandlerOpts{
		ErrorLog: zapPrintln{log}, ErrorHandling: promhttp.ContinueOnError, Timeout: statsWriteTimeout / 2,
	}))
	return mux
}

// metricsGatherer is what /metrics serves, one scrape target: one
// registry (not the process-wide default one) with the controller's, the
// SPOE agent's and the tcp sweeper's metrics, Go's runtime and the
// process's, followed by HAProxy's own series (haproxy_*), read from its
// built-in exporter at each scrape (package promex).
func metricsGatherer(ctl *controller.Controller, auth *spoa.Authorizer, sweeper *tcpdeny.Sweeper, stateDir string, log *zap.Logger) prometheus.Gatherer {
	reg := prometheus.NewRegistry()
	reg.MustRegister(ctl.Metrics(), auth.Collector(), sweeper.Collector(),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return prometheus.Gatherers{reg, promex.New(filepath.Join(stateDir, controller.ExporterSocket), log.Named("promex"))}
}

// zapPrintln is promhttp's error log on zap.
type zapPrintln struct{ log *zap.Logger }

func (z zapPrintln) Println(v ...any) {
	z.log.Warn("metrics collection failed", zap.String("error", strings.TrimSuffix(fmt.Sprintln(v...), "\n")))
}

// defaultThreads is -threads' default for a process that may use cpus CPUs
// (GOMAXPROCS: Go sizes it from the CPU affinity and the cgroup CPU limit,
// where HAProxy's own default counts every CPU it may run on, so in a
// container limited to 2 CPUs of a 64-CPU node it would start 64 threads,
// each waking for the same traffic). On 2 CPUs or fewer, one thread: the
// sidecar shares them with its application, and one thread served more
// requests per CPU second there (BENCHMARKS.md, the thread lever).
func defaultThreads(cpus int) int {
	if cpus <= 2 {
		return 1
	}
	return cpus
}
