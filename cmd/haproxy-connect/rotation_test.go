package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/controller"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// afterSwap is how long traffic keeps flowing, and is checked, once both
// sidecars have swapped their leaves.
const afterSwap = 10 * time.Second

// trafficStyles are the two ways a local client calls its upstream port
// in a rotation test.
var trafficStyles = []string{"new connection per call", "kept-alive connection"}

// lineApp answers every line it reads with "hello from server", on one
// connection as long as the caller keeps it.
func lineApp(t *testing.T) int {
	return testenv.ServeTCP(t, func(c net.Conn) {
		sc := bufio.NewScanner(c)
		for sc.Scan() {
			if _, err := fmt.Fprintln(c, "hello from server"); err != nil {
				return
			}
		}
	})
}

// lineCaller exchanges one line with a lineApp through port, on a new
// connection per call, or (keep) on one connection kept between calls and
// replaced after a failure.
func lineCaller(port int, keep bool) (call func() error, closeConn func()) {
	var (
		mu   sync.Mutex
		conn net.Conn
		rd   *bufio.Reader
	)
	drop := func() {
		if conn != nil {
			conn.Close()
			conn, rd = nil, nil
		}
	}
	call = func() error {
		mu.Lock()
		defer mu.Unlock()
		if conn == nil {
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 2*time.Second)
			if err != nil {
				return err
			}
			conn, rd = c, bufio.NewReader(c)
		}
		if !keep {
			defer drop()
		}
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := fmt.Fprintln(conn, "hello"); err != nil {
			drop()
			return err
		}
		line, err := rd.ReadString('\n')
		if err != nil || strings.TrimSpace(line) != "hello from server" {
			drop()
			return fmt.Errorf("answer %q: %v", line, err)
		}
		return nil
	}
	return call, func() { mu.Lock(); drop(); mu.Unlock() }
}

// startRotationMesh is the two-sidecar mesh with protocol proto, with a
// server application that answers HTTP requests or lines on kept
// connections.
func startRotationMesh(t *testing.T, opts testenv.ConsulOptions, proto string) *mesh {
	t.Helper()
	app := lineApp(t)
	if proto == "http" {
		app = httpApp(t, "server")
	}
	m := startMeshWith(t, opts, proto, app)
	// The first call may come before the client sidecar has the server's
	// endpoint.
	call, closeConn := lineCaller(m.ports[3], false)
	if proto == "http" {
		call = get200(m.ports[3])
	}
	eventually(t, 10*time.Second, "the mesh serves", call)
	closeConn()
	return m
}

// meshTraffic calls the client's upstream port in one loop per traffic
// style until stop, which reports each style's calls.
func meshTraffic(t *testing.T, m *mesh, proto string) (stop func() map[string]loadResult) {
	t.Helper()
	calls := map[string]func() error{}
	if proto == "http" {
		calls[trafficStyles[0]] = get200(m.ports[3])
		kept, _ := keptAlive(t, &http.Transport{}, fmt.Sprintf("http://127.0.0.1:%d/", m.ports[3]))
		calls[trafficStyles[1]] = func() error {
			code, err := kept()
			if err == nil && code != 200 {
				err = fmt.Errorf("status %d", code)
			}
			return err
		}
	} else {
		var closeConn func()
		calls[trafficStyles[0]], _ = lineCaller(m.ports[3], false)
		calls[trafficStyles[1]], closeConn = lineCaller(m.ports[3], true)
		t.Cleanup(closeConn)
	}
	stops := map[string]func() (int64, int64, error){}
	for style, call := range calls {
		stops[style] = load(call)
	}
	return func() map[string]loadResult {
		out := map[string]loadResult{}
		for style, stop := range stops {
			var r loadResult
			r.ok, r.failed, r.first = stop()
			out[style] = r
		}
		return out
	}
}

type loadResult struct {
	ok, failed int64
	first      error
}

// checkNoFailures fails t unless every traffic style made calls and none
// failed.
func checkNoFailures(t *testing.T, event string, results map[string]loadResult) {
	t.Helper()
	for _, style := range trafficStyles {
		r := results[style]
		t.Logf("%s, %s: %d calls ok, %d failed (first: %v)", event, style, r.ok, r.failed, r.first)
		if r.ok == 0 || r.failed > 0 {
			t.Errorf("%s, %s: %d of %d calls failed; first: %v", event, style, r.failed, r.ok+r.failed, r.first)
		}
	}
}

