// Package authz is the authorization workload: the SPOE agent's decision time, cached and
// uncached, timed at the agent's socket by a minimal SPOP client; and the
// rate of new connections through the sidecars with authorization on and
// off.
package authz

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/haproxy-connect/haproxy-connect/authzgen"
	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
	"github.com/haproxy-connect/haproxy-connect/scrape"
	"github.com/haproxy-connect/haproxy-connect/spoa"
	"github.com/haproxy-connect/haproxy-connect/spoa/spoptest"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// shape is one row group of the on/off comparison.
type shape struct {
	mode    bench.HTTPMode
	clients int
}

// shapes: the new-connection rate the target is about, and keep-alive,
// where what authorization costs depends on whether the agent is asked per
// request or per connection.
var shapes = []shape{{bench.ModeNewConn, 16}, {bench.ModeNewConn, 128}, {bench.ModeKeepAlive, 16}}

// sources are the client services whose leaves the decision-time
// client presents, in turn.
const sources = 8

// variant is one way the inbound side is run.
type variant struct {
	name string
	// port is the client sidecar's upstream bind for it.
	port int
	// sessions counts connections accepted on its public listener.
	sessions func() (int64, error)
	// decisions counts its agent's decisions; nil without an agent.
	decisions func() (int64, error)
}

// figures are one variant's figures at one concurrency, one per round.
type figures struct {
	// Two runs per round.
	rate, p99, connsPerReq, authzPerReq bench.Rounds
	// vsOff is the rate over the off side's, one paired ratio per round.
	vsOff            bench.Rounds
	requests, errors int64
	firstErr         string
}

// decisionCase is one kind of SPOP exchange timed at the agent's socket.
type decisionCase struct {
	name string
	// message is the SPOE message sent: bootstrap.RenderSPOE's
	// "authorize", once per connection (and again on an HTTP connection
	// after the intentions changed).
	message string
	// uncached drops the agent's cache before each request, so that each
	// one makes a Consul authorize call.
	uncached bool
	// noDecision sends a message the agent ignores: what is left is
	// loopback, framing and the agent's dispatch.
	noDecision bool
	// newCerts presents a certificate the agent has never seen on every
	// request (minted by the CA Consul runs with); agentVerifies sends
	// them to an agent that was not told HAProxy's roots, which verifies
	// each chain itself.
	newCerts, agentVerifies bool
	samples                 int
}

type decisionFigures struct {
	p50, p99, max bench.Rounds
	// agentP50 and agentP99 are the agent's own decision times, from its
	// haproxy_connect_authz_decision_seconds (the upper bound of the
	// bucket holding the quantile): no loopback, no framing.
	agentP50, agentP99 bench.Rounds
}

