package main

// Workload "churn": endpoint churn propagation.
//
// Endpoints of an upstream are registered and deregistered in Consul at
// 10/s, at 100/s, and in a burst of 1000; for every change the time from
// Consul's write acknowledgement (the return of the catalog register or
// deregister call; each endpoint is on a node of its own, see
// newChurnPool) to the change being in effect in each contender's data
// plane is measured, next to Consul's own notification latency (a blocking
// query on the health endpoint the contender reads) measured in the same
// pass. A steady load generator runs through each contender the whole time.
//
// Choices, each also stated in the report notes:
//
//   - One Consul dev agent (DNS on) for the whole workload. Every endpoint
//     listens on its own loopback address (127.1.x.y for "api", 127.2.x.y for
//     "api-plain") on a kernel-chosen port. Distinct addresses are what a
//     real deployment has, and they matter for DNS: Consul names an SRV
//     target after the address (7f010005.addr.dc1.consul), and HAProxy 2.6
//     resolved only two of three SRV records sharing one target (checked by
//     hand on this machine: the third slot stayed in maintenance without an
//     address).
//   - "api" endpoints are connect-proxy registrations (as in TestChurn), each
//     a relay to the real "api" server sidecar, so every slot a client fills
//     really serves over mTLS. haproxy-connect and Consul's built-in proxy
//     use them. consul-template and DNS SRV give a plain TCP/HTTP data plane
//     with no mTLS, so they get "api-plain": plain services with the same
//     kind of relay endpoints in front of the plain HTTP app. Same number of
//     endpoints, same churn schedule, same health check; only the data plane
//     differs, which is the difference between the products.
//   - Removed endpoints keep serving (their relays stay open), as a
//     well-behaved instance that deregisters before it stops; a failed
//     request therefore means the data plane sent it somewhere wrong (a
//     parked slot, a dropped listener during a reload), not that it lagged.
//   - "In effect" for HAProxy contenders: polling
//     "@1 show servers state <backend>" on the master socket every
//     millisecond (on a kept prompt-mode session, reopened after a reload; churnPollPeriod);
//     an endpoint is in effect when a server that is not in maintenance
//     has its address and port. Every observation is
//     timestamped when the reply has been read, so each figure is an upper
//     bound, by at most one poll interval (reported). The Consul baseline is
//     timestamped the same way: when the blocking query returns.
//   - Changes are matched to observations per endpoint in order (add,
//     remove, add...). A change never observed before the same endpoint's
//     next change of the same kind, or before the pass ends, is counted as
//     "never in effect" and left out of the latencies.
//   - Contenders run one after the other (each started fresh every round,
//     in a rotated order), never together, so that they do not share the two
//     CPUs with each other's reloads.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/scrape"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

func init() { workloads = append(workloads, workload{"churn", runChurn}) }

// churnPlan is one pass: a rate with a number of changes, or a burst.
type churnPlan struct {
	name    string
	rate    float64 // changes per second; 0 for a burst
	changes int     // rate: measured changes; burst: endpoints added, then removed
	window  int     // rate: churn endpoints live during the pass
}

const (
	churnLoadRate    = 100                   // steady load, requests per second
	churnWriters     = 16                    // Consul writes in flight at most
	churnLandingWait = 90 * time.Millisecond // wait for a landing, within a 100 ms step
	churnEndurance   = 10000                 // changes in the haproxy-connect endurance check
	churnEnduranceAt = 200                   // its rate, changes/s: 50 s if Consul keeps up
)

// Tuned HAProxy resolver timers for the DNS SRV contender. The default
// contender sets none (HAProxy 2.6 defaults: resolve_retries 3, timeout
// resolve 1s, timeout retry 1s, hold valid 10s, hold other/refused/nx/
// timeout 30s, hold obsolete 0s). Both set accepted_payload_size 65535 (the
// maximum; the default 512 bytes holds 3 of Consul's SRV answers, see
// churnDNSPayloadNote).
const churnDNSTunedTimers = "timeout resolve 100ms, timeout retry 100ms, hold valid 100ms"

func churnPlans(quick bool) (rates []churnPlan, burst churnPlan, builtin churnPlan) {
	// The window is the number of churn endpoints alive at once; each lives
	// 2*window changes, which at 10/s and 100/s is 4 s and 2 s: longer than
	// the slowest contender's propagation (HAProxy DNS with default timers,
	// ~1 s), so that no contender misses a change only because the endpoint
	// was gone again before its next look.
	rates = []churnPlan{{name: "10 changes/s", rate: 10, changes: 100, window: 20}, {name: "100 changes/s", rate: 100, changes: 1000, window: 100}}
	burst = churnPlan{name: "burst of 1000", changes: 1000}
	builtin = churnPlan{name: "10 changes/s", rate: 10, changes: 50}
	if quick {
		rates[0].changes, rates[1].changes = 30, 300
		burst = churnPlan{name: "burst of 200", changes: 200}
		builtin.changes = 15
	}
	return rates, burst, builtin
}

// churnBench is the shared setup of the workload.
type churnBench struct {
	b        *Bench
	consul   *testenv.ConsulProc
	writer   *api.Client // registrations: its own pooled transport
	api      *churnPool  // "api" endpoints, relays to the server sidecar
	plain    *churnPool  // "api-plain" endpoints, relays to the plain app
	apiBase  string      // the real api sidecar: always live
	plainKey string      // the base api-plain endpoint (the app itself): always live
	appPort  int
	hcPort   int // client sidecar upstream port
	biPort   int // built-in proxy upstream port
	// regHC and regBuiltin register the client of haproxy-connect and of
	// the built-in proxy with its sidecar, and return the deregistration.
	regHC, regBuiltin func() (deregister func(), err error)
}

// clientRegistration returns a function that registers name with a sidecar
// whose one upstream is up, and returns the deregistration.
func clientRegistration(c *api.Client, name string, port, sidecarPort int, up api.Upstream) func() (func(), error) {
	return func() (func(), error) {
		if err := RegisterWithSidecar(c, name, port, sidecarPort, nil, up); err != nil {
			return nil, err
		}
		return func() {
			_ = c.Agent().ServiceDeregister(name + "-sidecar-proxy")
			_ = c.Agent().ServiceDeregister(name)
		}, nil
	}
}