// rotations is a sidecar's count of run-time leaf swaps.
func (s *sidecar) rotations(t *testing.T) int {
	t.Helper()
	v, err := s.metric("haproxy_connect_leaf_rotations_total")
	if err != nil {
		t.Fatal(err)
	}
	return int(v)
}

var rotatedSerialRE = regexp.MustCompile(`leaf certificate rotated.*"serial": "([0-9a-f:]+)"`)

// lastRotated is re's first group in the last leaf swap the sidecar
// logged, "" before the first.
func (s *sidecar) lastRotated(re *regexp.Regexp) string {
	all := re.FindAllStringSubmatch(s.out.String(), -1)
	if len(all) == 0 {
		return ""
	}
	return all[len(all)-1][1]
}

// lastRotatedSerial is the serial of the last leaf the sidecar logged as
// swapped in, normalised (see normSerial).
func (s *sidecar) lastRotatedSerial() string {
	serial := s.lastRotated(rotatedSerialRE)
	if serial == "" {
		return ""
	}
	return normSerial(serial)
}

// normSerial writes a serial as upper-case hex without separators or
// leading zeros, the one form Consul's "2a:0b", HAProxy's "2A0B" and
// big.Int agree on.
func normSerial(s string) string {
	s = strings.TrimLeft(strings.ToUpper(strings.ReplaceAll(s, ":", "")), "0")
	if s == "" {
		return "0"
	}
	return s
}

// served makes one TLS handshake with the public listener at port as a
// client without a certificate, and returns the leaf it served and whether
// it asked for a client certificate.
func served(port int) (leaf *x509.Certificate, asked bool, err error) {
	conn, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port), &tls.Config{
		InsecureSkipVerify: true,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			asked = true
			return &tls.Certificate{}, nil
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			var err error
			leaf, err = x509.ParseCertificate(raw[0])
			return err
		},
	})
	if conn != nil {
		conn.Close()
	}
	if leaf == nil {
		return nil, false, fmt.Errorf("no certificate served: %v", err)
	}
	return leaf, asked, nil
}

// servesLatestLeaf is a check that the sidecar's public listener serves the
// leaf it last logged as rotated, and asks callers for their certificate.
func (s *sidecar) servesLatestLeaf(port int) func() error {
	return func() error {
		leaf, asked, err := served(port)
		if err != nil {
			return err
		}
		if !asked {
			return errors.New("the public listener asks for no client certificate")
		}
		if got, want := normSerial(leaf.SerialNumber.Text(16)), s.lastRotatedSerial(); got != want {
			return fmt.Errorf("serves serial %s, last rotated %s", got, want)
		}
		return nil
	}
}

// presentsLatestLeaf is a check that the sidecar holds, as the client
// certificate of its upstream servers, the leaf it last logged as rotated.
func (s *sidecar) presentsLatestLeaf() func() error {
	return func() error {
		info, err := s.rt.SSLCert(context.Background(), filepath.Join(s.stateDir, "leaf.pem"))
		if err != nil {
			return err
		}
		if got, want := normSerial(info.Serial), s.lastRotatedSerial(); got != want {
			return fmt.Errorf("holds serial %s, last rotated %s", got, want)
		}
		return nil
	}
}

// accessLogCerts are the client certificate serials in a server sidecar's
// access log (crt=...).
var accessLogCertRE = regexp.MustCompile(`crt=([0-9A-F]+)`)

func (s *sidecar) seenClientCert(serial string) func() error {
	return func() error {
		for _, m := range accessLogCertRE.FindAllStringSubmatch(s.out.String(), -1) {
			if normSerial(m[1]) == serial {
				return nil
			}
		}
		return fmt.Errorf("no connection with client certificate %s in the access log", serial)
	}
}

// newLeavesInUse checks, while traffic goes on, that both sidecars use the
// leaves they last swapped in: the server sidecar's public listener serves
// its own and still asks callers for theirs; the client sidecar holds its
// own as the upstream servers' client certificate, and in tcp mode, where
// every call is a new connection between the sidecars and a full handshake
// (no session of an earlier leaf is resumed, see bootstrap.Render), the
// server's access log shows it.
func newLeavesInUse(t *testing.T, m *mesh, proto string) {
	t.Helper()
	eventually(t, afterSwap, "the server sidecar serves its last leaf", m.server.servesLatestLeaf(m.ports[0]))
	eventually(t, afterSwap, "the client sidecar presents its last leaf", m.client.presentsLatestLeaf())
	if proto == "tcp" {
		eventually(t, afterSwap, "the server sidecar saw the client's new leaf", m.server.seenClientCert(m.client.lastRotatedSerial()))
	}
}