func Run(ctx context.Context, b *bench.Bench) error {
	if b.Wrk == "" {
		return errors.New("wrk not found (apt-get install -y wrk, or set WRK_BIN)")
	}
	// Consul signs with a CA of meshbench's, which mints certificates
	// no agent has seen for the decision-time cases.
	ca, err := testenv.GenerateCA("meshbench authz CA")
	if err != nil {
		return err
	}
	consul, err := b.StartConsul(testenv.ConsulOptions{CA: ca})
	if err != nil {
		return err
	}
	app, err := bench.StartCountingApp(b.Env, "hello from server\n")
	if err != nil {
		return err
	}
	ports, err := b.Ports(8)
	if err != nil {
		return err
	}
	var (
		serverSidecar, onPublic, offPublic, clientApp, clientSidecar = ports[0], ports[1], ports[2], ports[3], ports[4]
		upServer, upOn, upOff                                        = ports[5], ports[6], ports[7]
	)
	c := consul.Client
	httpCfg := map[string]any{"protocol": "http", "bind_address": "127.0.0.1"}
	// "server" is served by a haproxy-connect sidecar; "authz-on" and
	// "authz-off" by HAProxy run here from bootstrap.Render, with (its
	// messages going to the server sidecar's agent) and without the SPOE
	// filter. All three front the same app.
	for _, r := range []struct {
		name string
		port int
	}{{"server", serverSidecar}, {"authz-on", onPublic}, {"authz-off", offPublic}} {
		if err := bench.RegisterWithSidecar(c, r.name, app.Port, r.port, httpCfg); err != nil {
			return err
		}
	}
	// The client's upstreams are tcp: one mTLS connection to the inbound
	// side per client connection, which is what is under test. In http
	// mode the client sidecar would pool its connections to other sidecars
	// (http-reuse always), and a new client connection would cost the
	// inbound side no handshake and no authorization.
	up := func(name string, port int) api.Upstream {
		return api.Upstream{DestinationName: name, LocalBindAddress: "127.0.0.1", LocalBindPort: port, Config: map[string]any{"protocol": "tcp"}}
	}
	err = bench.RegisterWithSidecar(c, "client", clientApp, clientSidecar, map[string]any{"bind_address": "127.0.0.1"},
		up("server", upServer), up("authz-on", upOn), up("authz-off", upOff))
	if err != nil {
		return err
	}

	server, err := b.StartSidecar(consul, "server")
	if err != nil {
		return err
	}
	if _, err := b.StartSidecar(consul, "client"); err != nil {
		return err
	}
	agentAddr, err := sidecarAgentAddr(server.StateDir)
	if err != nil {
		return err
	}
	onProc, offProc, err := startRenderedPair(b, consul, agentAddr, app.Port, onPublic, offPublic)
	if err != nil {
		return err
	}
	serverDecisions := func() (int64, error) { return bench.SidecarDecisions(server.Stats) }
	variants := []variant{
		{
			name: "on: haproxy-connect sidecar", port: upServer,
			sessions: func() (int64, error) {
				return bench.FrontendSessions(filepath.Join(server.StateDir, "master.sock"), bootstrap.PublicFrontend)
			},
			decisions: serverDecisions,
		},
		{
			name: "on: rendered config + the sidecar's agent", port: upOn,
			sessions:  func() (int64, error) { return bench.FrontendSessions(onProc.MasterSock, bootstrap.PublicFrontend) },
			decisions: serverDecisions,
		},
		{
			name: "off: rendered config without the SPOE filter", port: upOff,
			sessions: func() (int64, error) { return bench.FrontendSessions(offProc.MasterSock, bootstrap.PublicFrontend) },
		},
	}
	if err := bench.WaitUpstreams(ctx, app.Body, upServer, upOn, upOff); err != nil {
		return err
	}

	authClient, err := authorizeClient(consul.Addr)
	if err != nil {
		return err
	}
	// The sidecar's agent is told the roots HAProxy verifies client
	// certificates against; the second is not, and verifies each chain.
	timing, err := startAgent(b.Env, "server", authClient, ca.CertPEM)
	if err != nil {
		return err
	}
	verifying, err := startAgent(b.Env, "server", authClient, "")
	if err != nil {
		return err
	}
	certs, err := sourceCerts(c, sources)
	if err != nil {
		return err
	}
	roots, _, err := c.Agent().ConnectCARoots(nil)
	if err != nil {
		return err
	}
	cached, uncached, floor := 20000, 2000, 20000
	if b.Quick {
		cached, uncached, floor = 2000, 200, 2000
	}
	cases := []decisionCase{
		{name: "cached", message: authzgen.Message, samples: cached},
		{name: "uncached (held intentions)", message: authzgen.Message, uncached: true, samples: uncached},
		{name: "uncached, a certificate never seen", message: authzgen.Message, uncached: true, newCerts: true, samples: uncached},
		{name: "uncached, a certificate never seen, roots not known to be HAProxy's", message: authzgen.Message, uncached: true,
			newCerts: true, agentVerifies: true, samples: uncached},
		{name: "no decision (SPOP round-trip floor)", noDecision: true, samples: floor},
	}
	mint := func(n int) ([][]byte, error) {
		var out [][]byte
		for i := range n {
			certPEM, _, err := ca.IssueLeaf(fmt.Sprintf("spiffe://%s/ns/default/dc/dc1/svc/fresh-%d", roots.TrustDomain, i))
			if err != nil {
				return nil, err
			}
			blk, _ := pem.Decode([]byte(certPEM))
			if blk == nil {
				return nil, errors.New("minted leaf: no PEM block")
			}
			out = append(out, blk.Bytes)
		}
		return out, nil
	}

	rates := map[string]map[shape]*figures{}
	for _, v := range variants {
		rates[v.name] = map[shape]*figures{}
		for _, cell := range shapes {
			rates[v.name][cell] = &figures{}
		}
	}
	times := map[string]*decisionFigures{}
	off := variants[len(variants)-1].name
	for r := 0; r < b.Rounds; r++ {
		b.Logf("authz round %d/%d", r+1, b.Rounds)
		for _, v := range variants {
			if _, err := bench.RunWrk(ctx, b.Wrk, fmt.Sprintf("http://127.0.0.1:%d/", v.port), 16, time.Second, true); err != nil {
				return fmt.Errorf("%s: warm-up: %w", v.name, err)
			}
		}
		// The differences sought are a few per cent, less than the
		// machine's drift over a run: each cell measures every variant
		// twice, in mirrored order (ABC CBA, rotated every round), and
		// compares each with the off side within the round.
		for _, cell := range shapes {
			order := make([]variant, 0, 2*len(variants))
			for i := range variants {
				order = append(order, variants[(i+r)%len(variants)])
			}
			for i := len(variants) - 1; i >= 0; i-- {
				order = append(order, order[i])
			}
			sum := map[string]float64{}
			for _, v := range order {
				rps, err := measureOnOff(ctx, b, v, cell, rates[v.name][cell])
				if err != nil {
					return fmt.Errorf("%s: %w", v.name, err)
				}
				sum[v.name] += rps
			}
			for _, v := range variants {
				if sum[off] > 0 {
					f := rates[v.name][cell]
					f.vsOff = append(f.vsOff, sum[v.name]/sum[off])
				}
			}
		}
		if err := measureDecisions(timing, verifying, certs, mint, cases, times); err != nil {
			return err
		}
	}
	reportDecisions(b, cases, times)
	reportOnOff(b, variants, rates)
	return nil
}

