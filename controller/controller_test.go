package controller

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/consul/api"
	"go.uber.org/zap/zaptest"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/slots"
	"github.com/haproxy-connect/haproxy-connect/testenv"
	"github.com/haproxy-connect/haproxy-connect/verify"
)

// fakeHAProxy records what the controller does to HAProxy as text, and can
// fail commands whose text contains failOn. Instance map commands are kept
// apart, in maps (TestInstanceMapTranscript reads them).
type fakeHAProxy struct {
	transcript []string
	maps       []string
	failOn     string
	failReload bool
	state      []runtime.ServerStatus
}

func (f *fakeHAProxy) Exec(_ context.Context, cmds ...runtime.Command) (runtime.Results, error) {
	rs := make(runtime.Results, len(cmds))
	for i, c := range cmds {
		if strings.Contains(c.Line, "/"+InstanceMapFile+" ") {
			f.maps = append(f.maps, c.String())
		} else {
			f.transcript = append(f.transcript, c.String())
		}
		rs[i].Command = c
		if f.failOn != "" && strings.Contains(c.String(), f.failOn) {
			rs[i].Err = &runtime.ReplyError{Command: c.String(), Reply: "No such server.", Err: runtime.ErrNoSuchServer}
		}
	}
	return rs, nil
}

func (f *fakeHAProxy) Reload(_ context.Context, reason string) (runtime.ProcList, error) {
	f.transcript = append(f.transcript, "reload: "+reason)
	if f.failReload {
		return runtime.ProcList{}, runtime.ErrReloadFailed
	}
	return runtime.ProcList{}, nil
}

func (f *fakeHAProxy) UpdateCert(_ context.Context, file, _ string) error {
	f.transcript = append(f.transcript, "update cert "+filepath.Base(file))
	return nil
}

func (f *fakeHAProxy) ServersState(_ context.Context, backend string) ([]runtime.ServerStatus, error) {
	f.transcript = append(f.transcript, "show servers state "+backend)
	return f.state, nil
}

func (f *fakeHAProxy) Socket() string { return "/fake/master.sock" }
func (f *fakeHAProxy) Close() error   { return nil }

func (f *fakeHAProxy) take() []string {
	t := f.transcript
	f.transcript = nil
	return t
}

func ep(last, port int) slots.Endpoint {
	return slots.Endpoint{Addr: fmt.Sprintf("10.0.0.%d", last), Port: port, Weight: 1}
}

// webLeaf is a leaf of service web, from a new CA, and that CA as the
// roots.
func webLeaf(tb testing.TB) (certs.Bundle, certs.Roots) {
	tb.Helper()
	ca := testenv.NewCA(tb, "root")
	cert, key := ca.Leaf(tb, "spiffe://td.consul/ns/default/dc/dc1/svc/web")
	leaf, err := certs.NewBundle(cert, key, time.Now())
	if err != nil {
		tb.Fatal(err)
	}
	roots, err := certs.NewRoots([]string{ca.CertPEM})
	if err != nil {
		tb.Fatal(err)
	}
	return leaf, roots
}

// drainEvents runs every event waiting in c.events, as the loop would.
func drainEvents(c *Controller) {
	for {
		select {
		case f := <-c.events:
			f(&c.desired)
		default:
			return
		}
	}
}

func sidecar(ups ...Upstream) *Sidecar {
	return &Sidecar{ProxyID: "web-sidecar-proxy", Service: "web", Upstreams: ups,
		Public: bootstrap.Public{BindAddr: "127.0.0.1", BindPort: 21000, Protocol: "http", LocalAddr: "127.0.0.1", LocalPort: 8080}}
}

func up(name string, port int) Upstream {
	return Upstream{Name: "up_" + name, Type: "service", Destination: name, BindAddr: "127.0.0.1", BindPort: port}
}

