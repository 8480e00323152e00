package runtime_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/slots"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// skeleton is a rendered sidecar config on real files, running in HAProxy.
type skeleton struct {
	dir      string
	h        *testenv.HAProxyProc
	rt       *runtime.Client
	ca       *testenv.CA
	spec     bootstrap.Spec
	upPort   int
	pubPort  int
	leafFile string
}

func startSkeleton(t *testing.T, edit ...func(*bootstrap.Spec)) *skeleton {
	t.Helper()
	dir := testenv.ShortTempDir(t)
	ca := testenv.NewCA(t, "root")
	cert, key := ca.Leaf(t, "spiffe://t.consul/ns/default/dc/dc1/svc/web")
	leaf := testenv.WriteFile(t, dir, "leaf.pem", cert+key)
	roots := testenv.WriteFile(t, dir, "roots.pem", ca.CertPEM)
	ports := testenv.FreePorts(t, 4)
	name, _ := bootstrap.UpstreamName("api", "")
	spec := bootstrap.Spec{
		Service: "web", LeafFile: leaf, RootsFile: roots, SPOEFile: filepath.Join(dir, "spoe.cfg"), AuthzMap: filepath.Join(dir, "authz.map"),
		CrtList: filepath.Join(dir, "public.crtlist"), SNI: "web.default.dc1.internal.t.consul",
		SPOASocket: filepath.Join(dir, "spoa.sock"), HardStopAfter: 5 * time.Second,
		Public: bootstrap.Public{BindAddr: "127.0.0.1", BindPort: ports[1], LocalAddr: "127.0.0.1", LocalPort: ports[2]},
		Upstreams: []bootstrap.Upstream{{Name: name, Destination: "api", BindAddr: "127.0.0.1", BindPort: ports[3],
			Slots: slots.New(name, bootstrap.SlotPrefix, 2)}},
	}
	for _, e := range edit {
		e(&spec)
	}
	cfg, files, err := bootstrap.RenderFiles(spec, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		testenv.WriteFile(t, filepath.Dir(f.Path), filepath.Base(f.Path), f.Content)
	}
	h, err := testenv.StartHAProxy(t, dir, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return &skeleton{dir: dir, h: h, rt: runtime.New(h.MasterSock, zaptest.NewLogger(t)), ca: ca, spec: spec,
		upPort: ports[3], pubPort: ports[1], leafFile: leaf}
}

// renderEndpoint writes the skeleton's configuration with the upstream's
// slot table serving 127.0.0.1:port, for the next reload to load.
// It returns the configuration.
func (sk *skeleton) renderEndpoint(t *testing.T, port int) string {
	t.Helper()
	_, table, _ := slots.Plan(sk.spec.Upstreams[0].Slots, []slots.Endpoint{{Addr: "127.0.0.1", Port: port, Weight: 1}})
	sk.spec.Upstreams[0].Slots = table
	cfg, err := bootstrap.Render(sk.spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(sk.h.ConfigPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return cfg
}

// tlsEcho is an upstream endpoint: a TLS server requiring a client
// certificate from the CA, answering each connection with its name and the
// URI SAN of the client certificate it saw.
func tlsEcho(t *testing.T, ca *testenv.CA, name string) (port int) {
	t.Helper()
	cert, key := ca.Leaf(t, "spiffe://t.consul/ns/default/dc/dc1/svc/api")
	kp, err := tls.X509KeyPair([]byte(cert), []byte(key))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	cfg := &tls.Config{Certificates: []tls.Certificate{kp}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert}
	return testenv.ServeTCP(t, func(c net.Conn) {
		tc := tls.Server(c, cfg)
		if err := tc.Handshake(); err != nil {
			return
		}
		peer := tc.ConnectionState().PeerCertificates[0]
		fmt.Fprintf(tc, "%s %s %s\n", name, peer.URIs[0], peer.SerialNumber)
	})
}

// call connects to the upstream's local port and returns the line the
// endpoint answered, or an error.
func call(port int) (string, error) {
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(line), nil
}

// callWithin is call with a deadline of d for the answer.
func callWithin(port int, d time.Duration) (string, error) {
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), d)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(d))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(line), nil
}

