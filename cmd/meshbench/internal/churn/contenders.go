package churn

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// contender is one system under test (a bench.Contender), started fresh
// each round.
type contender struct {
	name   string
	plain  bool          // serves api-plain (else api)
	alone  bool          // no data plane: Consul's notification with no contender running
	settle time.Duration // how long to wait for a pass to come into effect
	port   int           // where the load generator connects
	config string        // how it is set up, for the notes
	start  func(ctx context.Context) error
	stop   func()
	// profile, when set, saves a CPU profile of the contender over d under
	// -profile (haproxy-connect).
	profile func(name string, d time.Duration) <-chan error
	// poll returns the endpoints in effect (polled contenders).
	poll func(ctx context.Context) (map[string]bool, error)
	// reloads returns HAProxy's reload counter; nil when not applicable.
	reloads func(ctx context.Context) (int, error)
	// observer is the master-socket client behind reloads, closed after
	// stop.
	observer *runtime.Client
	// cpu returns the CPU time the contender's processes (their whole
	// trees) have used so far; nil when it has none (Consul alone).
	cpu func() (time.Duration, error)
	// pollCost is the contender's CPU seconds per poll of its observer
	// (calibrate), measured in each pass.
	pollCost float64
	// share reads the contender's own propagation histogram
	// (haproxy-connect's /metrics); nil when it has none.
	share func() (shares, error)
}

const (
	nameHC         = "haproxy-connect"
	nameCT         = "consul-template + reload"
	nameDNSDefault = "DNS SRV, default timers"
	nameDNSTuned   = "DNS SRV, tuned timers"
	nameAlone      = "Consul notification alone"
)

// observeHAProxy sets poll to read the HAProxy whose worker-level stats
// socket is worker (bench.ObserveSocket), reloads to read its master
// socket (twice a pass, outside the measured changes), and cpu to read
// the CPU time of the process trees rooted at pids.
func (c *contender) observeHAProxy(master, worker, backend string, pids ...int) {
	c.observer = runtime.New(master, nil, runtime.WithTimeout(5*time.Second))
	c.poll, c.reloads = serversPoll(worker, backend), reloadCounter(c.observer)
	c.cpu = func() (time.Duration, error) {
		var sum time.Duration
		for _, pid := range pids {
			u, err := bench.Tree(pid)
			if err != nil {
				return 0, err
			}
			sum += u.CPU
		}
		return sum, nil
	}
}

// calibrationPolls is how many polls calibrate times back to back.
const calibrationPolls = 1000

// calibrate measures the observer's own cost: the contender's CPU time
// (its process trees, c.cpu) per poll over calibrationPolls polls back to
// back. The pass's observer takes about this much CPU from the contender
// per poll, at the poll interval it reports. pass calls it once the
// starting state is in effect, before the measured changes; a failed poll
// (a reload replacing the worker) is retried, a few times. polls counts
// the pass's own observer's polls, which go on meanwhile and are counted
// in.
func (c *contender) calibrate(ctx context.Context, polls func() int) error {
	before, err := c.cpu()
	if err != nil {
		return err
	}
	loop0 := polls()
	for n, failed := 0, 0; n < calibrationPolls; {
		if _, err := c.poll(ctx); err != nil {
			if failed++; failed > 100 {
				return fmt.Errorf("observer: %w", err)
			}
			time.Sleep(time.Millisecond)
			continue
		}
		n++
	}
	after, err := c.cpu()
	if err != nil {
		return err
	}
	c.pollCost = (after - before).Seconds() / float64(calibrationPolls+polls()-loop0)
	return nil
}

// Name is the contender's name in the tables.
func (c *contender) Name() string { return c.name }

// Start starts the contender fresh.
func (c *contender) Start(ctx context.Context) error { return c.start(ctx) }

// Stop stops the contender and closes its observer.
func (c *contender) Stop() {
	c.stop()
	if c.observer != nil {
		_ = c.observer.Close()
		c.observer = nil
	}
}

// serversPoll is a poll of "show servers state <backend>" on the worker's
// stats socket sock: the address:port of every server not in maintenance.
// While a reload replaces the worker the socket may refuse a connection:
// the poll fails and bench.PollLoop tries again.
func serversPoll(sock, backend string) func(ctx context.Context) (map[string]bool, error) {
	return func(ctx context.Context) (map[string]bool, error) {
		text, err := bench.Command(sock, "show servers state "+backend)
		if err != nil {
			return nil, err
		}
		st, err := runtime.ParseServersState(text)
		if err != nil {
			return nil, err
		}
		out := make(map[string]bool, len(st))
		for _, s := range st {
			if !s.Maint() {
				out[net.JoinHostPort(s.Addr, strconv.Itoa(s.Port))] = true
			}
		}
		return out, nil
	}
}