func runChurn(ctx context.Context, b *Bench) error {
	rates, burst, builtinPlan := churnPlans(b.Quick)
	// As deployed: the contenders and their registrations on a client
	// agent, the host's own; the churn endpoints, instances on other
	// hosts, written to the server. A dev agent alone would also charge
	// Consul for what a client agent does not do: it indents every JSON
	// answer (twice the bytes), and runs the proxy-config watches of its
	// local proxy registrations on the server's state store, hashing each
	// whole result on every change (42 % of its CPU in a profile at
	// 100 changes/s).
	server, err := b.StartConsul(testenv.ConsulOptions{})
	if err != nil {
		return err
	}
	consul, err := b.StartConsulClient(server, testenv.ConsulOptions{DNS: true})
	if err != nil {
		return err
	}
	cb := &churnBench{b: b, consul: consul}
	cb.writer, err = api.NewClient(&api.Config{Address: server.Addr, HttpClient: &http.Client{
		// Generous: in a burst Consul is busy for seconds.
		Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: 2 * churnWriters},
	}})
	if err != nil {
		return err
	}
	if err := cb.setup(max(2*rates[1].window+2, burst.changes, builtinPlan.changes)); err != nil {
		return err
	}

	contenders := []*churnContender{cb.haproxyConnect(), cb.consulTemplate(), cb.dnsSRV(true), cb.dnsSRV(false), cb.builtin(), cb.consulAlone()}
	if b.ConsulTemplate == "" {
		b.Logf("churn: consul-template not installed, left out")
		contenders = slices.DeleteFunc(contenders, func(c *churnContender) bool { return c.name == churnCT })
	}
	contenders = slices.DeleteFunc(contenders, func(c *churnContender) bool { return !b.Wants(c.name) })
	res := map[string]map[string]*churnAgg{} // plan name -> contender -> rounds
	add := func(plan, name string, r churnResult) {
		if res[plan] == nil {
			res[plan] = map[string]*churnAgg{}
		}
		if res[plan][name] == nil {
			res[plan][name] = &churnAgg{}
		}
		res[plan][name].add(r)
	}
	for round := 0; round < b.Rounds; round++ {
		for i := range contenders {
			// Rotate the order so that no contender always runs first
			// (or last) in a round on this shared machine.
			c := contenders[(i+round)%len(contenders)]
			b.Logf("churn: round %d/%d, %s", round+1, b.Rounds, c.name)
			if err := c.start(ctx); err != nil {
				return fmt.Errorf("%s: %w", c.name, err)
			}
			plans := append(slices.Clone(rates), burst)
			if c.landing {
				plans = []churnPlan{builtinPlan}
			}
			for _, p := range plans {
				passStart := time.Now()
				r, err := cb.pass(ctx, c, p)
				if err != nil {
					c.stopAll()
					return fmt.Errorf("%s, %s: %w", c.name, p.name, err)
				}
				b.Logf("churn:   %s: p50 %s p99 %s (Consul p50 %s p99 %s), %d/%d never in effect, %d/%d requests failed, %d reloads, %s changes/s, %s",
					p.name, Dur(r.lat.Percentile(50)), Dur(r.lat.Percentile(99)), Dur(r.base.Percentile(50)), Dur(r.base.Percentile(99)),
					r.unseen, r.changes, r.failed, r.ok+r.failed, r.reloads, Num(r.rate), time.Since(passStart).Round(100*time.Millisecond))
				add(p.name, c.name, r)
			}
			c.stopAll()
			if ctx.Err() != nil {
				return ctx.Err()
			}
		}
	}
	for i, p := range append(slices.Clone(rates), burst) {
		cb.report(p, i == 0, contenders, res[p.name])
	}
	if !b.Quick && b.Wants(churnHC) {
		if err := cb.endurance(ctx); err != nil {
			return err
		}
	}
	return nil
}

// setup starts the api server sidecar, the endpoint pools, and registers
// the clients of haproxy-connect and of the built-in proxy.
func (cb *churnBench) setup(n int) error {
	b, c := cb.b, cb.consul.Client
	var err error
	if cb.appPort, err = b.HTTPApp("hello from api\n"); err != nil {
		return err
	}
	ports, err := b.Ports(6)
	if err != nil {
		return err
	}
	sidecarPort := ports[0]
	if err := RegisterWithSidecar(c, "api", cb.appPort, sidecarPort, map[string]any{"protocol": "http"}); err != nil {
		return err
	}
	if _, err := b.StartSidecar(cb.consul, "api"); err != nil {
		return err
	}
	cb.apiBase = fmt.Sprintf("127.0.0.1:%d", sidecarPort)
	cb.hcPort, cb.biPort = ports[3], ports[5]
	// The clients' registrations exist only during their contender's
	// passes (clientRegistration): for every connect-proxy registration
	// with an upstream, the agent runs its own proxy-config watch of that
	// upstream (proxycfg, whether or not a proxy consumes it), and two of
	// them took Consul's own notification p99 on health/connect at
	// 100 changes/s from about 25 ms to 85 ms on this machine.
	cb.regHC = clientRegistration(c, "client", ports[1], ports[2],
		api.Upstream{DestinationName: "api", LocalBindPort: cb.hcPort, Config: map[string]any{"protocol": "http"}})
	// The built-in proxy is L4 only: no protocol on its upstream.
	cb.regBuiltin = clientRegistration(c, "client-builtin", ports[1], ports[4],
		api.Upstream{DestinationName: "api", LocalBindPort: cb.biPort})
	// The base api-plain endpoint is the app itself: api-plain is never empty.
	cb.plainKey = fmt.Sprintf("127.0.0.1:%d", cb.appPort)
	if err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "api-plain-base", Name: "api-plain",
		Address: "127.0.0.1", Port: cb.appPort, Checks: Passing()}); err != nil {
		return err
	}
	cb.api, err = newChurnPool(b.Env, "api", 1, n, cb.apiBase, func(svc *api.AgentService) {
		svc.Service, svc.Kind = "api-sidecar-proxy", api.ServiceKindConnectProxy
		svc.Proxy = &api.AgentServiceConnectProxyConfig{DestinationServiceName: "api", DestinationServiceID: "api"}
	})
	if err != nil {
		return err
	}
	cb.plain, err = newChurnPool(b.Env, "api-plain", 2, n, cb.plainKey, func(svc *api.AgentService) { svc.Service = "api-plain" })
	return err
}

// churnEndpoint is one churn endpoint: a relay on its own loopback address,
// registered in the catalog on a node of its own.
type churnEndpoint struct {
	id, key string
	reg     *api.CatalogRegistration
	dereg   *api.CatalogDeregistration
}

// churnPool is a set of endpoints of one service, all listening for the whole
// workload.
type churnPool struct {
	eps      []churnEndpoint
	landings atomic.Pointer[churnTimeline] // set while a pass records landings
}

// newChurnPool opens n relays on 127.<octet>.x.y to target and prepares
// their registrations: service ID <prefix>-<i> on node <prefix>-node-<i>
// (with the endpoint's address), a check passing from the start; kind sets
// the service's name and kind.
//
// Endpoints go to the catalog, each on a node of its own, because they
// stand for instances on other hosts, which a client's agent never holds.
// Registered on the one local agent instead (Agent().ServiceRegister), each
// connect-proxy made the agent start its per-proxy machinery (proxycfg):
// measured here, 51 connect-proxy against 201 plain registrations/s
// (sequential), and 22 against 72-92 changes/s reached in a burst, a cost
// only the mTLS contenders would have paid. The write acknowledgement is
// then the catalog commit, with no agent anti-entropy step in between.
func newChurnPool(e *Env, prefix string, octet, n int, target string, kind func(*api.AgentService)) (*churnPool, error) {
	p := &churnPool{}
	for i := range n {
		addr := fmt.Sprintf("127.%d.%d.%d", octet, i/250, i%250+1)
		ln, err := net.Listen("tcp", addr+":0")
		if err != nil {
			return nil, fmt.Errorf("endpoint listener on %s: %w", addr, err)
		}
		e.Defer(func() { ln.Close() })
		port := ln.Addr().(*net.TCPAddr).Port
		id, node := fmt.Sprintf("%s-%d", prefix, i), fmt.Sprintf("%s-node-%d", prefix, i)
		svc := &api.AgentService{ID: id, Address: addr, Port: port}
		kind(svc)
		p.eps = append(p.eps, churnEndpoint{id: id, key: net.JoinHostPort(addr, strconv.Itoa(port)),
			reg: &api.CatalogRegistration{Node: node, Address: addr, Service: svc,
				Check: &api.AgentCheck{Node: node, CheckID: "alive", Name: "alive", Status: api.HealthPassing, ServiceID: id}},
			dereg: &api.CatalogDeregistration{Node: node, ServiceID: id}})
		go p.serve(ln, net.JoinHostPort(addr, strconv.Itoa(port)), target)
	}
	return p, nil
}

// serve relays every connection to target, recording its landing first.
func (p *churnPool) serve(ln net.Listener, key, target string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		if tl := p.landings.Load(); tl != nil {
			tl.land(time.Now(), key)
		}
		go func() {
			defer c.Close()
			testenv.Pipe(c, target)
		}()
	}
}