func mustExec(t *testing.T, rt *runtime.Client, cmds ...runtime.Command) {
	t.Helper()
	rs, err := rt.Exec(context.Background(), cmds...)
	if err != nil {
		t.Fatal(err)
	}
	if err := rs.Err(); err != nil {
		t.Fatal(err)
	}
}

func must(t *testing.T) func(runtime.Command, error) runtime.Command {
	return func(c runtime.Command, err error) runtime.Command {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
}

func TestSlotTrafficAndMaint(t *testing.T) {
	sk := startSkeleton(t)
	m := must(t)
	port := tlsEcho(t, sk.ca, "ep1")
	if _, err := call(sk.upPort); err == nil {
		t.Fatal("a backend with only parked slots served a connection")
	}
	mustExec(t, sk.rt,
		m(runtime.SetServerAddr("up_api", "s1", "127.0.0.1", port)),
		m(runtime.SetServerState("up_api", "s1", runtime.StateReady)))
	got, err := call(sk.upPort)
	if err != nil || !strings.HasPrefix(got, "ep1 spiffe://t.consul/ns/default/dc/dc1/svc/web") {
		t.Fatalf("through slot s1: %q, %v", got, err)
	}
	st, err := sk.rt.ServersState(context.Background(), "up_api")
	if err != nil {
		t.Fatal(err)
	}
	if st[0].Addr != "127.0.0.1" || st[0].Port != port || st[0].Maint() || !st[1].Maint() {
		t.Fatalf("servers state after enabling s1: %+v", st)
	}
	mustExec(t, sk.rt, m(runtime.SetServerState("up_api", "s1", runtime.StateMaint)))
	if got, err := call(sk.upPort); err == nil {
		t.Fatalf("slot in maint still served: %q", got)
	}
}

func TestAddServerBeyondTemplate(t *testing.T) {
	sk := startSkeleton(t)
	m := must(t)
	port := tlsEcho(t, sk.ca, "dyn")
	opts := runtime.ServerOptions{Weight: 1, SSL: true, CrtFile: sk.leafFile, CAFile: sk.spec.RootsFile, NoSSLReuse: true}
	// Added in maintenance (the default), it serves once ready.
	mustExec(t, sk.rt,
		m(runtime.AddServer("up_api", "s3", "127.0.0.1", port, opts)),
		m(runtime.SetServerState("up_api", "s3", runtime.StateReady)))
	if got, err := call(sk.upPort); err != nil || !strings.HasPrefix(got, "dyn ") {
		t.Fatalf("through dynamic server: %q, %v", got, err)
	}
	_, err := sk.rt.Do(context.Background(), m(runtime.AddServer("up_api", "s3", "127.0.0.1", port, opts)))
	if !errors.Is(err, runtime.ErrServerExists) {
		t.Fatalf("second add: %v, want ErrServerExists", err)
	}
}

// TestAddServerPassiveCheck: a dynamic server carries the upstream's
// passive health check, as a template slot does: once its checks are
// enabled, a live endpoint passes them and a dead one is marked down and
// takes no traffic.
func TestAddServerPassiveCheck(t *testing.T) {
	sk := startSkeleton(t, func(s *bootstrap.Spec) {
		s.Upstreams[0].Passive = bootstrap.PassiveCheck{MaxFailures: 2, Interval: 100 * time.Millisecond}
	})
	m := must(t)
	live := tlsEcho(t, sk.ca, "live")
	dead := testenv.FreePorts(t, 1)[0]
	opts := runtime.ServerOptions{Weight: 1, SSL: true, CrtFile: sk.leafFile, CAFile: sk.spec.RootsFile, NoSSLReuse: true,
		Passive: runtime.PassiveCheck{Inter: 100 * time.Millisecond, ErrorLimit: 2}}
	var cmds []runtime.Command
	for _, s := range []struct {
		name string
		port int
	}{{"s3", live}, {"s4", dead}} {
		add, err := runtime.SlotCommands("up_api", slots.Op{Kind: slots.OpAdd, Server: s.name, Addr: "127.0.0.1", Port: s.port, Weight: 1}, opts)
		if err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, add...)
		cmds = append(cmds, m(runtime.SetServerState("up_api", s.name, runtime.StateReady)))
	}
	mustExec(t, sk.rt, cmds...)
	// A template slot at the same live endpoint, for its check's result.
	mustExec(t, sk.rt,
		m(runtime.SetServerAddr("up_api", "s1", "127.0.0.1", live)),
		m(runtime.SetServerState("up_api", "s1", runtime.StateReady)))
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := sk.rt.ServerStats(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		by := map[string]runtime.ServerStat{}
		for _, s := range st {
			by[s.Server] = s
		}
		s1, s3, s4 := by["s1"], by["s3"], by["s4"]
		if s1.CheckStatus != "" && s3.CheckStatus == s1.CheckStatus && s3.Status == "UP" && s4.Status == "DOWN" {
			t.Logf("template slot %s %s, dynamic servers %s %s and %s %s", s1.Status, s1.CheckStatus, s3.Status, s3.CheckStatus, s4.Status, s4.CheckStatus)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("checks: template slot %+v, live dynamic %+v, dead dynamic %+v", s1, s3, s4)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for i := range 20 {
		if got, err := call(sk.upPort); err != nil || !strings.HasPrefix(got, "live ") {
			t.Fatalf("call %d with the dead endpoint marked down: %q, %v", i, got, err)
		}
	}
}

func TestErrorsAreGoErrors(t *testing.T) {
	sk := startSkeleton(t)
	m := must(t)
	ctx := context.Background()
	rs, err := sk.rt.Exec(ctx,
		m(runtime.SetServerState("up_api", "s9", runtime.StateReady)),
		m(runtime.SetServerState("up_nope", "s1", runtime.StateReady)),
		m(runtime.SetServerWeight("up_api", "s1", 7)),
		m(runtime.SetSSLCert("/nonexistent.pem", "x")),
		runtime.Command{Target: "@1", Line: "frobnicate"},
		runtime.Command{Target: "@77", Line: "show info"},
		m(runtime.SetServerWeight("up_api", "s2", 3)),
	)
	if err != nil {
		t.Fatal(err)
	}
	want := []error{runtime.ErrNoSuchServer, runtime.ErrNoSuchBackend, nil, runtime.ErrCertNotReferenced,
		runtime.ErrUnknownCommand, runtime.ErrNoSuchProcess, runtime.ErrNotExecuted}
	for i, w := range want {
		if w == nil && rs[i].Err != nil || w != nil && !errors.Is(rs[i].Err, w) {
			t.Errorf("%s: got %v, want %v", rs[i].Command, rs[i].Err, w)
		}
	}
	// The master is still fine after a routing error.
	if _, err := sk.rt.Procs(ctx); err != nil {
		t.Fatal(err)
	}
}

func peerSerial(t *testing.T, port int) string {
	t.Helper()
	c, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port), &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0].SerialNumber.String()
}