// authorizeClient is a Consul client for the timing agent's watches, set
// up as the sidecar's: the pooled transport of api.DefaultConfig, no
// timeout (the watches block up to 5 minutes), and no CONSUL_HTTP_*
// settings from the environment.
func authorizeClient(addr string) (*api.Client, error) {
	cfg := api.DefaultConfig()
	cfg.Address, cfg.Scheme, cfg.Token, cfg.TokenFile = addr, "http", "", ""
	hc, err := api.NewHttpClient(cfg.Transport, api.TLSConfig{})
	if err != nil {
		return nil, err
	}
	cfg.HttpClient = hc
	return api.NewClient(cfg)
}

type agent struct {
	a    *spoa.Authorizer
	addr string
	// metrics holds the agent's collector, as the sidecar's /metrics does.
	metrics *prometheus.Registry
}

// decisionTime reads the agent's own decision-time histogram, as a
// sidecar serves it.
func (ag *agent) decisionTime() (bench.Histogram, error) {
	f, err := scrape.Gather(ag.metrics)
	if err != nil {
		return bench.Histogram{}, err
	}
	return bench.HistogramOf(f, decisionTimeMetric)
}

// decisionTimeMetric is the agent's histogram of its own decision times.
const decisionTimeMetric = "haproxy_connect_authz_decision_seconds"