// churnContender is one system under test, started fresh each round.
type churnContender struct {
	name    string
	plain   bool          // serves api-plain (else api)
	landing bool          // in effect = a connection lands (built-in proxy), else polled
	alone   bool          // no data plane: Consul's notification with no contender running
	settle  time.Duration // how long to wait for a pass to come into effect
	port    int           // where the load generator connects
	config  string        // how it is set up, for the notes
	start   func(ctx context.Context) error
	stop    func()
	// profile, when set, saves a CPU profile of the contender over d under
	// -profile (haproxy-connect).
	profile func(name string, d time.Duration) <-chan error
	// poll returns the endpoints in effect (polled contenders).
	poll func(ctx context.Context) (map[string]bool, error)
	// reloads returns HAProxy's reload counter; nil when not applicable.
	reloads func(ctx context.Context) (int, error)
	// observer is the runtime client behind poll and reloads, closed after
	// stop.
	observer *runtime.Client
	// share reads the contender's own propagation histogram
	// (haproxy-connect's /metrics); nil when it has none.
	share func() (churnShare, error)
}

const (
	churnHC         = "haproxy-connect"
	churnCT         = "consul-template + reload"
	churnDNSDefault = "DNS SRV, default timers"
	churnDNSTuned   = "DNS SRV, tuned timers"
	churnBuiltin    = "Consul built-in proxy"
	churnAlone      = "Consul notification alone"
)

// observeHAProxy sets poll and reloads to read the HAProxy whose master
// socket is sock.
func (c *churnContender) observeHAProxy(sock, backend string) {
	c.observer = runtime.New(sock, nil, runtime.WithTimeout(5*time.Second))
	c.poll, c.reloads = churnServers(c.observer, backend), churnReloads(c.observer)
}

// stopAll stops the contender and closes its observer.
func (c *churnContender) stopAll() {
	c.stop()
	if c.observer != nil {
		_ = c.observer.Close()
		c.observer = nil
	}
}

