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
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/sirupsen/logrus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sync/errgroup"

	"github.com/haproxy-connect/haproxy-connect/controller"
	"github.com/haproxy-connect/haproxy-connect/spoa"
)

type options struct {
	sidecarFor, proxyID, httpAddr, token string
	haproxyBin, stateDir, statsAddr      string
	logLevel, logFormat                  string
	minSlots, threads                    int
	accessLog                            bool
	startTimeout, hardStopAfter          time.Duration
}

func main() {
	var o options
	fs := flag.NewFlagSet("haproxy-connect", flag.ContinueOnError)
	fs.StringVar(&o.sidecarFor, "sidecar-for", "", "ID of the service whose connect-proxy registration to serve")
	fs.StringVar(&o.proxyID, "proxy-id", "", "ID of the connect-proxy registration to serve (instead of -sidecar-for)")
	fs.StringVar(&o.httpAddr, "http-addr", "", "Consul HTTP API address (default: CONSUL_HTTP_ADDR, else 127.0.0.1:8500)")
	fs.StringVar(&o.token, "token", "", "Consul ACL token (default: CONSUL_HTTP_TOKEN)")
	fs.StringVar(&o.haproxyBin, "haproxy-bin", "haproxy", "path to haproxy")
	fs.StringVar(&o.stateDir, "state-dir", "", "directory for the config, PEM files and sockets (default: a new private temp dir)")
	fs.StringVar(&o.statsAddr, "stats-addr", "", "listen address for /metrics, /healthz, /readyz and /debug/pprof (off when empty; keep it private)")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug|info|warn|error")
	fs.StringVar(&o.logFormat, "log-format", "console", "console|json")
	fs.IntVar(&o.minSlots, "min-slots", 8, "smallest number of server slots per upstream")
	// Go sizes GOMAXPROCS from the CPU affinity and the cgroup CPU limit;
	// HAProxy's own default counts every CPU it may run on, so in a
	// container limited to 2 CPUs of a 64-CPU node it would start 64
	// threads, each waking for the same traffic.
	fs.IntVar(&o.threads, "threads", goruntime.GOMAXPROCS(0), "HAProxy worker threads (default: the CPUs this process may use, after cgroup limits; 0: HAProxy's default)")
	fs.BoolVar(&o.accessLog, "access-log", true, "HAProxy logs each connection/request (with the client SPIFFE ID) to stdout")
	fs.DurationVar(&o.startTimeout, "start-timeout", 30*time.Second, "how long to retry Consul at start")
	fs.DurationVar(&o.hardStopAfter, "hard-stop-after", controller.DefaultHardStopAfter, "how long an old HAProxy worker keeps the connections it holds after a reload (HTTP ones are closed between requests at once; TCP ones are cut after this)")
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
	// The authorizer's calls are short and api's ConnectAuthorize takes no
	// context: give them a client with a deadline of its own, so a hung
	// Consul cannot pile up goroutines (the blocking watches need none).
	acfg := *ccfg
	acfg.HttpClient, err = api.NewHttpClient(ccfg.Transport, ccfg.TLSConfig)
	if err != nil {
		return fmt.Errorf("consul client: %w", err)
	}
	acfg.HttpClient.Timeout = 2 * time.Second
	authClient, err := api.NewClient(&acfg)
	if err != nil {
		return fmt.Errorf("consul client: %w", err)
	}
	// haproxy-spoe-go logs each agent connection through logrus' global
	// logger; keep only its warnings.
	logrus.SetLevel(logrus.WarnLevel)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	proxy, err := findProxy(ctx, log, client, ccfg.Address, o)
	if err != nil {
		return err
	}
	log.Info("serving connect proxy", zap.String("proxy_id", proxy.ID), zap.String("service", proxy.Proxy.DestinationServiceName),
		zap.String("state_dir", stateDir), zap.String("master_socket", filepath.Join(stateDir, "master.sock")))

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("spoe agent listener: %w", err)
	}
	// Each intentions change bumps the agent's generation; the controller
	// publishes it to HAProxy so that kept-alive HTTP connections are
	// authorized again. The watch that calls the hook starts below, after
	// ctl is set.
	var ctl *controller.Controller
	auth := spoa.New(proxy.Proxy.DestinationServiceName, spoa.ConsulDecider{Client: authClient}, log.Named("spoa"),
		spoa.WithInvalidateHook(func(gen uint64) { ctl.SetAuthzGeneration(gen); ctl.WaitAuthzGeneration(gen) }))
	ctl, err = controller.New(controller.Config{
		Consul: ccfg, ProxyID: proxy.ID, StateDir: stateDir, HAProxyBin: bin,
		SPOAAddr: ln.Addr().String(), Log: log.Named("controller"), MinSlots: o.minSlots, AccessLog: o.accessLog,
		Threads: o.threads, HardStopAfter: o.hardStopAfter,
	})
	if err != nil {
		return err
	}

	g, gctx := errgroup.WithContext(ctx)
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
		if err := ctl.Run(gctx); err != nil {
			return err
		}
		return nil
	})
	if o.statsAddr != "" {
		srv := &http.Server{Addr: o.statsAddr, Handler: statsHandler(ctl, auth), ReadHeaderTimeout: 5 * time.Second}
		g.Go(func() error {
			if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("stats server: %w", err)
			}
			return nil
		})
		g.Go(func() error {
			<-gctx.Done()
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			return srv.Shutdown(sctx)
		})
	}
	err = g.Wait()
	log.Info("stopped", zap.Error(err))
	return err
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
		if time.Now().After(deadline) || ctx.Err() != nil {
			return nil, fmt.Errorf("consul at %s unreachable for %s: %v", addr, o.startTimeout, last)
		}
		if attempt%5 == 0 {
			log.Warn("consul not reachable yet, retrying", zap.Error(err))
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

// prepareStateDir creates (or makes) the private state directory. The
// master socket path must fit in a unix socket address (108 bytes).
func prepareStateDir(dir string) (string, error) {
	var err error
	if dir == "" {
		dir, err = os.MkdirTemp("", "haproxy-connect-")
		if err != nil {
			return "", fmt.Errorf("state dir: %w", err)
		}
		fmt.Fprintln(os.Stderr, "haproxy-connect: state dir", dir)
	} else if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("state dir: %w", err)
	}
	if dir, err = filepath.Abs(dir); err != nil {
		return "", err
	}
	if n := len(filepath.Join(dir, "master.sock")); n > 100 {
		return "", fmt.Errorf("state dir %s is too long for a unix socket path (%d bytes, max 100)", dir, n)
	}
	return dir, nil
}