// startAgent runs a spoa.Authorizer for target on a free loopback
// port, deciding as the sidecar does: locally, from the intentions its
// watch holds. It logs as the sidecar does (info, console encoding), to
// nowhere: uncached decisions pay for their log line. It returns once the
// agent holds the intentions.
//
// servedRoots, unless empty, are announced as the roots HAProxy verifies
// client certificates against (as the sidecar's controller does), so the
// agent relies on that verification for certificates it has not seen.
func startAgent(e *bench.Env, target string, client *api.Client, servedRoots string) (*agent, error) {
	log := zap.New(zapcore.NewCore(zapcore.NewConsoleEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(io.Discard), zapcore.InfoLevel))
	ag := &agent{a: spoa.New(target, nil, log), metrics: prometheus.NewRegistry()}
	if err := ag.metrics.Register(ag.a.Collector()); err != nil {
		return nil, err
	}
	if servedRoots != "" {
		if err := ag.a.RootsServed(servedRoots, true); err != nil {
			return nil, err
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	go func() { _ = ag.a.Serve(ln) }()
	// The agent checks client certificates against Consul's roots, and
	// decides nothing before it has them.
	ctx, cancel := context.WithCancel(context.Background())
	go func() { _ = ag.a.WatchRoots(ctx, client) }()
	go func() { _ = ag.a.WatchIntentions(ctx, client) }()
	e.Defer(func() { cancel(); ag.a.Close() })
	for deadline := time.Now().Add(10 * time.Second); ag.a.Intentions() == nil; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			return nil, errors.New("authz agent: no intentions from Consul in 10s")
		}
	}
	ag.addr = ln.Addr().String()
	return ag, nil
}

// sidecarAgentAddr reads the SPOE agent's unix socket from a sidecar's
// rendered config: the server line of the bootstrap.SPOEBackend backend
// ("server agent unix@<path>").
func sidecarAgentAddr(stateDir string) (string, error) {
	cfg, err := os.ReadFile(filepath.Join(stateDir, "haproxy.cfg"))
	if err != nil {
		return "", err
	}
	in := false
	for _, line := range strings.Split(string(cfg), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 0:
		case f[0] == "backend" || f[0] == "frontend" || f[0] == "defaults" || f[0] == "global":
			in = len(f) > 1 && f[0] == "backend" && f[1] == bootstrap.SPOEBackend
		case in && f[0] == "server" && len(f) >= 3:
			return strings.TrimPrefix(f[2], "unix@"), nil
		}
	}
	return "", fmt.Errorf("no server in backend %s of %s/haproxy.cfg", bootstrap.SPOEBackend, stateDir)
}

// startRenderedPair renders the inbound config of authz-on and authz-off
// with bootstrap.Render, from their own leaves and Consul's roots, as the
// sidecar does, and runs it: authz-on as rendered, its SPOE messages going
// to the agent's socket agentAddr; authz-off without the SPOE filter and its verdict rules,
// so that every request is served without asking anyone.
func startRenderedPair(b *bench.Bench, consul *testenv.ConsulProc, agentAddr string, appPort, onPort, offPort int) (on, off *testenv.HAProxyProc, err error) {
	roots, _, err := consul.Client.Agent().ConnectCARoots(nil)
	if err != nil {
		return nil, nil, fmt.Errorf("ca roots: %w", err)
	}
	var rootsPEM strings.Builder
	for _, r := range roots.Roots {
		rootsPEM.WriteString(strings.TrimSpace(r.RootCertPEM) + "\n")
	}
	render := func(service string, port int) (string, error) {
		dir, err := b.Subdir("r")
		if err != nil {
			return "", err
		}
		leaf, _, err := consul.Client.Agent().ConnectCALeaf(service, nil)
		if err != nil {
			return "", fmt.Errorf("leaf for %s: %w", service, err)
		}
		spec := bootstrap.Spec{
			Service:       service,
			LeafFile:      filepath.Join(dir, "leaf.pem"),
			RootsFile:     filepath.Join(dir, "roots.pem"),
			SPOEFile:      filepath.Join(dir, "spoe.cfg"),
			AuthzMap:      filepath.Join(dir, "authz.map"),
			CrtList:       filepath.Join(dir, "public.crtlist"),
			SNI:           bootstrap.FallbackSNI,
			SPOASocket:    agentAddr,
			HardStopAfter: 30 * time.Second, // as the sidecar renders it
			// The sidecar's default, so that the pair differs from the
			// haproxy-connect sidecar only in what it leaves out.
			AccessLog: true,
			Public: bootstrap.Public{BindAddr: "127.0.0.1", BindPort: port, Protocol: "http",
				LocalAddr: "127.0.0.1", LocalPort: appPort},
		}
		cfg, files, err := bootstrap.RenderFiles(spec, 0)
		if err != nil {
			return "", err
		}
		files = append(files,
			bootstrap.File{Path: spec.LeafFile, Content: strings.TrimSpace(leaf.CertPEM) + "\n" + leaf.PrivateKeyPEM},
			bootstrap.File{Path: spec.RootsFile, Content: rootsPEM.String()})
		if err := bench.WriteFiles(files); err != nil {
			return "", err
		}
		return cfg, nil
	}
	onCfg, err := render("authz-on", onPort)
	if err != nil {
		return nil, nil, err
	}
	offCfg, err := render("authz-off", offPort)
	if err != nil {
		return nil, nil, err
	}
	if offCfg, err = withoutSPOE(offCfg); err != nil {
		return nil, nil, err
	}
	if on, err = b.StartHAProxy(onCfg); err != nil {
		return nil, nil, fmt.Errorf("haproxy authz-on: %w", err)
	}
	if off, err = b.StartHAProxy(offCfg); err != nil {
		return nil, nil, fmt.Errorf("haproxy authz-off: %w", err)
	}
	return on, off, nil
}