func TestCertRotationWithoutReload(t *testing.T) {
	sk := startSkeleton(t)
	m := must(t)
	ctx := context.Background()
	port := tlsEcho(t, sk.ca, "ep")
	mustExec(t, sk.rt,
		m(runtime.SetServerAddr("up_api", "s1", "127.0.0.1", port)),
		m(runtime.SetServerState("up_api", "s1", runtime.StateReady)))
	before, _ := call(sk.upPort)
	pubBefore := peerSerial(t, sk.pubPort)
	procsBefore, err := sk.rt.Procs(ctx)
	if err != nil {
		t.Fatal(err)
	}

	cert, key := sk.ca.Leaf(t, "spiffe://t.consul/ns/default/dc/dc1/svc/web")
	if err := sk.rt.UpdateCert(ctx, sk.leafFile, cert+"\n\n"+key); err != nil {
		t.Fatal(err)
	}
	info, err := sk.rt.SSLCert(ctx, sk.leafFile)
	if err != nil {
		t.Fatal(err)
	}
	pubAfter := peerSerial(t, sk.pubPort)
	after, err := call(sk.upPort)
	if err != nil {
		t.Fatal(err)
	}
	if pubAfter == pubBefore {
		t.Errorf("public listener still serves serial %s", pubBefore)
	}
	if f := strings.Fields(after); len(f) != 3 || f[2] == strings.Fields(before)[2] || f[2] != pubAfter {
		t.Errorf("upstream saw client cert %q before, %q after; want new serial %s", before, after, pubAfter)
	}
	if info.Serial == "" || info.Filename != sk.leafFile {
		t.Errorf("show ssl cert: %+v", info)
	}
	procsAfter, _ := sk.rt.Procs(ctx)
	if procsAfter.Master.Reloads != procsBefore.Master.Reloads {
		t.Errorf("certificate rotation reloaded haproxy")
	}
	if err := sk.rt.UpdateCert(ctx, sk.leafFile, "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n"); !errors.Is(err, runtime.ErrBadCertificate) {
		t.Errorf("garbage certificate: %v, want ErrBadCertificate", err)
	}
	if peerSerial(t, sk.pubPort) != pubAfter {
		t.Errorf("a rejected certificate changed what is served")
	}
}

