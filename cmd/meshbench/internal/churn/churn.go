// Package churn is the workload "churn": endpoint churn propagation.
//
// Endpoints of an upstream are registered and deregistered in Consul at
// 10/s, at 100/s, and in a burst of 1000; for every change the time from
// Consul's write acknowledgement (the return of the catalog register or
// deregister call; each endpoint is on a node of its own, see
// newPool) to the change being in effect in each contender's data
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
//     really serves over mTLS. haproxy-connect uses them. consul-template and DNS SRV give a plain TCP/HTTP data plane
//     with no mTLS, so they get "api-plain": plain services with the same
//     kind of relay endpoints in front of the plain HTTP app. Same number of
//     endpoints, same churn schedule, same health check; only the data plane
//     differs, which is the difference between the products.
//   - Removed endpoints keep serving (their relays stay open), as a
//     well-behaved instance that deregisters before it stops; a failed
//     request therefore means the data plane sent it somewhere wrong (a
//     parked slot, a dropped listener during a reload), not that it lagged.
//   - "In effect" for HAProxy contenders: polling "show servers state
//     <backend>" on a worker-level stats socket added for the benchmark
//     (bench.ObserveSocket; haproxy-connect runs HAProxy through a wrapper
//     that adds it), every millisecond (bench.PollPeriod), never on the master
//     socket haproxy-connect steers HAProxy with; an endpoint is in effect
//     when a server that is not in maintenance has its address and port.
//     Every observation is timestamped when the reply has been read, so
//     each figure is an upper bound, by at most one poll interval
//     (reported, with the observer's calibrated CPU cost). The Consul
//     baseline is timestamped the same way: when the blocking query
//     returns.
//   - Changes are matched to observations per endpoint in order (add,
//     remove, add...). A change never observed before the same endpoint's
//     next change of the same kind, or before the pass ends, is counted as
//     "never in effect" and left out of the latencies.
//   - Contenders run one after the other, never together, so that they do
//     not share the two CPUs with each other's reloads: within a round,
//     every contender's pass of one plan runs back to back, each started
//     fresh, in an order rotated every round and mirrored from one plan to
//     the next; ratios are paired within each round.
package churn

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// plan is one pass: a rate with a number of changes, or a burst.
type plan struct {
	name    string
	rate    float64 // changes per second; 0 for a burst
	changes int     // rate: measured changes; burst: endpoints added, then removed
	window  int     // rate: churn endpoints live during the pass
	// flip: every churn endpoint of the ring stays registered through
	// the pass, its check critical; an add turns it passing, a remove
	// critical again (rate passes only).
	flip bool
}

const (
	loadRate         = 100   // steady load, requests per second
	writers          = 16    // Consul writes in flight at most
	enduranceChanges = 20000 // changes in the haproxy-connect endurance check
	enduranceRate    = 1000  // its rate, changes/s (issue 15: sustained 1 000/s): 20 s if Consul keeps up
	// enduranceWindow is the churn endpoints live during the endurance
	// pass: each lives 2*enduranceWindow changes, 1 s at 1 000/s.
	enduranceWindow = 500
)

// Tuned HAProxy resolver timers for the DNS SRV contender. The default
// contender sets none (HAProxy 2.6 defaults: resolve_retries 3, timeout
// resolve 1s, timeout retry 1s, hold valid 10s, hold other/refused/nx/
// timeout 30s, hold obsolete 0s). Both set accepted_payload_size 65535 (the
// maximum; the default 512 bytes holds 3 of Consul's SRV answers, see
// dnsPayloadNote).
const dnsTunedTimers = "timeout resolve 100ms, timeout retry 100ms, hold valid 100ms"

func plansFor(quick bool) (rates []plan, burst plan) {
	// The window is the number of churn endpoints alive at once; each lives
	// 2*window changes, which at 10/s and 100/s is 4 s and 2 s: longer than
	// the slowest contender's propagation (HAProxy DNS with default timers,
	// ~1 s), so that no contender misses a change only because the endpoint
	// was gone again before its next look.
	rates = []plan{{name: "10 changes/s", rate: 10, changes: 100, window: 20}, {name: "100 changes/s", rate: 100, changes: 1000, window: 100},
		{name: "100 changes/s as check flips", rate: 100, changes: 1000, window: 100, flip: true}}
	burst = plan{name: "burst of 1000", changes: 1000}
	if quick {
		rates[0].changes, rates[1].changes, rates[2].changes = 30, 300, 300
		burst = plan{name: "burst of 200", changes: 200}
	}
	return rates, burst
}

// workload is the shared setup of the workload.
type workload struct {
	b        *bench.Bench
	consul   *testenv.ConsulProc
	writer   *api.Client // registrations: its own pooled transport
	api      *pool       // "api" endpoints, relays to the server sidecar
	plain    *pool       // "api-plain" endpoints, relays to the plain app
	apiBase  string      // the real api sidecar: always live
	plainKey string      // the base api-plain endpoint (the app itself): always live
	appPort  int
	hcPort   int // client sidecar upstream port
	// regHC registers the client of haproxy-connect with its sidecar, and
	// returns the deregistration.
	regHC func() (deregister func(), err error)
}

// clientRegistration returns a function that registers name with a sidecar
// whose one upstream is up, and returns the deregistration.
func clientRegistration(c *api.Client, name string, port, sidecarPort int, up api.Upstream) func() (func(), error) {
	return func() (func(), error) {
		if err := bench.RegisterWithSidecar(c, name, port, sidecarPort, nil, up); err != nil {
			return nil, err
		}
		return func() {
			_ = c.Agent().ServiceDeregister(name + "-sidecar-proxy")
			_ = c.Agent().ServiceDeregister(name)
		}, nil
	}
}