// withoutSPOE removes the public listener's SPOE filter, the rules that
// check its verdict (any line reading var(<scope>.hc.allowed): the
// tcp-request rule in TCP mode, the http-request rules in HTTP mode), the
// tcp-request inspect-delay that waits for it, a listener's remembered
// allows (its stick table and the rules that read it), and an HTTP
// listener's L7 rules. It fails unless it
// removed the filter and at least one verdict rule and nothing mentioning
// either is left, so that a change in the renderer cannot silently make
// "off" equal to "on".
func withoutSPOE(cfg string) (string, error) {
	verdict := "." + bootstrap.VarPrefix + ".allowed)"
	var out []string
	filters, rules := 0, 0
	for _, line := range strings.Split(cfg, "\n") {
		t := strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(t, "filter spoe "):
			filters++
		case strings.Contains(t, verdict):
			rules++
		case strings.HasPrefix(t, "tcp-request inspect-delay "),
			// a listener's remembered allows (bootstrap.Render)
			strings.HasPrefix(t, "stick-table "), strings.Contains(t, "track-sc0"),
			strings.Contains(t, "authz_cached"), strings.Contains(t, "."+bootstrap.VarPrefix+".cached"),
			// an HTTP listener's per-request L7 rules, every one of
			// which reads sess.hc.l7 or txn.hc.l7*: without the filter
			// their send-spoe-group names an engine that is gone
			strings.Contains(t, bootstrap.VarPrefix+".l7"):
		default:
			out = append(out, line)
			continue
		}
	}
	res := strings.Join(out, "\n")
	if filters != 1 || rules == 0 || strings.Contains(res, "spoe engine") || strings.Contains(res, "spoe-group") || strings.Contains(res, verdict) {
		return "", fmt.Errorf("removing the SPOE filter: %d filter lines and %d verdict rules matched; has bootstrap.Render changed?", filters, rules)
	}
	return res, nil
}

// measureOnOff runs wrk through v for one cell, adds the figures to f and
// returns the request rate.
func measureOnOff(ctx context.Context, b *bench.Bench, v variant, cell shape, f *figures) (float64, error) {
	url := fmt.Sprintf("http://127.0.0.1:%d/", v.port)
	s0, err := v.sessions()
	if err != nil {
		return 0, err
	}
	var d0 int64
	if v.decisions != nil {
		if d0, err = v.decisions(); err != nil {
			return 0, err
		}
	}
	res, err := bench.RunWrk(ctx, b.Wrk, url, cell.clients, b.WrkTime(), cell.mode.Close)
	if err != nil {
		return 0, err
	}
	s1, err := v.sessions()
	if err != nil {
		return 0, err
	}
	f.rate = append(f.rate, res.RPS)
	f.p99 = append(f.p99, res.P99)
	f.requests += res.Requests
	if res.Requests > 0 {
		f.connsPerReq = append(f.connsPerReq, float64(s1-s0)/float64(res.Requests))
	}
	if v.decisions != nil && res.Requests > 0 {
		d1, err := v.decisions()
		if err != nil {
			return 0, err
		}
		f.authzPerReq = append(f.authzPerReq, float64(d1-d0)/float64(res.Requests))
	}
	if e := res.Errors(); e > 0 {
		f.errors += e
		if f.firstErr == "" {
			f.firstErr = res.ErrorText()
		}
	}
	return res.RPS, nil
}