// churnServers is a poll of "@1 show servers state <backend>": the
// address:port of every server not in maintenance.
func churnServers(rt *runtime.Client, backend string) func(ctx context.Context) (map[string]bool, error) {
	return func(ctx context.Context) (map[string]bool, error) {
		st, err := rt.ServersState(ctx, backend)
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

// churnReloads reads the master's reload counter from "show proc",
// retrying while the socket refuses connections (a reload in progress).
func churnReloads(rt *runtime.Client) func(ctx context.Context) (int, error) {
	return func(ctx context.Context) (int, error) {
		var n int
		err := WaitFor(ctx, 10*time.Second, func() error {
			pl, err := rt.Procs(ctx)
			n = pl.Master.Reloads
			return err
		})
		return n, err
	}
}

func (cb *churnBench) haproxyConnect() *churnContender {
	c := &churnContender{name: churnHC, settle: 30 * time.Second, port: cb.hcPort,
		config: "client sidecar `haproxy-connect -sidecar-for client` (default -min-slots 8), backend up_api"}
	var s *Sidecar
	var deregister func()
	c.start = func(ctx context.Context) error {
		var err error
		if deregister, err = cb.regHC(); err != nil {
			return err
		}
		if s, err = cb.b.StartSidecar(cb.consul, "client"); err != nil {
			return err
		}
		c.observeHAProxy(s.RT.Socket(), "up_api")
		stats := s.Stats
		c.share = func() (churnShare, error) { return scrapeShare(stats) }
		return nil
	}
	if cb.b.ProfileDir != "" {
		c.profile = func(name string, d time.Duration) <-chan error { return s.Profile(cb.b.ProfileDir, name, d) }
	}
	c.stop = func() {
		if s != nil {
			churnStop(s.Proc)
		}
		if deregister != nil {
			deregister()
		}
	}
	return c
}

// The HAProxy configuration both HAProxy contenders without mTLS
// (consul-template and DNS SRV) share, so that only how servers are found
// differs: churnHAProxyGlobal, then the DNS contender's resolvers, then
// churnHAProxyProxies (its %d: the load port), then the servers.
const (
	churnHAProxyGlobal = `global
    master-worker
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
`
	churnHAProxyProxies = `frontend fe
    bind 127.0.0.1:%d
    default_backend be
backend be
    balance roundrobin
`
)

// churnCTHead is the HAProxy configuration consul-template renders, up to the
// backend's servers; churnCTServers is the consul-template range that renders one
// server per passing api-plain instance (its service function returns
// passing instances only).
const (
	churnCTHead    = churnHAProxyGlobal + churnHAProxyProxies
	churnCTServers = `{{- range service "api-plain" }}
    server {{ .ID }} {{ .Address }}:{{ .Port }}
{{- end }}
`
)

// churnReloadScript is consul-template's command: reload HAProxy through
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
const churnReloadScript = `sock=%s
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

func (cb *churnBench) consulTemplate() *churnContender {
	c := &churnContender{name: churnCT, plain: true, settle: 30 * time.Second}
	var h *testenv.HAProxyProc
	var ct *Proc
	c.start = func(ctx context.Context) error {
		ports, err := cb.b.Ports(1)
		if err != nil {
			return err
		}
		c.port = ports[0]
		// HAProxy starts with no server; consul-template's first render
		// reloads it, and the pass waits for that (its starting state).
		head := fmt.Sprintf(churnCTHead, c.port)
		if h, err = cb.b.StartHAProxy(head); err != nil {
			return err
		}
		src := filepath.Join(h.Dir, "haproxy.ctmpl")
		if err := os.WriteFile(src, []byte(head+churnCTServers), 0o600); err != nil {
			return err
		}
		script := filepath.Join(h.Dir, "reload.sh")
		if err := os.WriteFile(script, []byte(fmt.Sprintf(churnReloadScript, h.MasterSock)), 0o700); err != nil {
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
		c.observeHAProxy(h.MasterSock, "be")
		return nil
	}
	c.stop = func() {
		churnStop(ct)
		if h != nil {
			h.Stop()
		}
	}
	c.config = "consul-template v0.41.3 renders the whole haproxy.cfg (`{{range service \"api-plain\"}}` one `server` line each) and runs `echo reload | socat stdio unix-connect:<master.sock>` and waits until `show proc` shows the master's reload counter moved, sending it again after 1 s if not (a bare reload that reaches the 2.6 master while it re-executes is lost silently: 2 of 39 back to back here); its defaults otherwise: no `wait`, max_stale 2s, and its fixed ≥100 ms (+0–20 ms jitter) pacing between two blocking queries"
	return c
}

// churnDNSSlots is the server-template size: the burst plus the base and room.
func churnDNSSlots(burst int) int { return burst + 32 }

func (cb *churnBench) dnsSRV(tuned bool) *churnContender {
	// Its slowest answer is about one resolution interval (1 s by default):
	// 4 s is generous, and bounds the wait when a burst does not fit in one
	// DNS answer (churnDNSPayloadNote).
	c := &churnContender{name: churnDNSDefault, plain: true, settle: 4 * time.Second}
	timers := ""
	if tuned {
		c.name = churnDNSTuned
		timers = "    " + strings.ReplaceAll(churnDNSTunedTimers, ", ", "\n    ") + "\n"
	}
	_, burst, _ := churnPlans(cb.b.Quick)
	var h *testenv.HAProxyProc
	c.start = func(ctx context.Context) error {
		ports, err := cb.b.Ports(1)
		if err != nil {
			return err
		}
		c.port = ports[0]
		cfg := fmt.Sprintf(churnHAProxyGlobal+`resolvers consul
    nameserver consul 127.0.0.1:%d
    accepted_payload_size 65535
%s`+churnHAProxyProxies+`    server-template s %d _api-plain._tcp.service.consul resolvers consul resolve-prefer ipv4 init-addr none
`, cb.consul.DNSPort, timers, c.port, churnDNSSlots(burst.changes))
		if h, err = cb.b.StartHAProxy(cfg); err != nil {
			return err
		}
		c.observeHAProxy(h.MasterSock, "be")
		return nil
	}
	c.stop = func() {
		if h != nil {
			h.Stop()
		}
	}
	c.config = fmt.Sprintf("HAProxy `server-template s %d _api-plain._tcp.service.consul resolvers consul resolve-prefer ipv4 init-addr none`, `resolvers consul` with `nameserver consul 127.0.0.1:<consul dns port>`, `accepted_payload_size 65535` and ",
		churnDNSSlots(burst.changes))
	if tuned {
		c.config += "`" + churnDNSTunedTimers + "`"
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
func (cb *churnBench) consulAlone() *churnContender {
	return &churnContender{name: churnAlone, alone: true,
		config: "only the baseline blocking query on health/connect/api, no contender and no load",
		start:  func(context.Context) error { return nil }, stop: func() {}}
}

func (cb *churnBench) builtin() *churnContender {
	c := &churnContender{name: churnBuiltin, landing: true, port: cb.biPort,
		config: "`consul connect proxy -sidecar-for client-builtin`, upstream api on its local bind port"}
	var p *Proc
	var deregister func()
	c.start = func(ctx context.Context) error {
		var err error
		if deregister, err = cb.regBuiltin(); err != nil {
			return err
		}
		if p, err = cb.b.Start("builtin-proxy", cb.b.Consul, "connect", "proxy", "-sidecar-for", "client-builtin", "-http-addr", cb.consul.Addr); err != nil {
			return err
		}
		return WaitFor(ctx, 30*time.Second, func() error {
			select {
			case <-p.Done():
				return Stop(fmt.Errorf("built-in proxy exited, see %s", p.Log))
			default:
			}
			return churnGet(cb.biPort)
		})
	}
	c.stop = func() {
		churnStop(p)
		if deregister != nil {
			deregister()
		}
	}
	return c
}

// churnStop stops a process started with Env.Start before the end of the
// run (Env.Close then finds it already gone).
func churnStop(p *Proc) {
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

// churnResult is one contender's figures for one pass.
type churnResult struct {
	lat, base    Samples // seconds from ack to in effect: contender, Consul
	unseen       int     // changes never in effect in the contender
	changes      int
	reloads      int // -1: not applicable
	ok, failed   int64
	firstErr     error
	pollInterval time.Duration // mean time between two observations
	// share50 and share99 bound the contender's own share of propagation
	// (the upper bounds of its histogram buckets holding p50 and p99);
	// NaN without one.
	share50, share99 float64
	probes           int64 // built-in: prober connections
	probeFailed      int64
	probeSpan        time.Duration
	rate             float64 // achieved changes per second (rate passes)
	baseUnseen       int
	writeDurations   Samples // seconds each write took (ack - start)
}

// pass runs one plan against one started contender.
func (cb *churnBench) pass(ctx context.Context, c *churnContender, p churnPlan) (churnResult, error) {
	var r churnResult
	pl, baseKey := cb.api, cb.apiBase
	if c.plain {
		pl, baseKey = cb.plain, cb.plainKey
	}
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()

	// Observers: Consul's blocking query, and the contender.
	consulTL, seenTL := newChurnTimeline(), newChurnTimeline()
	wg.Add(1)
	go func() {
		defer wg.Done()
		churnWatchConsul(pctx, cb.consul.Addr, !c.plain, churnService(c.plain), consulTL)
	}()
	switch {
	case c.alone:
	case c.landing:
		pl.landings.Store(seenTL)
		defer pl.landings.Store(nil)
	default:
		wg.Add(1)
		go func() { defer wg.Done(); churnPollLoop(pctx, c.poll, seenTL) }()
	}

	// The schedule: a starting set, the measured writes, the end set.
	var start, end []churnEndpoint
	var ops []churnOp
	switch {
	case c.landing:
	case p.rate > 0:
		start, ops, end = churnRateOps(pl.eps, p.window, p.changes)
	default:
		for _, e := range pl.eps[:p.changes] {
			ops = append(ops, churnOp{e, true})
		}
	}
	wantOf := func(eps []churnEndpoint) map[string]bool {
		want := map[string]bool{baseKey: true}
		for _, e := range eps {
			want[e.key] = true
		}
		return want
	}

	// Starting state, not measured.
	if _, err := cb.writeAll(ctx, churnOps(start, true)); err != nil {
		return r, err
	}
	if err := churnSettle(ctx, c, seenTL, consulTL, wantOf(start)); err != nil {
		return r, fmt.Errorf("starting state: %w", err)
	}
	reloadsBefore := -1
	if c.reloads != nil {
		n, err := c.reloads(ctx)
		if err != nil {
			return r, err
		}
		reloadsBefore = n
	}
	consulTL.restart()
	seenTL.restart()
	var share0 churnShare
	if c.share != nil {
		var err error
		if share0, err = c.share(); err != nil {
			return r, err
		}
	}

	stopLoad := func() (int64, int64, error) { return 0, 0, nil }
	if !c.alone {
		stopLoad = churnLoad(pctx, c.port, churnLoadRate)
	}
	var stopProbe func() (int64, int64, time.Duration)
	if c.landing {
		stopProbe = churnProbe(pctx, c.port, 2)
	}
	if c.profile != nil && p.rate > 0 {
		name := fmt.Sprintf("churn-%s-%g", c.name, p.rate)
		d := time.Duration(float64(p.changes)/p.rate*float64(time.Second)) - time.Second
		profiled := c.profile(name, max(d, time.Second))
		defer func() {
			if err := <-profiled; err != nil {
				cb.b.Logf("churn: profile %s: %v", name, err)
			}
		}()
	}
	var changes []churnChange
	var err error
	switch {
	case c.landing:
		changes, err = cb.landingChanges(pctx, pl, p, seenTL)
	case p.rate > 0:
		changes, err = cb.writeAt(pctx, ops, p.rate)
	default:
		// A burst: all adds at once, in effect, then all removes at once.
		if changes, err = cb.writeAll(pctx, ops); err == nil {
			if err := churnSettle(ctx, c, seenTL, consulTL, wantOf(ops2eps(ops))); err != nil {
				cb.b.Logf("churn: %s, %s: after the adds: %v", c.name, p.name, err)
			}
			var removes []churnChange
			removes, err = cb.writeAll(pctx, churnOps(ops2eps(ops), false))
			changes = append(changes, removes...)
		}
	}
	if err != nil {
		stopLoad()
		return r, err
	}
	if !c.landing {
		// Wait for the end state; what never comes is "never in effect".
		if err := churnSettle(ctx, c, seenTL, consulTL, wantOf(end)); err != nil {
			cb.b.Logf("churn: %s, %s: end state: %v", c.name, p.name, err)
		}
	}
	r.ok, r.failed, r.firstErr = stopLoad()
	r.share50, r.share99 = math.NaN(), math.NaN()
	if c.share != nil {
		share1, err := c.share()
		if err != nil {
			return r, err
		}
		d := share1.sub(share0)
		r.share50, r.share99 = d.bound(0.50), d.bound(0.99)
	}
	if stopProbe != nil {
		r.probes, r.probeFailed, r.probeSpan = stopProbe()
	}
	if c.reloads != nil {
		n, err := c.reloads(ctx)
		if err != nil {
			return r, err
		}
		r.reloads = n - reloadsBefore
	} else {
		r.reloads = -1
	}
	cancel()
	wg.Wait()

	r.changes = len(changes)
	r.lat, r.unseen = churnMatch(changes, seenTL.transitions())
	r.base, r.baseUnseen = churnMatch(changes, consulTL.transitions())
	r.pollInterval = seenTL.meanInterval()
	if c.alone {
		r.lat, r.unseen = r.base, r.baseUnseen
	}
	var first, last time.Time
	for _, ch := range changes {
		r.writeDurations = append(r.writeDurations, ch.took.Seconds())
		if first.IsZero() || ch.ack.Before(first) {
			first = ch.ack
		}
		if ch.ack.After(last) {
			last = ch.ack
		}
	}
	if len(changes) > 1 && last.After(first) {
		r.rate = float64(len(changes)-1) / last.Sub(first).Seconds()
	}

	// Back to the base state for the next pass, not measured.
	if _, err := cb.writeAll(ctx, churnOps(end, false)); err != nil {
		return r, err
	}
	return r, nil
}

func churnService(plain bool) string {
	if plain {
		return "api-plain"
	}
	return "api"
}

// churnOp is one write of a schedule: register (add) or deregister e.
type churnOp struct {
	e   churnEndpoint
	add bool
}

func churnOps(eps []churnEndpoint, add bool) []churnOp {
	ops := make([]churnOp, len(eps))
	for i, e := range eps {
		ops[i] = churnOp{e, add}
	}
	return ops
}

func ops2eps(ops []churnOp) []churnEndpoint {
	eps := make([]churnEndpoint, len(ops))
	for i, op := range ops {
		eps[i] = op.e
	}
	return eps
}

// churnRateOps is the schedule of a rate pass over a ring of the first
// 2*window+1 endpoints: window endpoints live at the start; then adds and
// removes alternate, each add taking the next endpoint of the ring and each
// remove the oldest live one. An endpoint thus lives 2*window changes and
// comes back 2*window+2 changes after it left. end is the live set after
// the last change.
func churnRateOps(eps []churnEndpoint, window, changes int) (start []churnEndpoint, ops []churnOp, end []churnEndpoint) {
	ring := eps[:2*window+1]
	live := slices.Clone(ring[:window])
	start = slices.Clone(live)
	next := window
	for k := 0; k < changes; k++ {
		if k%2 == 0 {
			e := ring[next%len(ring)]
			next++
			live = append(live, e)
			ops = append(ops, churnOp{e, true})
		} else {
			ops = append(ops, churnOp{live[0], false})
			live = live[1:]
		}
	}
	return start, ops, live
}

// write performs one op and records its acknowledgement.
func (cb *churnBench) write(op churnOp) (churnChange, error) {
	start := time.Now()
	var err error
	if op.add {
		_, err = cb.writer.Catalog().Register(op.e.reg, nil)
	} else {
		_, err = cb.writer.Catalog().Deregister(op.e.dereg, nil)
	}
	now := time.Now()
	if err != nil {
		return churnChange{}, fmt.Errorf("write %s (add %t): %w", op.e.id, op.add, err)
	}
	return churnChange{key: op.e.key, add: op.add, ack: now, took: now.Sub(start)}, nil
}

// writeAll performs ops as fast as Consul takes them, churnWriters at a
// time; the changes are returned in op order.
func (cb *churnBench) writeAll(ctx context.Context, ops []churnOp) ([]churnChange, error) {
	out := make([]churnChange, len(ops))
	idx := make(chan int)
	errs := make([]error, churnWriters)
	var wg sync.WaitGroup
	for w := range churnWriters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range idx {
				if errs[w] != nil {
					continue
				}
				out[i], errs[w] = cb.write(ops[i])
			}
		}()
	}
	for i := range ops {
		if ctx.Err() != nil {
			break
		}
		idx <- i
	}
	close(idx)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return out, ctx.Err()
}

// writeAt issues ops on a fixed schedule, rate per second, without waiting
// for the previous write (open loop, as independent instances would), up to
// churnWriters in flight; when Consul is slower than that, the schedule
// slips, which the achieved rate shows. Writes to one endpoint stay in
// order. The changes are returned in op order.
func (cb *churnBench) writeAt(ctx context.Context, ops []churnOp, rate float64) ([]churnChange, error) {
	out := make([]churnChange, len(ops))
	errs := make([]error, len(ops))
	slots := make(chan struct{}, churnWriters)
	prev := map[string]chan struct{}{} // the last write of each endpoint
	var wg sync.WaitGroup
	interval := time.Duration(float64(time.Second) / rate)
	start := time.Now()
	for i, op := range ops {
		if d := time.Until(start.Add(time.Duration(i) * interval)); d > 0 {
			select {
			case <-ctx.Done():
			case <-time.After(d):
			}
		}
		if ctx.Err() != nil {
			break
		}
		slots <- struct{}{}
		before, done := prev[op.e.key], make(chan struct{})
		prev[op.e.key] = done
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			defer close(done)
			if before != nil {
				<-before
			}
			out[i], errs[i] = cb.write(op)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return out, ctx.Err()
}

// landingChanges is the built-in proxy's pass: adds only, at p.rate. Each
// new endpoint is deregistered again once a connection has landed on it
// (or after churnLandingWait), so that only the base endpoint and the new one
// are live when it is added: a new connection picks one of the two at
// random (the built-in proxy resolves the upstream on every connection and
// picks an instance at random).
func (cb *churnBench) landingChanges(ctx context.Context, pl *churnPool, p churnPlan, seen *churnTimeline) ([]churnChange, error) {
	interval := time.Duration(float64(time.Second) / p.rate)
	start := time.Now()
	var changes []churnChange
	for k := 0; k < p.changes; k++ {
		if d := time.Until(start.Add(time.Duration(k) * interval)); d > 0 {
			select {
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(d):
			}
		}
		e := pl.eps[k%len(pl.eps)]
		ch, err := cb.write(churnOp{e, true})
		if err != nil {
			return nil, err
		}
		changes = append(changes, ch)
		deadline := time.Now().Add(churnLandingWait)
		for !seen.has(e.key) && time.Now().Before(deadline) && ctx.Err() == nil {
			time.Sleep(200 * time.Microsecond)
		}
		if _, err := cb.write(churnOp{e, false}); err != nil {
			return nil, err
		}
	}
	return changes, nil
}

// churnSettle waits until both the contender and Consul show exactly want.
func churnSettle(ctx context.Context, c *churnContender, seen, consul *churnTimeline, want map[string]bool) error {
	if err := WaitFor(ctx, time.Minute, func() error { return consul.check(want) }); err != nil {
		return fmt.Errorf("consul: %w", err)
	}
	if c.landing || c.alone {
		return nil
	}
	return WaitFor(ctx, c.settle, func() error { return seen.check(want) })
}

// churnChange is one Consul write and when Consul acknowledged it.
type churnChange struct {
	key  string
	add  bool
	ack  time.Time
	took time.Duration
}

// churnTransition is an observed change of one endpoint: in effect or not.
type churnTransition struct {
	at      time.Time
	present bool
}

// churnTimeline records what an observer saw: the current set and, per
// endpoint, every transition since the last restart.
type churnTimeline struct {
	mu     sync.Mutex
	cur    map[string]bool
	seen   map[string][]churnTransition
	first  time.Time
	last   time.Time
	snaps  int
	inited bool
}

func newChurnTimeline() *churnTimeline {
	return &churnTimeline{cur: map[string]bool{}, seen: map[string][]churnTransition{}}
}

// observe records a full snapshot taken at at.
func (t *churnTimeline) observe(at time.Time, now map[string]bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for k := range now {
		if !t.cur[k] {
			t.seen[k] = append(t.seen[k], churnTransition{at, true})
		}
	}
	for k := range t.cur {
		if !now[k] {
			t.seen[k] = append(t.seen[k], churnTransition{at, false})
		}
	}
	t.cur = now
	if t.snaps == 0 {
		t.first = at
	}
	t.last = at
	t.snaps++
	t.inited = true
}

// land records that a connection reached key at at.
func (t *churnTimeline) land(at time.Time, key string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.cur[key] {
		t.cur[key] = true
		t.seen[key] = append(t.seen[key], churnTransition{at, true})
	}
}

func (t *churnTimeline) has(key string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.cur[key]
}

// restart forgets the transitions so far, keeping the current set.
func (t *churnTimeline) restart() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.seen = map[string][]churnTransition{}
	t.snaps = 0
}

func (t *churnTimeline) check(want map[string]bool) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.inited {
		return errors.New("no observation yet")
	}
	var missing, extra int
	for k := range want {
		if !t.cur[k] {
			missing++
		}
	}
	for k := range t.cur {
		if !want[k] {
			extra++
		}
	}
	if missing+extra > 0 {
		return fmt.Errorf("%d endpoints missing, %d extra", missing, extra)
	}
	return nil
}

func (t *churnTimeline) transitions() map[string][]churnTransition {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.seen
}

func (t *churnTimeline) meanInterval() time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.snaps < 2 {
		return 0
	}
	return t.last.Sub(t.first) / time.Duration(t.snaps-1)
}

// churnMatch pairs each change with the observation that shows it in
// effect: per endpoint, changes and transitions both alternate, and the
// n-th change is matched with the first later transition to its state that
// comes before the endpoint's next change of the same kind. Latencies are
// in seconds; unmatched changes are counted as unseen. A transition may come
// a little before the acknowledgement (Consul can notify watchers before the
// HTTP answer reaches the writer): that latency is negative, and kept.
func churnMatch(changes []churnChange, seen map[string][]churnTransition) (lat Samples, unseen int) {
	byKey := map[string][]int{}
	for i, ch := range changes {
		byKey[ch.key] = append(byKey[ch.key], i)
	}
	lat = Samples{}
	for key, idx := range byKey {
		trs := seen[key]
		cur := 0
		for n, i := range idx {
			ch := changes[i]
			// The same endpoint's next change of the same kind bounds the
			// match: a transition after it belongs to that change.
			var bound time.Time
			for _, j := range idx[n+1:] {
				if changes[j].add == ch.add {
					bound = changes[j].ack
					break
				}
			}
			found := -1
			for j := cur; j < len(trs); j++ {
				if !bound.IsZero() && trs[j].at.After(bound) {
					break
				}
				if trs[j].present == ch.add {
					found = j
					break
				}
			}
			if found < 0 {
				unseen++
				continue
			}
			lat = append(lat, trs[found].at.Sub(ch.ack).Seconds())
			cur = found + 1
		}
	}
	return lat, unseen
}

// churnPollPeriod paces the polling of a HAProxy contender: one "show
// servers state" every millisecond, and never more than half of the time
// busy polling (after a poll that took d, the next starts d later at the
// earliest). A tight loop (about 0.5 ms a poll with a few dozen servers,
// several ms with a thousand) keeps the master, the worker and this process
// busy, close to a whole CPU of the two this machine has, which slows the
// contender and Consul it measures. The resolution is about 1 ms, or twice a
// poll's duration with large backends; the mean poll interval is reported.
const churnPollPeriod = time.Millisecond

// churnPollLoop observes a polled contender until ctx ends.
func churnPollLoop(ctx context.Context, poll func(context.Context) (map[string]bool, error), tl *churnTimeline) {
	for ctx.Err() == nil {
		start := time.Now()
		now, err := poll(ctx)
		if err == nil {
			tl.observe(time.Now(), now)
		}
		// On error, the master socket refused the connection while it
		// re-executes (a reload): retry at the same pace.
		took := time.Since(start)
		time.Sleep(max(churnPollPeriod-took, took))
	}
}

// churnWatchConsul is Consul's own notification: a blocking query on the
// health endpoint the contender reads (health/connect for api,
// health/service for api-plain, passing only), timestamped when it returns.
//
// It is one more blocking watcher on Consul, and every notification sends
// the whole instance list (about 3 KB per connect instance: 300 KB at 100
// live), so it is kept as light as it can be: no gzip (Go's transport asks
// for it by default, and Consul compresses every answer), and only the
// address and port decoded.
func churnWatchConsul(ctx context.Context, addr string, connect bool, svc string, tl *churnTimeline) {
	kind := "service"
	if connect {
		kind = "connect"
	}
	var idx uint64
	for ctx.Err() == nil {
		u := fmt.Sprintf("http://%s/v1/health/%s/%s?passing=1&index=%d&wait=60s", addr, kind, svc, idx)
		set, next, err := churnHealth(ctx, churnConsulHTTP, u)
		now := time.Now()
		if err != nil {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if next < idx {
			next = 0 // the index went backwards: start over
		}
		idx = next
		tl.observe(now, set)
	}
}

// churnConsulHTTP is the baseline watch's client: no gzip, no timeout (the
// queries block up to a minute and end with the pass's context).
var churnConsulHTTP = &http.Client{Transport: &http.Transport{DisableCompression: true}}

// churnHealth runs one health query and returns the address:port of each
// instance and the X-Consul-Index.
func churnHealth(ctx context.Context, client *http.Client, u string) (map[string]bool, uint64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, 0, fmt.Errorf("%s: status %d", u, resp.StatusCode)
	}
	idx, err := strconv.ParseUint(resp.Header.Get("X-Consul-Index"), 10, 64)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: X-Consul-Index: %w", u, err)
	}
	var entries []struct {
		Node    struct{ Address string }
		Service struct {
			Address string
			Port    int
		}
	}
	if err := json.NewDecoder(resp.Body).Decode(&entries); err != nil {
		return nil, 0, err
	}
	set := make(map[string]bool, len(entries))
	for _, e := range entries {
		addr := e.Service.Address
		if addr == "" {
			addr = e.Node.Address
		}
		set[net.JoinHostPort(addr, strconv.Itoa(e.Service.Port))] = true
	}
	return set, idx, nil
}

// churnHTTP opens a new connection per request: every request goes
// through the listener (and, across a reload, the new worker) and the
// backend's choice of server.
var churnHTTP = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

func churnGet(port int) error {
	resp, err := churnHTTP.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}

// churnLoad sends GET requests to port at rate per second, each on a new
// connection, one at a time (a slow request delays the next; none are
// queued up), until the returned stop is called.
func churnLoad(ctx context.Context, port, rate int) (stop func() (ok, failed int64, first error)) {
	var okN, failedN atomic.Int64
	var firstErr atomic.Value
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(time.Second / time.Duration(rate))
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			if err := churnGet(port); err != nil {
				if ctx.Err() != nil {
					return
				}
				failedN.Add(1)
				firstErr.CompareAndSwap(nil, err)
				continue
			}
			okN.Add(1)
		}
	}()
	return func() (int64, int64, error) {
		cancel()
		<-done
		err, _ := firstErr.Load().(error)
		return okN.Load(), failedN.Load(), err
	}
}