// TestLeafRotation: Consul renews both sidecars' leaves while traffic
// flows, new connections and kept-alive ones, in tcp and in http mode.
// A 100 s TTL makes the leaf live under 10 minutes (Consul backdates
// NotBefore by a minute), so Consul hands out a new leaf on every fetch:
// the sidecars swap at most one every LeafSwapInterval, without a reload.
// Each side must swap twice, then traffic goes on for afterSwap: no call
// may fail, and the public listener must serve the last leaf swapped in and
// still ask for the caller's (HAProxy 2.6 dropped that request after the
// first swap of a Consul leaf on a plain "crt" bind).
func TestLeafRotation(t *testing.T) {
	for _, proto := range []string{"tcp", "http"} {
		t.Run(proto, func(t *testing.T) {
			m := startRotationMesh(t, testenv.ConsulOptions{LeafCertTTL: "100s", SkipCAValidation: true}, proto)
			testRenewal(t, m, proto, 2, 60*time.Second)
		})
	}
}

// TestLeafRenewal is the plain renewal of a leaf with a realistic TTL (11
// minutes, so Consul renews it once, 5 to 9 minutes in). It takes about 10
// minutes, so it runs only with HC_SLOW_TESTS=1 (make test-slow).
func TestLeafRenewal(t *testing.T) {
	if os.Getenv("HC_SLOW_TESTS") != "1" {
		t.Skip("a renewal with an 11 minute TTL takes up to 10 minutes: run with HC_SLOW_TESTS=1 (make test-slow)")
	}
	for _, proto := range []string{"tcp", "http"} {
		t.Run(proto, func(t *testing.T) {
			t.Parallel()
			m := startRotationMesh(t, testenv.ConsulOptions{LeafCertTTL: "11m", SkipCAValidation: true}, proto)
			testRenewal(t, m, proto, 1, 11*time.Minute)
		})
	}
}

// testRenewal runs traffic through m until each sidecar has swapped its
// leaf swaps times (within within), and for afterSwap more, then checks
// that no call failed, nothing reloaded and the new leaves are in use.
func testRenewal(t *testing.T, m *mesh, proto string, swaps int, within time.Duration) {
	before := map[*sidecar]int{m.server: m.server.reloads(t), m.client: m.client.reloads(t)}
	stop := meshTraffic(t, m, proto)
	took := eventually(t, within, fmt.Sprintf("both sidecars swapped their leaf %d times", swaps), func() error {
		for _, s := range []*sidecar{m.server, m.client} {
			if n := s.rotations(t); n < swaps {
				return fmt.Errorf("%d swaps", n)
			}
		}
		return nil
	})
	t.Logf("both sidecars swapped %d times within %s", swaps, took)
	window := time.After(afterSwap)
	newLeavesInUse(t, m, proto)
	<-window
	checkNoFailures(t, "leaf renewal", stop())
	for s, n := range before {
		if got := s.reloads(t) - n; got != 0 {
			t.Errorf("%d reloads for leaf renewals, want 0", got)
		}
		// The storm of new leaves goes on, so a swap may be between its
		// count and its check: every check made passed, and there was one.
		if v, err := s.metric("haproxy_connect_leaf_bind_checks_total", "result", "ok"); err != nil || v < 1 {
			t.Errorf("public listener checks ok: %v (%v), want one per swap", v, err)
		}
		for _, r := range []string{"no_client_cert_request", "wrong_leaf", "unreachable"} {
			if v, err := s.metric("haproxy_connect_leaf_bind_checks_total", "result", r); err != nil || v != 0 {
				t.Errorf("public listener checks %s: %v (%v), want 0", r, v, err)
			}
		}
	}
}