// measureDecisions times each case over one SPOP connection, one request
// at a time, and checks from the agent's counters that each request was
// decided the way the case says.
func measureDecisions(main, verifying *agent, certs [][]byte, mint func(int) ([][]byte, error), cases []decisionCase,
	figs map[string]*decisionFigures) error {
	conns := map[*agent]*spoptest.Conn{}
	for _, ag := range []*agent{main, verifying} {
		cl, err := spoptest.Dial(ag.addr, "meshbench-"+strconv.Itoa(os.Getpid()), 5*time.Second)
		if err != nil {
			return err
		}
		defer cl.Close()
		conns[ag] = cl
		// Warm up: fill the cache, start the agent's workers, touch the code.
		for i := 0; i < 200; i++ {
			if _, err := spopAuthorize(cl, authzgen.Message, certs[i%len(certs)]); err != nil {
				return err
			}
		}
	}
	for _, c := range cases {
		ag := main
		if c.agentVerifies {
			ag = verifying
		}
		cl := conns[ag]
		present := certs
		if c.newCerts {
			var err error
			if present, err = mint(c.samples); err != nil {
				return err
			}
		}
		before := ag.a.Stats()
		timeBefore, err := ag.decisionTime()
		if err != nil {
			return err
		}
		s := make(bench.Samples, 0, c.samples)
		for i := 0; i < c.samples; i++ {
			if c.uncached && !c.newCerts {
				ag.a.Invalidate()
			}
			start := time.Now()
			var allowed bool
			var err error
			if c.noDecision {
				err = spopIgnored(cl)
				allowed = true
			} else {
				allowed, err = spopAuthorize(cl, c.message, present[i%len(present)])
			}
			d := time.Since(start)
			if err != nil {
				return fmt.Errorf("%s: %w", c.name, err)
			}
			if !allowed {
				return fmt.Errorf("%s: the agent denied a client with default-allow intentions", c.name)
			}
			s = append(s, d.Seconds())
		}
		after := ag.a.Stats()
		hits, calls := after.CacheHits-before.CacheHits, after.LocalDecisions-before.LocalDecisions
		verified := after.ChainVerifications - before.ChainVerifications
		n := uint64(c.samples)
		switch {
		case c.newCerts && c.agentVerifies && verified != n:
			return fmt.Errorf("%s: the agent verified %d chains for %d new certificates", c.name, verified, n)
		case c.newCerts && !c.agentVerifies && verified != 0:
			return fmt.Errorf("%s: the agent verified %d chains, HAProxy's roots announced", c.name, verified)
		case c.noDecision && (hits != 0 || calls != 0):
			return fmt.Errorf("%s: the agent decided (%d cache hits, %d uncached decisions)", c.name, hits, calls)
		case c.uncached && calls != n:
			return fmt.Errorf("%s: %d uncached decisions for %d requests", c.name, calls, n)
		case !c.uncached && !c.noDecision && (hits != n || calls != 0):
			return fmt.Errorf("%s: %d cache hits and %d uncached decisions for %d requests", c.name, hits, calls, n)
		}
		f := figs[c.name]
		if f == nil {
			f = &decisionFigures{}
			figs[c.name] = f
		}
		f.p50 = append(f.p50, s.Percentile(50))
		f.p99 = append(f.p99, s.Percentile(99))
		f.max = append(f.max, s.Max())
		timeAfter, err := ag.decisionTime()
		if err != nil {
			return err
		}
		if in := timeAfter.Sub(timeBefore); in.Count() > 0 {
			f.agentP50 = append(f.agentP50, in.Bound(0.50))
			f.agentP99 = append(f.agentP99, in.Bound(0.99))
		}
	}
	return nil
}