// churnProbe opens connections through port in n loops as fast as they
// complete (a GET each), so that connections land on new endpoints soon
// after the built-in proxy can pick them.
func churnProbe(ctx context.Context, port, n int) (stop func() (probes, failed int64, span time.Duration)) {
	var probes, failed atomic.Int64
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	start := time.Now()
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				if err := churnProbeOnce(port); err != nil && ctx.Err() == nil {
					failed.Add(1)
				}
				probes.Add(1)
			}
		}()
	}
	return func() (int64, int64, time.Duration) {
		cancel()
		wg.Wait()
		return probes.Load(), failed.Load(), time.Since(start)
	}
}

func churnProbeOnce(port int) error {
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.Contains(line, " 200 ") {
		return fmt.Errorf("probe: %q", strings.TrimSpace(line))
	}
	return nil
}

// churnAgg is one contender's rounds for one plan.
type churnAgg struct {
	p50, p99, max, base99, diff Rounds
	reloadsPer1k                Rounds
	ok, failed                  int64
	firstErr                    error
	unseen, changes             int
	pollIntervals, rates        Rounds
	probeIntervals              Rounds
	probeFailed                 int64
	writeP99                    Rounds
	baseUnseen                  int
	share50, share99            Rounds
}

func (a *churnAgg) add(r churnResult) {
	p99, b99 := r.lat.Percentile(99), r.base.Percentile(99)
	a.p50 = append(a.p50, r.lat.Percentile(50))
	a.p99 = append(a.p99, p99)
	a.max = append(a.max, r.lat.Max())
	a.base99 = append(a.base99, b99)
	a.diff = append(a.diff, p99-b99)
	if r.reloads >= 0 && r.changes > 0 {
		a.reloadsPer1k = append(a.reloadsPer1k, float64(r.reloads)*1000/float64(r.changes))
	}
	a.ok += r.ok
	a.failed += r.failed
	if a.firstErr == nil {
		a.firstErr = r.firstErr
	}
	a.unseen += r.unseen
	a.changes += r.changes
	if r.pollInterval > 0 {
		a.pollIntervals = append(a.pollIntervals, r.pollInterval.Seconds())
	}
	if r.rate > 0 {
		a.rates = append(a.rates, r.rate)
	}
	if r.probes > 0 {
		a.probeIntervals = append(a.probeIntervals, r.probeSpan.Seconds()/float64(r.probes))
		a.probeFailed += r.probeFailed
	}
	a.writeP99 = append(a.writeP99, r.writeDurations.Percentile(99))
	a.baseUnseen += r.baseUnseen
	if !math.IsNaN(r.share99) {
		a.share50 = append(a.share50, r.share50)
		a.share99 = append(a.share99, r.share99)
	}
}