// TestCARotation: Consul's CA moves to a new root (a new key type makes it
// generate and cross-sign one) while traffic flows, new connections and
// kept-alive ones, in tcp and in http mode. Each sidecar reloads once for
// the new roots (HAProxy 2.6 cannot hot-swap CA files safely) and swaps in
// its leaf re-issued under the new root; traffic goes on for afterSwap
// after both swapped, and no call fails.
func TestCARotation(t *testing.T) {
	for _, proto := range []string{"tcp", "http"} {
		t.Run(proto, func(t *testing.T) {
			m := startRotationMesh(t, testenv.ConsulOptions{}, proto)
			c := m.c
			rootsBefore, _, err := c.Agent().ConnectCARoots(nil)
			if err != nil {
				t.Fatal(err)
			}
			oldRoots := map[string]bool{}
			for _, r := range rootsBefore.Roots {
				blk, _ := pem.Decode([]byte(r.RootCertPEM))
				if blk == nil {
					t.Fatalf("root %s: no PEM", r.ID)
				}
				rc, err := x509.ParseCertificate(blk.Bytes)
				if err != nil {
					t.Fatal(err)
				}
				oldRoots[keyID(rc.SubjectKeyId)] = true
			}
			before := map[*sidecar]int{m.server: m.server.reloads(t), m.client: m.client.reloads(t)}
			swapsBefore := map[*sidecar]int{m.server: m.server.rotations(t), m.client: m.client.rotations(t)}

			stop := meshTraffic(t, m, proto)
			conf, _, err := c.Connect().CAGetConfig(nil)
			if err != nil {
				t.Fatal(err)
			}
			conf.Config["PrivateKeyType"] = "rsa"
			conf.Config["PrivateKeyBits"] = 2048
			if _, err := c.Connect().CASetConfig(conf, nil); err != nil {
				t.Fatal(err)
			}
			eventually(t, 30*time.Second, "both sidecars reloaded for the new roots and swapped in a new leaf", func() error {
				for s, n := range before {
					if s.reloads(t) <= n {
						return errors.New("not reloaded yet")
					}
					if s.rotations(t) <= swapsBefore[s] {
						return errors.New("no leaf swapped yet")
					}
				}
				return nil
			})
			window := time.After(afterSwap)
			newLeavesInUse(t, m, proto)
			// The leaf served by the server sidecar is signed by the new
			// root.
			leaf, _, err := served(m.ports[0])
			if err != nil {
				t.Fatal(err)
			}
			if oldRoots[keyID(leaf.AuthorityKeyId)] {
				t.Errorf("the server sidecar's leaf is still issued under an old root")
			}
			<-window
			// No failure is tolerated in tcp mode either: a connection
			// the old server worker accepted just before the reload
			// stopped it is allowed from the worker's remembered verdict
			// for the client's certificate (see bootstrap.Render), where
			// HAProxy 2.6's SPOE, in a stopping worker, failed it.
			checkNoFailures(t, "CA rotation", stop())
			for s, n := range before {
				if got := s.reloads(t) - n; got != 1 {
					t.Errorf("%d reloads for one CA rotation, want 1", got)
				}
				if !strings.Contains(s.out.String(), "CA roots changed") {
					t.Errorf("the reload reason is not logged")
				}
			}
		})
	}
}

// keyID formats a key identifier as colon-separated lower-case hex.
func keyID(b []byte) string {
	parts := make([]string, len(b))
	for i, x := range b {
		parts[i] = fmt.Sprintf("%02x", x)
	}
	return strings.Join(parts, ":")
}