func TestReloadKeepsServing(t *testing.T) {
	sk := startSkeleton(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	port := tlsEcho(t, sk.ca, "ep")
	// Render the assignment into the config, as the controller does before a reload.
	cfg := sk.renderEndpoint(t, port)

	// A client calls in a loop across the reload; every call must succeed.
	var wg sync.WaitGroup
	stop := make(chan struct{})
	var failures []error
	var calls int
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			// The first calls may precede the reload, when the slot is parked.
			if _, err := call(sk.upPort); err != nil && calls > 0 {
				failures = append(failures, err)
			} else if err == nil {
				calls++
			}
		}
	}()
	time.Sleep(50 * time.Millisecond)
	before, _ := sk.rt.Procs(ctx)
	after, err := sk.rt.Reload(ctx, "test")
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wg.Wait()
	bcur, _ := before.Current()
	acur, _ := after.Current()
	if acur.PID == bcur.PID || after.Master.Reloads != before.Master.Reloads+1 {
		t.Errorf("reload not visible in show proc: before %+v after %+v", before, after)
	}
	if calls == 0 || len(failures) > 0 {
		t.Errorf("%d calls succeeded, %d failed across the reload: %v", calls, len(failures), failures)
	}
	// A broken config: the reload fails, the old worker keeps serving.
	if err := os.WriteFile(sk.h.ConfigPath, []byte(cfg+"\n    bogus-keyword\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := sk.rt.Reload(ctx, "broken config"); !errors.Is(err, runtime.ErrReloadFailed) {
		t.Fatalf("reload with a broken config: %v, want ErrReloadFailed", err)
	}
	if got, err := call(sk.upPort); err != nil {
		t.Errorf("after a failed reload: %q, %v", got, err)
	}
}