// churnShare is a snapshot of haproxy-connect's
// haproxy_connect_endpoint_propagation_seconds histogram: each bucket's
// upper bound (seconds, +Inf last) and cumulative count.
type churnShare struct {
	le  []float64
	cum []float64
}

const churnShareMetric = "haproxy_connect_endpoint_propagation_seconds"

// scrapeShare reads the histogram from a sidecar's /metrics.
func scrapeShare(statsAddr string) (churnShare, error) {
	f, err := sidecarMetrics(statsAddr)
	if err != nil {
		return churnShare{}, err
	}
	return shareOf(f)
}

// shareOf takes the histogram's buckets from a sidecar's metrics.
func shareOf(f scrape.Families) (churnShare, error) {
	bs, err := f.Histogram(churnShareMetric)
	if err != nil {
		return churnShare{}, fmt.Errorf("propagation histogram: %w", err)
	}
	var h churnShare
	for _, b := range bs {
		h.le, h.cum = append(h.le, b.UpperBound), append(h.cum, b.Count)
	}
	return h, nil
}

// sub returns the counts added since before (same buckets).
func (h churnShare) sub(before churnShare) churnShare {
	d := churnShare{le: h.le, cum: slices.Clone(h.cum)}
	for i := range d.cum {
		if i < len(before.cum) {
			d.cum[i] -= before.cum[i]
		}
	}
	return d
}