func Run(ctx context.Context, b *bench.Bench) error {
	rates, burst := plansFor(b.Quick)
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
	cb := &workload{b: b, consul: consul}
	cb.writer, err = api.NewClient(&api.Config{Address: server.Addr, HttpClient: &http.Client{
		// Generous: in a burst Consul is busy for seconds.
		Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: 2 * writers},
	}})
	if err != nil {
		return err
	}
	if err := cb.setup(max(2*rates[1].window+2, burst.changes, 2*enduranceWindow+2)); err != nil {
		return err
	}

	contenders := []*contender{cb.haproxyConnect(), cb.consulTemplate(), cb.dnsSRV(true), cb.dnsSRV(false), cb.consulAlone()}
	if b.ConsulTemplate == "" {
		b.Logf("churn: consul-template not installed, left out")
		contenders = slices.DeleteFunc(contenders, func(c *contender) bool { return c.name == nameCT })
	}
	contenders = slices.DeleteFunc(contenders, func(c *contender) bool { return !b.Wants(c.name) })
	res := map[string]map[string]*agg{} // plan name -> contender -> rounds
	add := func(plan, name string, r result) {
		if res[plan] == nil {
			res[plan] = map[string]*agg{}
		}
		if res[plan][name] == nil {
			res[plan][name] = &agg{}
		}
		res[plan][name].add(r)
	}
	plans := append(slices.Clone(rates), burst)
	for round := 0; round < b.Rounds; round++ {
		// Within a round, every contender's pass of one plan runs back
		// to back (each contender started fresh for it), so that the
		// passes compared in a ratio are minutes apart at most; the order
		// is rotated every round and mirrored from one plan to the next
		// (ABCD, DCBA, ABCD), so that no contender always runs first, or
		// always right after a given other, on this shared machine.
		for k, p := range plans {
			order := bench.Mirrored(contenders, round)
			if k%2 == 0 {
				order = order[:len(contenders)]
			} else {
				order = order[len(contenders):]
			}
			for _, c := range order {
				b.Logf("churn: round %d/%d, %s, %s", round+1, b.Rounds, p.name, c.name)
				if err := c.Start(ctx); err != nil {
					c.Stop()
					return fmt.Errorf("%s: %w", c.name, err)
				}
				passStart := time.Now()
				r, err := cb.pass(ctx, c, p)
				c.Stop()
				if err != nil {
					return fmt.Errorf("%s, %s: %w", c.name, p.name, err)
				}
				b.Logf("churn:   %s: p50 %s p99 %s (Consul p50 %s p99 %s), %d/%d never in effect, %d/%d requests failed, %d reloads, %s changes/s, %s",
					p.name, bench.Dur(r.lat.Percentile(50)), bench.Dur(r.lat.Percentile(99)), bench.Dur(r.base.Percentile(50)), bench.Dur(r.base.Percentile(99)),
					r.unseen, r.changes, r.load.Failed, r.load.OK+r.load.Failed, r.reloads, bench.Num(r.rate), time.Since(passStart).Round(100*time.Millisecond))
				add(p.name, c.name, r)
				if ctx.Err() != nil {
					return ctx.Err()
				}
			}
		}
	}
	for i, p := range append(slices.Clone(rates), burst) {
		cb.report(p, i == 0, contenders, res[p.name])
	}
	if b.Wants(nameHC) {
		if err := cb.endurance(ctx); err != nil {
			return err
		}
	}
	return nil
}

// setup starts the api server sidecar and the endpoint pools, and prepares
// the registration of haproxy-connect's client.
func (cb *workload) setup(n int) error {
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
	if err := bench.RegisterWithSidecar(c, "api", cb.appPort, sidecarPort, map[string]any{"protocol": "http"}); err != nil {
		return err
	}
	if _, err := b.StartSidecar(cb.consul, "api"); err != nil {
		return err
	}
	cb.apiBase = fmt.Sprintf("127.0.0.1:%d", sidecarPort)
	cb.hcPort = ports[3]
	// The clients' registrations exist only during their contender's
	// passes (clientRegistration): for every connect-proxy registration
	// with an upstream, the agent runs its own proxy-config watch of that
	// upstream (proxycfg, whether or not a proxy consumes it), and two of
	// them took Consul's own notification p99 on health/connect at
	// 100 changes/s from about 25 ms to 85 ms on this machine.
	cb.regHC = clientRegistration(c, "client", ports[1], ports[2],
		api.Upstream{DestinationName: "api", LocalBindPort: cb.hcPort, Config: map[string]any{"protocol": "http"}})
	// The base api-plain endpoint is the app itself: api-plain is never empty.
	cb.plainKey = fmt.Sprintf("127.0.0.1:%d", cb.appPort)
	if err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "api-plain-base", Name: "api-plain",
		Address: "127.0.0.1", Port: cb.appPort, Checks: bench.Passing()}); err != nil {
		return err
	}
	cb.api, err = newPool(b.Env, "api", 1, n, cb.apiBase, func(svc *api.AgentService) {
		svc.Service, svc.Kind = "api-sidecar-proxy", api.ServiceKindConnectProxy
		svc.Proxy = &api.AgentServiceConnectProxyConfig{DestinationServiceName: "api", DestinationServiceID: "api"}
	})
	if err != nil {
		return err
	}
	cb.plain, err = newPool(b.Env, "api-plain", 2, n, cb.plainKey, func(svc *api.AgentService) { svc.Service = "api-plain" })
	return err
}