// sourceCerts returns the DER leaf of n client services from Consul's CA.
func sourceCerts(c *api.Client, n int) ([][]byte, error) {
	var certs [][]byte
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("source-%d", i)
		leaf, _, err := c.Agent().ConnectCALeaf(name, nil)
		if err != nil {
			return nil, fmt.Errorf("leaf for %s: %w", name, err)
		}
		blk, _ := pem.Decode([]byte(leaf.CertPEM))
		if blk == nil {
			return nil, fmt.Errorf("leaf for %s: no PEM block", name)
		}
		if _, err := x509.ParseCertificate(blk.Bytes); err != nil {
			return nil, fmt.Errorf("leaf for %s: %w", name, err)
		}
		certs = append(certs, blk.Bytes)
	}
	return certs, nil
}

func reportDecisions(b *bench.Bench, cases []decisionCase, figs map[string]*decisionFigures) {
	sec := b.Report.Add("Authorization: SPOE agent decision time",
		"case", "requests/round", "p50 in agent (≤)", "p99 in agent (≤)", "p50 at socket", "p99 at socket", "max at socket")
	for _, c := range cases {
		f := figs[c.name]
		if f == nil {
			continue
		}
		sec.Row(c.name, strconv.Itoa(c.samples), f.agentP50.Format(bench.Dur), f.agentP99.Format(bench.Dur), f.p50.Format(bench.Dur), f.p99.Format(bench.Dur), f.max.Format(bench.Dur))
	}
	sec.Note("A spoa.Authorizer (the sidecar's agent, deciding locally from the intentions its watch holds, logging "+
		"as the sidecar does) runs inside meshbench; a minimal SPOP 2.0 client in meshbench sends one NOTIFY "+
		"(`authorize`, what the listener sends once per connection, and again on a kept-alive HTTP connection "+
		"after the intentions changed) with a real Consul leaf (DER, %d source services in turn) and times it until the ACK, one "+
		"request at a time on one connection, as HAProxy would over one agent connection. Each figure therefore "+
		"includes loopback, SPOP framing and the agent's dispatch; the floor row (a message the agent ignores) "+
		"is that overhead alone. Uncached: the cache is dropped (Invalidate, as on an intention change) before "+
		"each request, outside the timed span: each uncached decision walks the held intentions again, as after an intention change; "+
		"these 8 certificates' checks are remembered per certificate. A certificate never seen: every request presents a new leaf "+
		"(minted by the CA Consul runs with), parsed and checked: with HAProxy's roots announced, as the sidecar's controller does, "+
		"the agent relies on HAProxy's handshake verification; without, it verifies the chain itself (one ECDSA P-256 signature "+
		"check; a second agent, not told the roots). The agent's counters are checked after each case: every cached "+
		"request was a cache hit, every uncached one a local decision (no Consul call), and chains were verified by the agent exactly "+
		"when expected. In agent: the agent's own time per message, from its haproxy_connect_authz_decision_seconds histogram as a sidecar "+
		"serves it (from reading the message to its answer: certificate parse and checks, cache or intentions, log line), without loopback "+
		"or framing, as the upper bound of the bucket holding the quantile (buckets 1, 2.5, 5, 10, 25, 50, 100, 250, 500 µs, 1 ms, ...).", sources)
}