// reloadCounter reads the master's reload counter from "show proc",
// retrying while the socket refuses connections (a reload in progress).
func reloadCounter(rt *runtime.Client) func(ctx context.Context) (int, error) {
	return func(ctx context.Context) (int, error) {
		var n int
		err := bench.WaitFor(ctx, 10*time.Second, func() error {
			pl, err := rt.Procs(ctx)
			n = pl.Master.Reloads
			return err
		})
		return n, err
	}
}

func (cb *workload) haproxyConnect() *contender {
	c := &contender{name: nameHC, settle: 30 * time.Second, port: cb.hcPort,
		config: "client sidecar `haproxy-connect -sidecar-for client` (default -min-slots 8), backend up_api"}
	var s *bench.Sidecar
	var deregister func()
	c.start = func(ctx context.Context) error {
		var err error
		if deregister, err = cb.regHC(); err != nil {
			return err
		}
		if s, err = cb.b.StartObservedSidecar(cb.consul, "client"); err != nil {
			return err
		}
		c.observeHAProxy(s.RT.Socket(), s.Observe, "up_api", s.Cmd.Process.Pid)
		stats := s.Stats
		c.share = func() (shares, error) { return scrapeShare(stats) }
		return nil
	}
	if cb.b.ProfileDir != "" {
		c.profile = func(name string, d time.Duration) <-chan error { return s.Profile(cb.b.ProfileDir, name, d) }
	}
	c.stop = func() {
		if s != nil {
			s.Proc.Stop()
		}
		if deregister != nil {
			deregister()
		}
	}
	return c
}

// The HAProxy configuration both HAProxy contenders without mTLS
// (consul-template and DNS SRV) share, so that only how servers are found
// differs: haproxyGlobal, then the DNS contender's resolvers, then
// haproxyProxies (its %d: the load port), then the servers.
const (
	haproxyGlobal = `global
    master-worker
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
`
	haproxyProxies = `frontend fe
    bind 127.0.0.1:%d
    default_backend be
backend be
    balance roundrobin
`
)

// ctHead is the HAProxy configuration consul-template renders, up to the
// backend's servers; ctServers is the consul-template range that renders one
// server per passing api-plain instance (its service function returns
// passing instances only).
const (
	ctHead    = haproxyGlobal + haproxyProxies
	ctServers = `{{- range service "api-plain" }}
    server {{ .ID }} {{ .Address }}:{{ .Port }}
{{- end }}
`
)

// reloadScript is consul-template's command: reload HAProxy through
// the master socket, as the issue asks, and wait until the master's reload
// counter ("show proc") has moved. A bare "echo reload | socat" is not
// enough on 2.6: the master answers a reload with nothing and drops the
// connection, and a reload that reaches it while it re-executes is lost with
// the same silence and socat's exit status 0 (reproduced here: 39 reloads
// sent back to back, 37 done), which can leave the last render unapplied.
// The socket also refuses connections during a re-exec: the counter is read
// again until it answers. An unconfirmed reload is sent again after 1 s, up
// to 20 times; the script always exits 0 (as the seed's "|| true"), so that
// consul-template keeps running and a lost change shows as never in effect.
const reloadScript = `sock=%s
count() { echo "show proc" | socat stdio "unix-connect:$sock" 2>/dev/null | awk '$2 == "master" { print $3; exit }'; }
i=0
before=$(count)
while [ -z "$before" ]; do
  i=$((i+1)); [ $i -ge 500 ] && { echo "reload: master socket unreachable" >&2; exit 0; }
  sleep 0.01; before=$(count)
done
try=0
while [ $try -lt 20 ]; do
  echo reload | socat stdio "unix-connect:$sock" >/dev/null 2>&1
  i=0
  while [ $i -lt 100 ]; do
    now=$(count)
    [ -n "$now" ] && [ "$now" -gt "$before" ] && exit 0
    i=$((i+1)); sleep 0.01
  done
  try=$((try+1))
done
echo "reload: not confirmed" >&2
exit 0
`