// TestReconcileTranscript drives the loop's reconcile step through a
// sequence of desired states and checks the exact runtime transcript.
func TestReconcileTranscript(t *testing.T) {
	ca := testenv.NewCA(t, "root")
	leaf := func() *certs.Bundle {
		c, k := ca.Leaf(t, "spiffe://td.consul/ns/default/dc/dc1/svc/web")
		b, err := certs.NewBundle(c, k, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		return &b
	}
	roots := func(pems ...string) *certs.Roots {
		r, err := certs.NewRoots(pems)
		if err != nil {
			t.Fatal(err)
		}
		return &r
	}
	dir := t.TempDir()
	c, err := New(Config{Consul: api.DefaultConfig(), ProxyID: "web-sidecar-proxy", StateDir: dir, SPOASocket: "/state/spoa.sock", Log: zaptest.NewLogger(t), MinSlots: 8})
	if err != nil {
		t.Fatal(err)
	}
	fake := &fakeHAProxy{}
	c.rt = fake
	// Every endpoint proves the destination's identity, but those in
	// shows: they present another (or none, and are unreachable).
	var showsMu sync.Mutex
	shows := map[string]string{}
	c.ident.verify = func(_ context.Context, _ verify.Config, addr, want string) (verify.Result, error) {
		showsMu.Lock()
		id, other := shows[addr]
		showsMu.Unlock()
		switch {
		case !other:
			return verify.Result{ID: want}, nil
		case id == "":
			return verify.Result{}, errors.New("connect: connection refused")
		}
		return verify.Result{ID: id}, fmt.Errorf("%w: %s", verify.ErrMismatch, id)
	}
	show := func(addr, id string) {
		showsMu.Lock()
		shows[addr] = id
		showsMu.Unlock()
	}
	const otherID = "spiffe://td.consul/ns/default/dc/dc1/svc/other"
	const dbID = "spiffe://td.consul/ns/default/dc/dc1/svc/db"
	started := 0
	c.startMaster = func(context.Context) (*runtime.Master, error) {
		started++
		return &runtime.Master{}, nil
	}
	// Watches are not under test: pretend they already run.
	c.watches["up_api"] = &upstreamWatch{up: up("api", 9191), cancel: func() {}}
	c.leafFor, c.leafStop = "web", func() {}
	// The handshake with the public listener after a swap reports bindRes.
	bindRes := bindOK
	c.checkBind = func(_ context.Context, _ netip.AddrPort, want string) (bindResult, string, error) {
		return bindRes, want, nil
	}

	otherCA := testenv.NewCA(t, "next root")
	steps := []struct {
		name   string
		change func(d *desired)
		failOn string
		want   []string
	}{
		{"starts with the endpoints rendered, no runtime commands", func(d *desired) {
			d.sidecar, d.sidecarSince = sidecar(up("api", 9191)), time.Now()
			d.leaf, d.roots = leaf(), roots(ca.CertPEM)
			d.setEndpoints("up_api", []slots.Endpoint{ep(1, 21000), ep(2, 21000)}, time.Now())
		}, "", nil},
		{"an endpoint joins: one free slot filled", func(d *desired) {
			d.setEndpoints("up_api", []slots.Endpoint{ep(1, 21000), ep(2, 21000), ep(3, 21000)}, time.Now())
		}, "", []string{
			"@1 set server up_api/s3 addr 10.0.0.3 port 21000",
			"@1 set server up_api/s3 state ready",
		}},
		{"an endpoint leaves: parked, not deleted", func(d *desired) {
			d.setEndpoints("up_api", []slots.Endpoint{ep(2, 21000), ep(3, 21000)}, time.Now())
		}, "", []string{
			"@1 set server up_api/s1 state maint",
		}},
		{"weight change", func(d *desired) {
			d.setEndpoints("up_api", []slots.Endpoint{ep(2, 21000), {Addr: "10.0.0.3", Port: 21000, Weight: 9}}, time.Now())
		}, "", []string{"@1 set server up_api/s3 weight 9"}},
		{"leaf rotation is a cert update, not a reload", func(d *desired) { d.leaf = leaf() }, "", []string{"update cert leaf.pem"}},
		{"a newer leaf within the swap interval waits", func(d *desired) { d.leaf = leaf() }, "", nil},
		{"after the interval the newest leaf is swapped", func(d *desired) {
			d.leaf = leaf()
			c.pacing.leafSwappedAt = time.Now().Add(-LeafSwapInterval)
		}, "", []string{"update cert leaf.pem"}},
		{"a swap after which the listener asks no client certificate is repaired by a reload", func(d *desired) {
			d.leaf = leaf()
			c.pacing.leafSwappedAt = time.Time{}
			bindRes = bindNoClientCertRequest
		}, "", []string{"update cert leaf.pem", "reload: public listener lost client certificate verification after the leaf swap"}},
		{"a swap after which the listener serves another leaf is repaired by a reload", func(d *desired) {
			d.leaf = leaf()
			c.pacing.leafSwappedAt = time.Time{}
			bindRes = bindWrongLeaf
		}, "", []string{"update cert leaf.pem", "reload: public listener serves another leaf after the swap"}},
		{"an unreachable listener is logged, not reloaded for", func(d *desired) {
			d.leaf = leaf()
			c.pacing.leafSwappedAt = time.Time{}
			bindRes = bindUnreachable
		}, "", []string{"update cert leaf.pem"}},
		{"more endpoints than slots: add server, no reload", func(d *desired) {
			d.setEndpoints("up_api", []slots.Endpoint{ep(2, 21000), {Addr: "10.0.0.3", Port: 21000, Weight: 9}, ep(4, 21000), ep(5, 21000), ep(6, 21000), ep(7, 21000), ep(8, 21000), ep(9, 21000), ep(10, 21000)}, time.Now())
		}, "", []string{
			"@1 set server up_api/s1 addr 10.0.0.4 port 21000",
			"@1 set server up_api/s1 state ready",
			"@1 set server up_api/s4 addr 10.0.0.5 port 21000",
			"@1 set server up_api/s4 state ready",
			"@1 set server up_api/s5 addr 10.0.0.6 port 21000",
			"@1 set server up_api/s5 state ready",
			"@1 set server up_api/s6 addr 10.0.0.7 port 21000",
			"@1 set server up_api/s6 state ready",
			"@1 set server up_api/s7 addr 10.0.0.8 port 21000",
			"@1 set server up_api/s7 state ready",
			"@1 set server up_api/s8 addr 10.0.0.9 port 21000",
			"@1 set server up_api/s8 state ready",
			fmt.Sprintf("@1 add server up_api/s9 10.0.0.10:21000 weight 1 ssl crt %[1]s/leaf.pem ca-file %[1]s/roots.pem verify required no-ssl-reuse", dir),
			"@1 set server up_api/s9 state ready",
		}},
		{"a new upstream is a reload with its reason", func(d *desired) {
			d.sidecar = sidecar(up("api", 9191), up("db", 9192))
			c.watches["up_db"] = &upstreamWatch{up: up("db", 9192), cancel: func() {}}
			d.setEndpoints("up_db", []slots.Endpoint{ep(20, 21000)}, time.Now())
		}, "", []string{
			"reload: registration: upstream up_db added",
			// The new upstream's endpoint joins once it proved its identity.
			"@1 set server up_db/s1 addr 10.0.0.20 port 21000",
			"@1 set server up_db/s1 state ready",
		}},
		{"an endpoint that shows another identity is never placed", func(d *desired) {
			show("10.0.0.66:21000", otherID)
			d.setEndpoints("up_db", []slots.Endpoint{ep(20, 21000), ep(66, 21000)}, time.Now())
		}, "", nil},
		{"nor one that cannot be reached to verify it", func(d *desired) {
			show("10.0.0.67:21000", "")
			d.setEndpoints("up_db", []slots.Endpoint{ep(20, 21000), ep(66, 21000), ep(67, 21000)}, time.Now())
		}, "", nil},
		{"HAProxy's error counters grow for a placed endpoint, which now shows another identity: parked", func(d *desired) {
			stats := func(econ uint64) []runtime.ServerStat {
				return []runtime.ServerStat{{Backend: "up_db", Server: "s1", Addr: "10.0.0.20:21000", ConnErrors: econ}}
			}
			c.serverErrors(context.Background(), stats(0)) // the first read is the baseline
			show("10.0.0.20:21000", otherID)
			c.serverErrors(context.Background(), stats(1))
		}, "", []string{"@1 set server up_db/s1 state maint"}},
		{"the impostor leaves and a real instance takes the address: verified again, then placed", func(d *desired) {
			d.setEndpoints("up_db", nil, time.Now())
			if err := c.reconcile(context.Background()); err != nil {
				t.Fatal(err)
			}
			showsMu.Lock()
			delete(shows, "10.0.0.20:21000")
			showsMu.Unlock()
			d.setEndpoints("up_db", []slots.Endpoint{ep(20, 21000)}, time.Now())
		}, "", []string{"@1 set server up_db/s1 state ready"}},
		{"a leaving endpoint keeps its slot while its successor is being verified", func(d *desired) {
			c.ident.checks[checkKey{dbID, netip.MustParseAddrPort("10.0.0.31:21000")}] = &idCheck{want: dbID, addr: "10.0.0.31:21000", inflight: true}
			d.setEndpoints("up_db", []slots.Endpoint{ep(31, 21000)}, time.Now())
		}, "", nil},
		{"but not past maxHold", func(d *desired) {
			d.dirty["up_db"] = time.Now().Add(-2 * maxHold)
		}, "", []string{"@1 set server up_db/s1 state maint"}},
		{"the successor gone, the first one back: verified again, ready", func(d *desired) {
			delete(c.ident.checks, checkKey{dbID, netip.MustParseAddrPort("10.0.0.31:21000")})
			d.setEndpoints("up_db", []slots.Endpoint{ep(20, 21000)}, time.Now())
		}, "", []string{"@1 set server up_db/s1 state ready"}},
		{"new CA roots are a reload on 2.6", func(d *desired) { d.roots = roots(ca.CertPEM, otherCA.CertPEM) }, "", []string{"reload: CA roots changed"}},
		{"nothing changed: nothing sent", func(d *desired) {}, "", nil},
		{"an intentions change publishes its generation", func(d *desired) { c.SetAuthzGeneration(3) }, "", []string{
			fmt.Sprintf("@1 set map %s/authz.map gen 3", dir),
		}},
		{"a failed reload leaves the running config", func(d *desired) {
			fake.failReload = true
			d.sidecar = sidecar(up("api", 9191), up("db", 9192), up("cache", 9193))
			c.watches["up_cache"] = &upstreamWatch{up: up("cache", 9193), cancel: func() {}}
		}, "", []string{"reload: registration: upstream up_cache added"}},
		{"while the reload backs off, endpoint churn still applies", func(d *desired) {
			d.setEndpoints("up_db", []slots.Endpoint{ep(20, 21000), ep(22, 21000)}, time.Now())
		}, "", []string{
			"@1 set server up_db/s2 addr 10.0.0.22 port 21000",
			"@1 set server up_db/s2 state ready",
		}},
		{"after the backoff the reload is tried again", func(d *desired) {
			fake.failReload = false
			c.pacing.reloadAfter = time.Time{}
		}, "", []string{"reload: registration: upstream up_cache added"}},
		{"a failed command re-reads the backend", func(d *desired) {
			d.setEndpoints("up_db", []slots.Endpoint{ep(20, 21000), ep(21, 21000)}, time.Now())
		}, "up_db/s2 addr 10.0.0.21", []string{
			"@1 set server up_db/s2 state maint",
			"@1 set server up_db/s2 addr 10.0.0.21 port 21000",
			"@1 set server up_db/s2 state ready",
			"show servers state up_db",
		}},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			st.change(&c.desired)
			fake.failOn = st.failOn
			settle(t, c)
			got := fake.take()
			if diff := cmp.Diff(st.want, got); diff != "" {
				t.Errorf("transcript (-want +got):\n%s", diff)
			}
		})
	}
	if started != 1 {
		t.Errorf("haproxy started %d times, want 1", started)
	}
	for reason, want := range map[string]float64{reloadListener: 2, reloadRegistration: 2, reloadRoots: 1} {
		if got := value(t, c.metrics, "haproxy_connect_reloads_total", "reason", reason); got != want {
			t.Errorf("reloads for %s = %g, want %g", reason, got, want)
		}
	}
	if got := reloads(t, c.metrics); got != 5 {
		t.Errorf("reloads = %d, want 5", got)
	}
	for r, want := range map[bindResult]float64{bindOK: 2, bindNoClientCertRequest: 1, bindWrongLeaf: 1, bindUnreachable: 1} {
		if got := value(t, c.metrics, "haproxy_connect_leaf_bind_checks_total", "result", r.String()); got != want {
			t.Errorf("bind checks %s = %g, want %g", r, got, want)
		}
	}
	cfg, err := os.ReadFile(filepath.Join(dir, "haproxy.cfg"))
	if err != nil {
		t.Fatal(err)
	}
	// After the reloads, the rendered config carries the assignment, the
	// dynamic server included, in a template sized with room to grow (9
	// endpoints, a quarter more: 12 slots).
	// HAProxy checks the servers' identity on their responses (the second
	// line): the trust domain is the leaf's when the roots name none.
	apiID := "spiffe://td.consul/ns/default/dc/dc1/svc/api"
	serverIDLine := fmt.Sprintf("tcp-response content reject unless { ssl_s_der,hex -m sub %X }", append([]byte{0x86, byte(len(apiID))}, apiID...))
	for _, want := range []string{serverIDLine, "server s9 10.0.0.10:21000 weight 1", "server s1 10.0.0.4:21000 weight 1", "server s3 10.0.0.3:21000 weight 9", "backend up_db", "server-template s 10-12 127.0.0.1:1 disabled"} {
		if !strings.Contains(string(cfg), want) {
			t.Errorf("rendered config lacks %q:\n%s", want, cfg)
		}
	}
}