// bound returns the upper bound of the bucket holding quantile q; NaN when
// the histogram is empty.
func (h churnShare) bound(q float64) float64 {
	if len(h.cum) == 0 || h.cum[len(h.cum)-1] <= 0 {
		return math.NaN()
	}
	want := q * h.cum[len(h.cum)-1]
	for i, n := range h.cum {
		if n >= want {
			return h.le[i]
		}
	}
	return h.le[len(h.le)-1]
}

func churnMedian(r Rounds) float64 {
	if len(r) == 0 {
		return math.NaN()
	}
	return r.Median()
}

// churnSignedDur is Dur for a difference that may be negative.
func churnSignedDur(sec float64) string {
	if sec < 0 {
		return "-" + Dur(-sec)
	}
	return Dur(sec)
}

// report adds the section of one plan; the first one carries the method.
func (cb *churnBench) report(p churnPlan, first bool, contenders []*churnContender, res map[string]*churnAgg) {
	b := cb.b
	s := b.Report.Add("Churn propagation, "+p.name,
		"Contender", "p50", "p99", "max", "Consul p99 (same pass)", "p99 ÷ Consul p99", "p99 − Consul p99",
		"p99 ÷ haproxy-connect p99", "reloads / 1000 changes", "failed / requests", "never in effect")
	hc := res[churnHC]
	var polls, rates, errs []string
	for _, c := range contenders {
		a := res[c.name]
		if a == nil {
			continue
		}
		vsHC := "—"
		if hc != nil && c.name != churnHC {
			vsHC = Ratio(churnMedian(a.p99), churnMedian(hc.p99))
		}
		reloads := "—"
		if len(a.reloadsPer1k) > 0 {
			reloads = a.reloadsPer1k.Format(Num)
		}
		name := c.name
		base99, vsBase, diff, failed := a.base99.Format(Dur), Ratio(churnMedian(a.p99), churnMedian(a.base99)), a.diff.Format(churnSignedDur), fmt.Sprintf("%d / %d", a.failed, a.ok+a.failed)
		switch {
		case c.landing:
			name += fmt.Sprintf(" (adds only, %d per round)", a.changes/max(1, len(a.p99)))
		case c.alone:
			name += " (health/connect/api, no contender running)"
			base99, vsBase, diff, failed = "—", "—", "—", "—"
		}
		s.Row(name, a.p50.Format(Dur), a.p99.Format(Dur), a.max.Format(Dur), base99, vsBase, diff, vsHC, reloads,
			failed, fmt.Sprintf("%d / %d", a.unseen, a.changes))
		if len(a.pollIntervals) > 0 {
			polls = append(polls, fmt.Sprintf("%s %s", c.name, a.pollIntervals.Format(Dur)))
		}
		if len(a.probeIntervals) > 0 {
			polls = append(polls, fmt.Sprintf("%s: one prober connection per %s (%d prober failures)", c.name, a.probeIntervals.Format(Dur), a.probeFailed))
		}
		if len(a.rates) > 0 {
			rates = append(rates, fmt.Sprintf("%s %s (write p99 %s)", c.name, a.rates.Format(Num), a.writeP99.Format(Dur)))
		}
		if a.firstErr != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", c.name, a.firstErr))
		}
		if a.baseUnseen > 0 {
			errs = append(errs, fmt.Sprintf("%s pass: %d changes never seen by the Consul watch", c.name, a.baseUnseen))
		}
	}
	if hc, alone := res[churnHC], res[churnAlone]; hc != nil && alone != nil && len(hc.p99) == len(alone.p99) {
		var d Rounds
		for i := range hc.p99 {
			d = append(d, hc.p99[i]-alone.p99[i])
		}
		s.Note("haproxy-connect p99 − Consul-alone p99 (each round's two passes): %s. The in-pass Consul p99 is the limit under the same load (haproxy-connect's own watch and work share the two CPUs with it); Consul alone is its notification with nothing else running.", d.Format(churnSignedDur))
	}
	if p.rate > 0 {
		s.Note("What: %d changes at %s, adds and removes alternating, with %d churn endpoints live besides the base instance (each lives %d changes). Median of %d round(s), (min–max); ratios are of the medians.",
			p.changes, p.name, p.window, 2*p.window, b.Rounds)
	} else {
		s.Note("What: %d endpoints registered at once (%d concurrent writers), in effect, then all deregistered at once: %d changes. Median of %d round(s), (min–max); ratios are of the medians.",
			p.changes, churnWriters, 2*p.changes, b.Rounds)
	}
	s.Note("Mean poll interval (resolution, see below): %s.", strings.Join(polls, "; "))
	var shares []string
	for _, c := range contenders {
		if a := res[c.name]; a != nil && len(a.share99) > 0 {
			shares = append(shares, fmt.Sprintf("%s: p50 ≤ %s (%s), p99 ≤ %s (%s)", c.name,
				Dur(a.share50.Median()), a.share50.Format(Dur), Dur(a.share99.Median()), a.share99.Format(Dur)))
		}
	}
	if len(shares) > 0 {
		s.Note("Own share of propagation, from the sidecar's own histogram (haproxy_connect_endpoint_propagation_seconds: from an answer's headers arriving from Consul to HAProxy confirming the runtime batch that applies it, one sample per applied update of the upstream), as the upper bound of the bucket holding the quantile (buckets 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 50 ms, ...), median (min–max) over rounds: %s. The rest of its latency is Consul's notification and the observation's resolution.", strings.Join(shares, "; "))
	}
	s.Note("Achieved write rate, changes/s (first to last acknowledgement): %s.", strings.Join(rates, "; "))
	if len(errs) > 0 {
		s.Note("First failures: %s.", strings.Join(errs, "; "))
	}
	switch {
	case p.rate == 0:
		s.Note("The built-in proxy is measured at 10 changes/s only (see there). %s", churnDNSPayloadNote)
	case !first:
		s.Note("The built-in proxy is measured at 10 changes/s only. Method and setups: see the %s section.", "10 changes/s")
	}
	if !first {
		return
	}
	s.Note("Latency: first observation of a change in the contender's data plane minus the return of Consul's register/deregister call (the write acknowledgement). \"Consul p99\" is Consul's own notification: a blocking query on the health endpoint the contender reads (health/connect/api or health/service/api-plain, passing only), run during the same pass and timestamped the same way; \"p99 − Consul p99\" is the per-round difference (the target for haproxy-connect, at 100 changes/s, is within 2 ms). Each notification carries the whole instance list (about 3 KB per connect instance, 300 KB at 100 live), so every blocking watcher costs Consul CPU: the baseline watch is one more watcher in every pass (kept light: no gzip, which Consul otherwise applies to every answer Go's client asks for, and only address and port decoded), and a contender's own unthrottled watch (haproxy-connect's) doubles what Consul serves in its pass; consul-template paces its queries, HAProxy DNS asks the DNS interface instead.")
	s.Note("Resolution: HAProxy contenders are observed by polling `@1 show servers state <backend>` on the master socket (on a kept prompt-mode session, reopened after a reload, one poll every %s, or, when a poll takes longer than half of that, a pause as long as the poll); an endpoint is in effect when a server not in maintenance has its address and port, and each observation is timestamped when its reply has been read. A latency is therefore an upper bound, by up to one poll interval; during a reload the master refuses connections, which lengthens consul-template's intervals.", churnPollPeriod)
	s.Note("Writes: in a rate pass, each write is issued at its scheduled time without waiting for the previous one (up to %d in flight; writes to one endpoint stay in order), as independent instances would; in a burst, %d writers back to back. Endpoints are written with the catalog API, each on a node of its own, as instances on other hosts (which a client's agent never holds): the acknowledgement is the catalog commit. On the one local agent instead, each connect-proxy registration started the agent's per-proxy machinery (proxycfg): 51 against 201 plain registrations/s here, a cost only the mTLS contenders would have paid.", churnWriters, churnWriters)
	s.Note("Failed / requests: a steady load of %d GET/s, each on a new connection (no keep-alive), one at a time, through the contender's upstream port during each whole measured pass (all rounds summed). Deregistered endpoints keep serving (as an instance that deregisters before it stops), so a failure means the data plane sent a request nowhere. \"Never in effect\": changes not observed before the same endpoint's next change of the same kind or before the pass ended (all rounds summed); they are left out of the latencies.", churnLoadRate)
	s.Note("Consul's built-in proxy resolves the upstream with a health query on every new connection and picks a passing instance at random, so for it \"in effect\" is the first connection that lands on the new endpoint (its relay records the accept). To keep that sampling short it gets adds only, one every 100 ms: each new endpoint is deregistered again once a connection has landed on it (or after %s), so that when one is added only the base instance and the new one are live and each connection picks the new one with probability 1/2; 2 prober loops open connections back to back besides the steady load. Its figure includes that wait for a landing (about one prober interval); its Consul p99 is the same blocking query during its pass. It is not measured at 100 changes/s or in a burst, where landings cannot be sampled this way.", churnLandingWait)
	s.Note("Consul: two agents, as deployed. The churn endpoints (instances on other hosts) are written to a server (a dev agent); every contender, the baseline watch, the DNS queries and the local registrations (the api server and its sidecar, and each client with its sidecar) use a client agent joined to it, the host's own agent. A client's registration exists only during its contender's passes: for each connect-proxy registration with an upstream, the agent runs a proxy-config watch of that upstream whether or not any proxy consumes it, and Consul's cost for it lands in every pass it is registered in (two of them took the baseline p99 at 100 changes/s from about 25 ms to 85 ms when checked by hand). A dev agent alone would also indent every JSON answer (twice the bytes) and run those watches against its own state store, hashing every result on each change: 42 %% of its CPU in a profile at 100 changes/s.")
	s.Note("Fairness: haproxy-connect and the built-in proxy serve \"api\" over mTLS: its endpoints are connect-proxy registrations, each a relay to the real api server sidecar. consul-template and DNS SRV have no mTLS, so they serve \"api-plain\": plain registrations, each a relay to the plain HTTP app. Same number of endpoints, same schedule, same check passing from the start; only the data plane differs. Every endpoint has its own loopback address (127.1.x.y or 127.2.x.y), as instances on separate hosts would: HAProxy 2.6 left the third of three SRV records sharing one target name (Consul names the target after the address) in maintenance without an address.")
	var cfgs []string
	for _, c := range contenders {
		cfgs = append(cfgs, fmt.Sprintf("%s: %s", c.name, c.config))
	}
	s.Note("Setups: %s. Consul: one dev agent for the whole workload, its DNS interface on a loopback port with the default dns_config (allow_stale, no TTLs, no cache). Contenders run one at a time, each started fresh every round, in an order rotated each round.", strings.Join(cfgs, "; "))
}