func statsHandler(ctl *controller.Controller, auth *spoa.Authorizer) http.Handler {
	mux := http.NewServeMux()
	// Profiles, for the operator and for meshbench: the stats address is
	// meant to be loopback or otherwise private.
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/heap", pprof.Index)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !ctl.Ready() {
			http.Error(w, "haproxy not running the applied configuration yet", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		_, _ = ctl.Metrics().WriteTo(w)
		s := auth.Stats()
		fmt.Fprintf(w, "# TYPE haproxy_connect_authz_decisions_total counter\n")
		fmt.Fprintf(w, "haproxy_connect_authz_decisions_total{result=\"allow\"} %d\n", s.Allowed)
		fmt.Fprintf(w, "haproxy_connect_authz_decisions_total{result=\"deny\"} %d\n", s.Denied)
		fmt.Fprintf(w, "haproxy_connect_authz_decisions_total{result=\"undecided\"} %d\n", s.Undecided)
		fmt.Fprintf(w, "# TYPE haproxy_connect_authz_errors_total counter\nhaproxy_connect_authz_errors_total %d\n", s.Errors)
		fmt.Fprintf(w, "# TYPE haproxy_connect_authz_invalidations_total counter\nhaproxy_connect_authz_invalidations_total %d\n", s.Invalidations)
		fmt.Fprintf(w, "# TYPE haproxy_connect_authz_generation gauge\nhaproxy_connect_authz_generation %d\n", s.Generation)
		fmt.Fprintf(w, "# TYPE haproxy_connect_authz_intentions_index gauge\nhaproxy_connect_authz_intentions_index %d\n", s.IntentionsIndex)
		fmt.Fprintf(w, "# TYPE haproxy_connect_authz_cache_entries gauge\nhaproxy_connect_authz_cache_entries %d\n", s.CacheEntries)
		fmt.Fprintf(w, "# TYPE haproxy_connect_authz_cache_hits_total counter\nhaproxy_connect_authz_cache_hits_total %d\n", s.CacheHits)
		fmt.Fprintf(w, "# TYPE haproxy_connect_authz_consul_calls_total counter\nhaproxy_connect_authz_consul_calls_total %d\n", s.ConsulCalls)
	})
	return mux
}