func reportOnOff(b *bench.Bench, variants []variant, figs map[string]map[shape]*figures) {
	sec := b.Report.Add("Authorization: request rate with authorization on and off",
		"mode", "clients", "inbound side", "req/s", "p99", "conns/req", "authz/req", "errors", "÷ off")
	off := variants[len(variants)-1].name
	var errNotes []string
	for _, cell := range shapes {
		n := cell.clients
		base := figs[off][cell]
		for _, v := range variants {
			f := figs[v.name][cell]
			if f == nil {
				continue
			}
			vsOff := "n/a"
			if base != nil {
				vsOff = f.vsOff.Format(func(r float64) string { return fmt.Sprintf("%.2f", r) })
			}
			sec.Row(cell.mode.Name, strconv.Itoa(n), v.name, f.rate.Format(bench.Num), f.p99.Format(bench.Dur), f.connsPerReq.Format(bench.PerReq),
				bench.OptPerReq(f.authzPerReq), strconv.FormatInt(f.errors, 10), vsOff)
			if f.errors > 0 {
				errNotes = append(errNotes, fmt.Sprintf("%s, %s, %d clients: %d errors in %d requests (%s)",
					v.name, cell.mode.Name, n, f.errors, f.requests, f.firstErr))
			}
		}
	}
	sec.Note("wrk (%s per cell) → haproxy-connect client sidecar (its upstreams in tcp mode: one mTLS connection "+
		"onward per client connection; in http mode it would pool them, see the data path) → the inbound side (http) → the app (in "+
		"meshbench). new conn: wrk sends `Connection: close`, so each request is a new connection and, between "+
		"the sidecars, a new mTLS handshake (req/s is then new connections per second); keep-alive: connections "+
		"are reused (authz/req shows whether requests on them are still authorized one by one). Inbound sides: the haproxy-connect "+
		"sidecar of `server`; and, for a like-for-like pair, HAProxy run by meshbench from bootstrap.Render "+
		"(the sidecar's renderer, own leaf, Consul's roots, access logs on as the sidecar's default), once as rendered with its SPOE messages going to the "+
		"server sidecar's agent (in the haproxy-connect process), once with the `filter spoe` line, the rules "+
		"that check its verdict and its stick table removed: the like-for-like pair differs only in those lines. "+
		"The pair is rendered without a sources map, so, unlike the sidecar, its HTTP listener remembers no allow "+
		"and asks the agent on every new connection. "+
		"Each cell runs every inbound side twice per round, in mirrored order (ABC then CBA, rotated every round), "+
		"so req/s, p99, conns/req and authz/req are median (min–max) over 2 × rounds runs; ÷ off is the rate of the "+
		"side over that of the last side (off), paired within each round (both runs summed), median (min–max) over "+
		"rounds: the machine drifts more over a run than the few per cent sought. "+
		"The target is at least 0.9 for authorization on in new-conn mode. "+
		"conns/req is the inbound public listener's new sessions per request (HAProxy stats), so about 1 means one mTLS handshake "+
		"per request; authz/req is the agent's decisions per request: with one client certificate, HAProxy "+
		"allows every connection after the first from its remembered allow (the access log still names the caller), so about 0 "+
		"means the agent is not asked at all.", b.WrkTime())
	errText := "no wrk errors (socket errors or non-2xx responses) in any cell."
	if len(errNotes) > 0 {
		errText = "wrk errors (socket errors + non-2xx responses, summed over rounds): " + strings.Join(errNotes, "; ") + "."
	}
	sec.Note("%s", errText)
}

// spopAuthorize sends message with its argument cert=der, as
// bootstrap.RenderSPOE declares it, and returns the verdict the ACK sets.
func spopAuthorize(cl *spoptest.Conn, message string, der []byte) (bool, error) {
	vars, err := cl.Notify(spoptest.Message{Name: message, Args: []spoptest.Arg{{Name: authzgen.ArgCert, Value: der}}})
	if err != nil {
		return false, err
	}
	allowed, ok := vars["sess.allowed"].(bool)
	if !ok {
		return false, fmt.Errorf("ack without the allowed variable: %v", vars)
	}
	return allowed, nil
}

// spopIgnored sends a message the agent does not handle; it answers an
// empty ACK.
func spopIgnored(cl *spoptest.Conn) error {
	vars, err := cl.Notify(spoptest.Message{Name: "meshbench-ignored", Args: []spoptest.Arg{{Name: "x", Value: []byte{0}}}})
	if err == nil && len(vars) > 0 {
		err = fmt.Errorf("ack for an ignored message sets %v", vars)
	}
	return err
}