// TestTCPRemembersAllowsUntilIntentionsChange: a tcp listener asks the SPOE
// agent about a client certificate once per intentions generation; later
// connections with it are allowed by HAProxy itself, and their access log
// lines still name the caller, from the sources map the controller fills
// from the agent's allows (a tcp rule cannot write a map on 2.6). Cleared
// (the controller's prune), the next connection asks the agent once and
// the name comes back. A deny still reaches the next new connection: the
// intentions change moves the generation, which makes the remembered allow
// stale.
func TestTCPRemembersAllowsUntilIntentionsChange(t *testing.T) {
	// No intentions and no ACLs: Consul's default allows.
	m := startRotationMesh(t, testenv.ConsulOptions{}, "tcp")
	call, _ := lineCaller(m.ports[3], false)
	if err := call(); err != nil {
		t.Fatal(err)
	}
	decisions := func() float64 {
		v, err := m.server.metric("haproxy_connect_authz_decisions_total", "result", "allow")
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	roots, _, err := m.c.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	client := "spiffe://" + roots.TrustDomain + "/ns/default/dc/dc1/svc/client"
	sources := filepath.Join(m.server.stateDir, controller.SourcesMapFile)
	named := func() error {
		e, err := m.server.rt.Map(context.Background(), sources)
		switch {
		case err != nil:
			return err
		case len(e) != 1 || len(e[0].Key) != 64 || e[0].Value != client:
			return fmt.Errorf("sources map %v, want one entry naming %s", e, client)
		}
		return nil
	}
	// What an operator sees with socat: the certificate's SHA-256 and the
	// caller, added by the controller after the agent's allow.
	eventually(t, 5*time.Second, "the sources map names the client", named)
	before := decisions()
	lines := strings.Count(m.server.out.String(), " src="+client+" ")
	for range 50 {
		if err := call(); err != nil {
			t.Fatalf("an allowed call failed: %v", err)
		}
	}
	if after := decisions(); after != before {
		t.Errorf("the agent was asked %v more times for 50 connections with a remembered allow, want 0", after-before)
	}
	// A tcp connection's line is written when it ends.
	eventually(t, 5*time.Second, "50 more access log lines name the caller", func() error {
		if n := strings.Count(m.server.out.String(), " src="+client+" ") - lines; n < 50 {
			return fmt.Errorf("%d", n)
		}
		return nil
	})
	if strings.Contains(m.server.out.String(), "src=cached") || strings.Contains(m.server.out.String(), "src=- ") {
		t.Errorf("an access log line without the caller:\n%s", m.server.out.String())
	}
	clear, err := runtime.ClearMap(sources)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.server.rt.Exec(context.Background(), clear); err != nil {
		t.Fatal(err)
	}
	before = decisions()
	if err := call(); err != nil {
		t.Fatalf("a call after the sources map was cleared: %v", err)
	}
	if after := decisions(); after != before+1 {
		t.Errorf("the agent was asked %v times for a certificate missing from the sources map, want 1", after-before)
	}
	eventually(t, 5*time.Second, "the sources map names the client again", named)
	index := intention(t, m.c, "client", "server", api.IntentionActionDeny)
	eventually(t, 10*time.Second, "the server sidecar sees the deny", m.server.sawIntentions(index))
	eventually(t, 10*time.Second, "a new connection is refused", func() error {
		if err := call(); err == nil {
			return errors.New("still allowed")
		}
		return nil
	})
	for range 20 {
		if err := call(); err == nil {
			t.Fatal("a new connection was allowed after the deny")
		}
	}
}

var rotatedNotAfterRE = regexp.MustCompile(`leaf certificate rotated.*"not_after": "([^"]+)"`)

// lastLeafExpiry is when the last leaf the sidecar logged as swapped in
// expires.
func (s *sidecar) lastLeafExpiry(t *testing.T) time.Time {
	t.Helper()
	at, err := time.Parse(time.RFC3339Nano, s.lastRotated(rotatedNotAfterRE))
	if err != nil {
		t.Fatalf("the last leaf swap's expiry: %v", err)
	}
	return at
}

// TestExpiredLeafKeepsConnections: connections the server sidecar accepted
// with a leaf of the client's that has expired since (the client renewed
// it meanwhile) are not refused when the server decides again, after an
// intentions change: in tcp mode the kept-alive connection stays open, in
// http mode the client sidecar's pooled connection keeps serving. The
// leaf's validity is HAProxy's to check, at the handshake; a decision
// after it is about the identity. Before that rule, the tcp connection was
// closed and the pooled one answered 403 to every request. The subtests
// run in parallel: each waits about 40 s for a leaf to expire.
func TestExpiredLeafKeepsConnections(t *testing.T) {
	for _, proto := range []string{"tcp", "http"} {
		t.Run(proto, func(t *testing.T) {
			t.Parallel()
			m := startRotationMesh(t, testenv.ConsulOptions{LeafCertTTL: "100s", SkipCAValidation: true}, proto)
			stop := meshTraffic(t, m, proto)
			// Every leaf the client held when its kept-alive connections
			// were made expires by then.
			eventually(t, 10*time.Second, "the client sidecar swapped its leaf", func() error {
				if m.client.rotations(t) < 1 {
					return errors.New("no swap yet")
				}
				return nil
			})
			expired := m.client.lastLeafExpiry(t).Add(time.Second)
			t.Logf("waiting for the client's leaves of the first connections to expire at %s", expired.Format(time.RFC3339))
			time.Sleep(time.Until(expired)) // the event is the clock passing the expiry
			index := intention(t, m.c, "client", "server", api.IntentionActionAllow)
			eventually(t, 10*time.Second, "the server sidecar sees the intentions change", m.server.sawIntentions(index))
			// Traffic goes on for a while after the change reached the
			// server sidecar.
			<-time.After(afterSwap / 2)
			checkNoFailures(t, "an intentions change after the first leaves expired", stop())
		})
	}
}