// settle runs the loop's reconcile step until no event is left: the
// results of the verifications it started are fed back as the loop does.
func settle(t *testing.T, c *Controller) {
	t.Helper()
	for {
		if err := c.reconcile(context.Background()); err != nil {
			t.Fatal(err)
		}
		c.ident.wg.Wait()
		n := 0
		for drained := false; !drained; {
			select {
			case f := <-c.events:
				f(&c.desired)
				n++
			default:
				drained = true
			}
		}
		if n == 0 {
			return
		}
	}
}

// TestWaitAuthzGeneration: the SPOE agent's hook returns once HAProxy has
// the new generation, not before; at once when HAProxy is not running.
func TestWaitAuthzGeneration(t *testing.T) {
	c, err := New(Config{Consul: api.DefaultConfig(), ProxyID: "web-sidecar-proxy", StateDir: t.TempDir(), SPOASocket: "/state/spoa.sock", Log: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	c.WaitAuthzGeneration(5) // HAProxy not running: nothing to wait for
	if d := time.Since(start); d > 100*time.Millisecond {
		t.Fatalf("waited %s with HAProxy not running", d)
	}
	c.ready.Store(true)
	returned := make(chan struct{})
	go func() { c.WaitAuthzGeneration(2); close(returned) }()
	c.authzGenerationApplied(1)
	select {
	case <-returned:
		t.Fatal("returned when HAProxy had generation 1 of 2")
	case <-time.After(50 * time.Millisecond):
	}
	c.authzGenerationApplied(2)
	select {
	case <-returned:
	case <-time.After(AuthzPublishTimeout / 2):
		t.Fatal("did not return once HAProxy had the generation")
	}
	c.WaitAuthzGeneration(1) // an older generation: already there
}

// TestAddServerOptions: a dynamic server offers the other sidecar the same
// ALPN, speaks the same fixed mux (HTTP/2 for http2 and grpc) and carries the same passive health check as the upstream's template
// slots (2.6 does not apply default-server to "add server"), and its checks
// are started.
func TestAddServerOptions(t *testing.T) {
	passive := bootstrap.PassiveCheck{MaxFailures: 5, Interval: 2 * time.Second}
	tests := []struct {
		protocol string
		passive  bootstrap.PassiveCheck
		want     []string
	}{
		{"", bootstrap.PassiveCheck{}, []string{"verify required no-ssl-reuse"}},
		{"tcp", bootstrap.PassiveCheck{}, []string{"verify required no-ssl-reuse"}},
		{"http", bootstrap.PassiveCheck{}, []string{"verify required alpn h2,http/1.1 no-ssl-reuse"}},
		{"http2", bootstrap.PassiveCheck{}, []string{"verify required alpn h2 proto h2 no-ssl-reuse"}},
		{"grpc", bootstrap.PassiveCheck{}, []string{"verify required alpn h2 proto h2 no-ssl-reuse"}},
		{"tcp", passive, []string{"verify required no-ssl-reuse check check-ssl inter 2000ms observe layer4 error-limit 5 on-error mark-down",
			"enable health up_api/s9"}},
		{"http", passive, []string{"verify required alpn h2,http/1.1 no-ssl-reuse check check-ssl inter 2000ms observe layer7 error-limit 5 on-error mark-down",
			"enable health up_api/s9"}},
		{"grpc", passive, []string{"verify required alpn h2 proto h2 no-ssl-reuse check check-ssl inter 2000ms observe layer7 error-limit 5 on-error mark-down",
			"enable health up_api/s9"}},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s/%d", tt.protocol, tt.passive.MaxFailures), func(t *testing.T) {
			u := up("api", 9191)
			u.Protocol, u.Passive = tt.protocol, tt.passive
			c := &Controller{cfg: Config{StateDir: "/s"}}
			c.applied.sidecar = *sidecar(u)
			cmds, err := c.commands("up_api", slots.Op{Kind: slots.OpAdd, Server: "s9", Addr: "10.0.0.1", Port: 80, Weight: 1})
			if err != nil {
				t.Fatal(err)
			}
			if len(cmds) != len(tt.want) {
				t.Fatalf("%d commands %v, want %d", len(cmds), cmds, len(tt.want))
			}
			for i, cmd := range cmds {
				if !strings.HasSuffix(cmd.Line, tt.want[i]) {
					t.Errorf("%q does not end with %q", cmd.Line, tt.want[i])
				}
			}
		})
	}
}

// TestWaitingFor: what the first start still lacks from Consul, named.
func TestWaitingFor(t *testing.T) {
	leaf, roots, sc := &certs.Bundle{}, &certs.Roots{}, sidecar(up("api", 9191))
	tests := []struct {
		d    desired
		want []string
	}{
		{desired{}, []string{"registration", "CA roots", "leaf certificate"}},
		{desired{sidecar: sc}, []string{"CA roots", "leaf certificate"}},
		{desired{sidecar: sc, roots: roots}, []string{"leaf certificate"}},
		{desired{roots: roots, leaf: leaf}, []string{"registration"}},
		{desired{sidecar: sc, roots: roots, leaf: leaf}, nil},
	}
	for _, tt := range tests {
		if got := tt.d.waitingFor(); !slices.Equal(got, tt.want) {
			t.Errorf("waitingFor() = %q, want %q", got, tt.want)
		}
	}
}