// TestReloadStormRefusesNoConnection: ten reloads back to back while eight
// clients connect to an upstream's port in a loop, each call a new
// connection. Not one connection is refused or fails: in master-worker
// mode HAProxy 2.6's master starts each new worker with "-x
// sockpair@<fd>" of the current one (mworker_reexec, src/haproxy.c), so
// the new worker takes over the listening sockets instead of binding new
// ones, and no SYN meets a closed port. The old workers, whose
// connections all end, leave show proc. (On 2.6.12 some of them leave
// with a segfault, in deinit after their last connection: haproxy GH
// #2114, see HAPROXY26.md. The calls do not notice.)
func TestReloadStormRefusesNoConnection(t *testing.T) {
	sk := startSkeleton(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	port := tlsEcho(t, sk.ca, "ep")
	sk.renderEndpoint(t, port)
	// The first reload puts the endpoint in service; the storm follows.
	if _, err := sk.rt.Reload(ctx, "endpoint"); err != nil {
		t.Fatal(err)
	}
	if _, err := call(sk.upPort); err != nil {
		t.Fatalf("the endpoint does not serve: %v", err)
	}

	var (
		mu       sync.Mutex
		calls    int
		failures []error
		wg       sync.WaitGroup
	)
	stop := make(chan struct{})
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				// A long deadline: on a loaded machine the endpoint's
				// handshake can take seconds; no answer in 10 s is a
				// stalled connection.
				_, err := callWithin(sk.upPort, 10*time.Second)
				mu.Lock()
				calls++
				if err != nil {
					failures = append(failures, err)
				}
				mu.Unlock()
			}
		}()
	}
	const reloads = 10
	for i := range reloads {
		if _, err := sk.rt.Reload(ctx, fmt.Sprintf("storm %d", i+1)); err != nil {
			close(stop)
			wg.Wait()
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	t.Logf("%d reloads: %d calls, %d failed", reloads, calls, len(failures))
	if calls == 0 || len(failures) > 0 {
		t.Errorf("%d of %d calls failed across %d reloads; first: %v", len(failures), calls, reloads, failures[:min(len(failures), 1)])
	}
	deadline := time.Now().Add(sk.spec.HardStopAfter + 5*time.Second)
	for {
		pl, err := sk.rt.Procs(ctx)
		if err == nil && len(pl.Workers) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("old workers still there: %+v (%v)", pl.Workers, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestKeptSessions: batches reuse a kept prompt-mode session; one closed
// under the client by a reload (done by another client, as an operator
// would with socat) is replaced without an error; concurrent batches on one
// client each get their own replies.
func TestKeptSessions(t *testing.T) {
	sk := startSkeleton(t)
	m := must(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	mustExec(t, sk.rt, m(runtime.SetServerWeight("up_api", "s1", 3)))
	before, err := sk.rt.Procs(ctx)
	if err != nil {
		t.Fatal(err)
	}

	other := runtime.New(sk.h.MasterSock, zaptest.NewLogger(t))
	defer other.Close()
	if _, err := other.Reload(ctx, "operator"); err != nil {
		t.Fatal(err)
	}
	// sk.rt's kept session was closed by the master's re-execution.
	after, err := sk.rt.Procs(ctx)
	if err != nil {
		t.Fatalf("first batch after a reload elsewhere: %v", err)
	}
	if after.Master.Reloads != before.Master.Reloads+1 {
		t.Errorf("reloads %d, want %d", after.Master.Reloads, before.Master.Reloads+1)
	}

	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			server := fmt.Sprintf("s%d", i%2+1)
			for w := 1; w <= 20; w++ {
				weight := (i*20+w)%200 + 1
				cmd := m(runtime.SetServerWeight("up_api", server, weight))
				show := m(runtime.ShowServersState("up_api"))
				rs, err := sk.rt.Exec(ctx, cmd, show)
				if err != nil {
					errs <- err
					return
				}
				if err := rs.Err(); err != nil {
					errs <- err
					return
				}
				st, err := runtime.ParseServersState(rs[1].Reply)
				if err != nil || len(st) != 2 {
					errs <- fmt.Errorf("batch %d/%d: show servers state: %v, %d servers", i, w, err, len(st))
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// handshake connects to a TLS listener without a client certificate and
// reports whether the listener asked for one, and the serial it served.
func handshake(t *testing.T, port int, sni string) (asked bool, serial string) {
	t.Helper()
	c, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port), &tls.Config{
		InsecureSkipVerify: true,
		ServerName:         sni,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			asked = true
			return &tls.Certificate{}, nil
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if p, err := x509.ParseCertificate(raw[0]); err == nil {
				serial = p.SerialNumber.String()
			}
			return nil
		},
	})
	if err == nil {
		c.Close()
	}
	if serial == "" {
		t.Fatalf("no handshake with 127.0.0.1:%d: %v", port, err)
	}
	return asked, serial
}

// TestLeafSwapKeepsClientCertRequest: after "set ssl cert" + "commit ssl
// cert" of a Consul-shaped leaf (empty subject, a URI SAN only), the public
// listener as rendered (a crt-list line with an SNI filter) serves the new
// leaf and still asks every client for its certificate, with the service's
// SNI, another or none. The same swap on a plain "crt" bind loses the
// request on HAProxy 2.6 (see bootstrap.RenderCrtList for why); that case
// is asserted on 2.6 only, where the mechanism was read.
func TestLeafSwapKeepsClientCertRequest(t *testing.T) {
	for _, tt := range []struct {
		name     string
		plainCrt bool
	}{{"rendered crt-list", false}, {"plain crt", true}} {
		t.Run(tt.name, func(t *testing.T) {
			sk := startSkeleton(t)
			if tt.plainCrt {
				cfg, err := bootstrap.Render(sk.spec)
				if err != nil {
					t.Fatal(err)
				}
				cfg = strings.Replace(cfg, "ssl crt-list "+sk.spec.CrtList, "ssl crt "+sk.leafFile, 1)
				testenv.WriteFile(t, sk.dir, "haproxy.cfg", cfg)
				if _, err := sk.rt.Reload(context.Background(), "plain crt bind"); err != nil {
					t.Fatal(err)
				}
			}
			names := []string{"", sk.spec.SNI, "other.example"}
			for _, sni := range names {
				if asked, _ := handshake(t, sk.pubPort, sni); !asked {
					t.Fatalf("before the swap, SNI %q: no client certificate request", sni)
				}
			}
			cert, key := sk.ca.Leaf(t, "spiffe://t.consul/ns/default/dc/dc1/svc/web")
			if err := sk.rt.UpdateCert(context.Background(), sk.leafFile, cert+key); err != nil {
				t.Fatal(err)
			}
			p, _ := pem.Decode([]byte(cert))
			leaf, err := x509.ParseCertificate(p.Bytes)
			if err != nil {
				t.Fatal(err)
			}
			for _, sni := range names {
				asked, serial := handshake(t, sk.pubPort, sni)
				if serial != leaf.SerialNumber.String() {
					t.Errorf("SNI %q: serial %s served, want the new %s", sni, serial, leaf.SerialNumber)
				}
				switch {
				case !tt.plainCrt && !asked:
					t.Errorf("SNI %q: no client certificate request after the swap", sni)
				case tt.plainCrt && asked && haproxy26(t):
					t.Errorf("SNI %q: HAProxy 2.6 kept the request on a plain crt bind; the reason for the crt-list is gone", sni)
				}
			}
		})
	}
}

// haproxy26 reports whether the HAProxy under test is a 2.6 release.
func haproxy26(t *testing.T) bool {
	out, err := exec.Command(testenv.HAProxyBin(t), "-v").Output()
	if err != nil {
		t.Fatal(err)
	}
	return strings.HasPrefix(string(out), "HAProxy version 2.6.")
}

// TestFindMaster: a master started with StartMaster is found again through
// its pid file and socket, outlives nothing but Stop, and a pid file that
// names a dead process or another program finds none.
func TestFindMaster(t *testing.T) {
	dir := testenv.ShortTempDir(t)
	cfg := testenv.WriteFile(t, dir, "haproxy.cfg", "global\n    master-worker\ndefaults\n    mode tcp\n    timeout connect 1s\n    timeout client 5s\n    timeout server 5s\n"+
		fmt.Sprintf("frontend f\n    bind 127.0.0.1:%d\n", testenv.FreePort(t)))
	sock, pidFile := filepath.Join(dir, "master.sock"), filepath.Join(dir, "haproxy.pid")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	m, err := runtime.StartMaster(ctx, testenv.HAProxyBin(t), cfg, sock, pidFile, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { runtime.Kill(m.PID()) })

	found, pl, err := runtime.FindMaster(ctx, sock, pidFile)
	if err != nil {
		t.Fatal(err)
	}
	if found.PID() != m.PID() || pl.Master.PID != m.PID() || !found.Adopted() || m.Adopted() {
		t.Fatalf("found master %d (adopted %v), started %d, show proc %d", found.PID(), found.Adopted(), m.PID(), pl.Master.PID)
	}
	if _, ok := pl.Current(); !ok {
		t.Errorf("no current worker in %+v", pl)
	}

	other := filepath.Join(dir, "other.pid")
	for name, content := range map[string]string{
		"this test's own PID": fmt.Sprint(os.Getpid()),
		"a PID that exited":   "999999",
		"garbage":             "12ab\n",
	} {
		testenv.WriteFile(t, dir, "other.pid", content)
		if _, _, err := runtime.FindMaster(ctx, sock, other); !errors.Is(err, runtime.ErrNoMaster) {
			t.Errorf("%s: %v, want ErrNoMaster", name, err)
		}
	}
	if _, _, err := runtime.FindMaster(ctx, sock, filepath.Join(dir, "missing.pid")); !errors.Is(err, runtime.ErrNoMaster) {
		t.Errorf("no pid file: %v, want ErrNoMaster", err)
	}

	// The adopted handle sees the master go (it is not this process's
	// child: it polls).
	if err := m.Stop(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	select {
	case <-found.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the adopted handle did not see the master exit")
	}
	if _, _, err := runtime.FindMaster(ctx, sock, pidFile); !errors.Is(err, runtime.ErrNoMaster) {
		t.Errorf("after Stop: %v, want ErrNoMaster", err)
	}
}