// churnDNSPayloadNote explains what Consul's DNS answer can carry.
const churnDNSPayloadNote = "DNS SRV: one UDP answer is all HAProxy reads (2.6 has no TCP fallback here). Consul answers the SRV query for `_api-plain._tcp.service.consul` with one SRV and one A record per instance and trims the answer to the requester's EDNS size without setting TC; at accepted_payload_size 65535 that was 996 instances when checked by hand (at the default 512: 3), so in a burst of 1000 a few endpoints are never in effect for DNS."

// endurance is the haproxy-connect check: 10 000 changes at 100/s with
// zero reloads and zero failed requests. One round: it takes 100 s.
func (cb *churnBench) endurance(ctx context.Context) error {
	c := cb.haproxyConnect()
	cb.b.Logf("churn: endurance, %d changes at %d/s through %s", churnEndurance, churnEnduranceAt, c.name)
	if err := c.start(ctx); err != nil {
		return err
	}
	defer c.stopAll()
	p := churnPlan{name: "endurance", rate: churnEnduranceAt, changes: churnEndurance, window: 100}
	r, err := cb.pass(ctx, c, p)
	if err != nil {
		return fmt.Errorf("endurance: %w", err)
	}
	s := cb.b.Report.Add(fmt.Sprintf("Churn endurance: haproxy-connect, %d changes at %d changes/s", churnEndurance, churnEnduranceAt),
		"p50", "p99", "max", "Consul p99 (same pass)", "p99 − Consul p99", "reloads", "failed / requests", "never in effect")
	s.Row(Dur(r.lat.Percentile(50)), Dur(r.lat.Percentile(99)), Dur(r.lat.Max()), Dur(r.base.Percentile(99)),
		churnSignedDur(r.lat.Percentile(99)-r.base.Percentile(99)), strconv.Itoa(r.reloads), fmt.Sprintf("%d / %d", r.failed, r.ok+r.failed),
		fmt.Sprintf("%d / %d", r.unseen, r.changes))
	s.Note("One run, not rounds: the rate pass above at %d changes/s (twice the 100/s of the target, to keep the run short) and %d changes long (%d churn endpoints live, adds and removes alternating), with a fresh client sidecar and the same steady load (%d GET/s, a new connection each). Achieved write rate %s changes/s; mean poll interval %s. Target: zero reloads and zero failed requests.",
		churnEnduranceAt, churnEndurance, p.window, churnLoadRate, Num(r.rate), Dur(r.pollInterval.Seconds()))
	if r.firstErr != nil {
		s.Note("First failed request: %v.", r.firstErr)
	}
	if r.baseUnseen > 0 {
		s.Note("%d changes were never seen by the Consul watch.", r.baseUnseen)
	}
	return nil
}