func (cb *workload) consulTemplate() *contender {
	c := &contender{name: nameCT, plain: true, settle: 30 * time.Second}
	var h *testenv.HAProxyProc
	var ct *bench.Proc
	c.start = func(ctx context.Context) error {
		ports, err := cb.b.Ports(1)
		if err != nil {
			return err
		}
		c.port = ports[0]
		// HAProxy starts with no server; consul-template's first render
		// reloads it, and the pass waits for that (its starting state).
		sock, global, err := cb.b.ObserveSocket()
		if err != nil {
			return err
		}
		head := strings.Replace(fmt.Sprintf(ctHead, c.port), "global\n", "global\n"+global, 1)
		if h, err = cb.b.StartHAProxy(head); err != nil {
			return err
		}
		src := filepath.Join(h.Dir, "haproxy.ctmpl")
		if err := os.WriteFile(src, []byte(head+ctServers), 0o600); err != nil {
			return err
		}
		script := filepath.Join(h.Dir, "reload.sh")
		if err := os.WriteFile(script, []byte(fmt.Sprintf(reloadScript, h.MasterSock)), 0o700); err != nil {
			return err
		}
		reload := "/bin/sh " + script
		// Everything else is consul-template's default: no wait (quiescence)
		// block, max_stale 2s, block_query_wait 60s, and its fixed pacing of
		// at least 100 ms (+0-20 ms jitter) between two queries of one
		// dependency (watch/view.go, minDelayBetweenUpdates).
		cfg := fmt.Sprintf("consul {\n  address = %q\n}\nlog_level = \"warn\"\ntemplate {\n  source = %q\n  destination = %q\n  command = %q\n}\n",
			cb.consul.Addr, src, h.ConfigPath, reload)
		cfgPath := filepath.Join(h.Dir, "ct.hcl")
		if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
			return err
		}
		if ct, err = cb.b.Start("consul-template", cb.b.ConsulTemplate, "-config", cfgPath); err != nil {
			return err
		}
		c.observeHAProxy(h.MasterSock, sock, "be", h.PID(), ct.Cmd.Process.Pid)
		return nil
	}
	c.stop = func() {
		ct.Stop()
		if h != nil {
			h.Stop()
		}
	}
	c.config = "consul-template v0.41.3 renders the whole haproxy.cfg (`{{range service \"api-plain\"}}` one `server` line each) and runs `echo reload | socat stdio unix-connect:<master.sock>` and waits until `show proc` shows the master's reload counter moved, sending it again after 1 s if not (a bare reload that reaches the 2.6 master while it re-executes is lost silently: 2 of 39 back to back here); its defaults otherwise: no `wait`, max_stale 2s, and its fixed ≥100 ms (+0–20 ms jitter) pacing between two blocking queries"
	return c
}

// dnsSlots is the server-template size: the burst plus the base and room.
func dnsSlots(burst int) int { return burst + 32 }

func (cb *workload) dnsSRV(tuned bool) *contender {
	// Its slowest answer is about one resolution interval (1 s by default):
	// 4 s is generous, and bounds the wait when a burst does not fit in one
	// DNS answer (dnsPayloadNote).
	c := &contender{name: nameDNSDefault, plain: true, settle: 4 * time.Second}
	timers := ""
	if tuned {
		c.name = nameDNSTuned
		timers = "    " + strings.ReplaceAll(dnsTunedTimers, ", ", "\n    ") + "\n"
	}
	_, burst := plansFor(cb.b.Quick)
	var h *testenv.HAProxyProc
	c.start = func(ctx context.Context) error {
		ports, err := cb.b.Ports(1)
		if err != nil {
			return err
		}
		c.port = ports[0]
		sock, global, err := cb.b.ObserveSocket()
		if err != nil {
			return err
		}
		cfg := fmt.Sprintf(strings.Replace(haproxyGlobal, "global\n", "global\n"+global, 1)+`resolvers consul
    nameserver consul 127.0.0.1:%d
    accepted_payload_size 65535
%s`+haproxyProxies+`    server-template s %d _api-plain._tcp.service.consul resolvers consul resolve-prefer ipv4 init-addr none
`, cb.consul.DNSPort, timers, c.port, dnsSlots(burst.changes))
		if h, err = cb.b.StartHAProxy(cfg); err != nil {
			return err
		}
		c.observeHAProxy(h.MasterSock, sock, "be", h.PID())
		return nil
	}
	c.stop = func() {
		if h != nil {
			h.Stop()
		}
	}
	c.config = fmt.Sprintf("HAProxy `server-template s %d _api-plain._tcp.service.consul resolvers consul resolve-prefer ipv4 init-addr none`, `resolvers consul` with `nameserver consul 127.0.0.1:<consul dns port>`, `accepted_payload_size 65535` and ",
		dnsSlots(burst.changes))
	if tuned {
		c.config += "`" + dnsTunedTimers + "`"
	} else {
		c.config += "no timer set (2.6 defaults: timeout resolve 1s, timeout retry 1s, resolve_retries 3, hold valid 10s, hold other/refused/nx/timeout 30s, hold obsolete 0s)"
	}
	return c
}

// consulAlone is Consul's notification with no contender running: the
// baseline watch on health/connect/api by itself, the same writes, no load.
// In a contender's pass the baseline watch shares the two CPUs with that
// contender (haproxy-connect's own watch asks Consul for the same answers,
// then its controller and HAProxy work), which slows it: measured here, a
// Consul p50 of about 10 ms in haproxy-connect's pass against 1-3 ms in the
// others at 10 changes/s. Both references are reported.
func (cb *workload) consulAlone() *contender {
	return &contender{name: nameAlone, alone: true,
		config: "only the baseline blocking query on health/connect/api, no contender and no load",
		start:  func(context.Context) error { return nil }, stop: func() {}}
}

var _ bench.Contender = (*contender)(nil)
