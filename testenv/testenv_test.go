package testenv

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

func TestModuleRoot(t *testing.T) {
	root, err := ModuleRoot()
	if err != nil {
		t.Fatalf("ModuleRoot: %v", err)
	}
	if !isOurGoMod(filepath.Join(root, "go.mod")) {
		t.Fatalf("ModuleRoot = %s, which has no go.mod of %s", root, modulePath)
	}
}

// recordingTB records Skipf/Fatalf instead of ending the test.
type recordingTB struct {
	testing.TB
	skipped, fatal string
}

func (r *recordingTB) Helper() {}
func (r *recordingTB) Skipf(format string, args ...any) {
	r.skipped = fmt.Sprintf(format, args...)
}
func (r *recordingTB) Fatalf(format string, args ...any) {
	r.fatal = fmt.Sprintf(format, args...)
}

func TestFindBinMissing(t *testing.T) {
	const want = "testenv-no-such-bin not found (set TESTENV_NO_SUCH_BIN or run make deps)"

	t.Setenv("CI", "")
	r := &recordingTB{TB: t}
	findBin(r, "testenv-no-such-bin", "TESTENV_NO_SUCH_BIN")
	if r.skipped != want || r.fatal != "" {
		t.Errorf("outside CI: skipped=%q fatal=%q, want skip %q", r.skipped, r.fatal, want)
	}

	t.Setenv("CI", "true")
	r = &recordingTB{TB: t}
	findBin(r, "testenv-no-such-bin", "TESTENV_NO_SUCH_BIN")
	if r.fatal != want || r.skipped != "" {
		t.Errorf("in CI: skipped=%q fatal=%q, want fatal %q", r.skipped, r.fatal, want)
	}
}

func TestFindBinEnv(t *testing.T) {
	t.Setenv("TESTENV_SH_BIN", "/bin/sh")
	if got := findBin(t, "testenv-no-such-bin", "TESTENV_SH_BIN"); got != "/bin/sh" {
		t.Fatalf("findBin = %q, want /bin/sh from the env var", got)
	}
}

func TestFreePorts(t *testing.T) {
	ports := FreePorts(t, 5)
	seen := map[int]bool{}
	for _, p := range ports {
		if p <= 0 || p > 65535 || seen[p] {
			t.Fatalf("bad or duplicate port %d in %v", p, ports)
		}
		seen[p] = true
	}
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(FreePort(t))))
	if err != nil {
		t.Fatalf("listen on free port: %v", err)
	}
	l.Close()
}

func TestShortTempDir(t *testing.T) {
	dir := ShortTempDir(t)
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		t.Fatalf("ShortTempDir %s: not a dir (%v)", dir, err)
	}
	// Leaves room for a socket name within the 108-byte limit.
	if len(dir) > 40 {
		t.Fatalf("ShortTempDir %s is %d bytes long", dir, len(dir))
	}
}

// assertGroupGone checks that no process of the group led by pid is left.
// Killed orphans linger as zombies until init reaps them, hence the wait.
func assertGroupGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		err := syscall.Kill(-pid, 0)
		if errors.Is(err, syscall.ESRCH) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process group %d still has processes (kill 0: %v)", pid, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

const testHAProxyConfig = `global
  log stderr format raw local0 info

defaults
  mode tcp
  timeout connect 1s
  timeout client 5s
  timeout server 5s

frontend fe
  bind 127.0.0.1:%d
  default_backend be

backend be
  balance roundrobin
  server-template s 1-2 127.0.0.1:1 disabled
`

func TestHAProxy(t *testing.T) {
	t.Parallel()
	port := FreePort(t)
	h := HAProxy(t, fmt.Sprintf(testHAProxyConfig, port))

	out, err := h.MasterCommand("show proc")
	if err != nil {
		t.Fatalf("show proc: %v", err)
	}
	if !strings.Contains(out, "master") || !hasWorker(out) {
		t.Fatalf("show proc lacks master or worker:\n%s", out)
	}

	out, err = h.MasterCommand("@1 show servers state")
	if err != nil {
		t.Fatalf("@1 show servers state: %v", err)
	}
	for _, srv := range []string{" be 1 s1 127.0.0.1 ", " be 2 s2 127.0.0.1 "} {
		if !strings.Contains(out, srv) {
			t.Errorf("show servers state lacks %q:\n%s", srv, out)
		}
	}

	conn, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), time.Second)
	if err != nil {
		t.Fatalf("dial frontend: %v", err)
	}
	conn.Close()

	h.Stop()
	h.Stop() // idempotent
	select {
	case <-h.Exited():
	default:
		t.Fatal("haproxy master still running after Stop")
	}
	assertGroupGone(t, h.PID())
	if _, err := os.Stat(h.MasterSock); err == nil {
		if _, err := h.MasterCommand("show proc"); err == nil {
			t.Fatal("master socket still answers after Stop")
		}
	}
}

func TestHAProxyBadConfig(t *testing.T) {
	t.Parallel()
	start := time.Now()
	h, err := StartHAProxy(t, ShortTempDir(t), "frontend fe\n  bind 127.0.0.1:1\n  no-such-keyword 42\n")
	if err == nil {
		h.Stop()
		t.Fatal("StartHAProxy accepted a config with a syntax error")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("bad config took %s to be reported, want fast failure", d)
	}
	msg := err.Error()
	if !strings.Contains(msg, "exited early") || !strings.Contains(msg, "no-such-keyword") {
		t.Errorf("error lacks exit reason or haproxy output:\n%s", msg)
	}
	t.Logf("error as reported:\n%s", msg)
}

func TestConsul(t *testing.T) {
	t.Parallel()
	c := Consul(t, ConsulOptions{DNS: true, GRPC: true, LeafCertTTL: "1h"})

	leader, err := c.Client.Status().Leader()
	if err != nil || leader == "" {
		t.Fatalf("leader = %q, %v", leader, err)
	}
	roots, _, err := c.Client.Connect().CARoots(nil)
	if err != nil {
		t.Fatalf("ca roots: %v", err)
	}
	if len(roots.Roots) == 0 || !roots.Roots[0].Active || roots.TrustDomain == "" {
		t.Fatalf("no active ca root: %+v", roots)
	}
	if c.Addr != "127.0.0.1:"+strconv.Itoa(c.HTTPPort) {
		t.Errorf("Addr = %s, HTTPPort = %d", c.Addr, c.HTTPPort)
	}
	for name, port := range map[string]int{"dns": c.DNSPort, "grpc": c.GRPCPort} {
		conn, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), time.Second)
		if err != nil {
			t.Errorf("dial %s port %d: %v", name, port, err)
			continue
		}
		conn.Close()
	}

	leaf, _, err := c.Client.Agent().ConnectCALeaf("web", nil)
	if err != nil {
		t.Fatalf("leaf cert: %v", err)
	}
	if ttl := leaf.ValidBefore.Sub(leaf.ValidAfter); ttl < 59*time.Minute || ttl > 61*time.Minute {
		t.Errorf("leaf cert lifetime %s (%s .. %s), want about 1h", ttl, leaf.ValidAfter, leaf.ValidBefore)
	}

	c.Stop()
	c.Stop() // idempotent
	assertGroupGone(t, c.PID())
	if _, err := c.Client.Status().Leader(); err == nil {
		t.Fatal("consul still answers after Stop")
	}
}

func TestConsulNoOptionalPorts(t *testing.T) {
	t.Parallel()
	c := Consul(t, ConsulOptions{})
	if c.DNSPort != 0 || c.GRPCPort != 0 {
		t.Errorf("DNSPort = %d, GRPCPort = %d, want 0 when disabled", c.DNSPort, c.GRPCPort)
	}
	for _, port := range []string{"8600", "8502", "8503"} {
		if strings.Contains(c.Output(), "127.0.0.1:"+port) {
			t.Errorf("consul output mentions a default port %s:\n%s", port, c.Output())
		}
	}
	testAuthorize(t, c, true)
}

func TestConsulDefaultDeny(t *testing.T) {
	t.Parallel()
	c := Consul(t, ConsulOptions{DefaultDeny: true})
	testAuthorize(t, c, false)
}

// TestConsulACL: with ACL, the management token may do anything (here:
// authorize, which with no intentions says deny, the ACL default), a
// request without a token is refused, and NewClient's token is sent.
func TestConsulACL(t *testing.T) {
	t.Parallel()
	c := Consul(t, ConsulOptions{ACL: true})
	if c.ManagementToken == "" {
		t.Fatal("no management token")
	}
	testAuthorize(t, c, false)

	anon, err := c.NewClient("")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := anon.KV().Put(&api.KVPair{Key: "k", Value: []byte("v")}, nil); err == nil || !strings.Contains(err.Error(), "Permission denied") {
		t.Errorf("kv put without a token: %v, want Permission denied", err)
	}
	mgmt, err := c.NewClient(c.ManagementToken)
	if err != nil {
		t.Fatal(err)
	}
	self, _, err := mgmt.ACL().TokenReadSelf(nil)
	if err != nil {
		t.Fatalf("read own token: %v", err)
	}
	if self.SecretID != c.ManagementToken {
		t.Errorf("NewClient sent token %s, want %s", self.SecretID, c.ManagementToken)
	}
}

// testAuthorize asks the agent whether api may connect to web, with no
// intentions defined.
func testAuthorize(t *testing.T, c *ConsulProc, want bool) {
	t.Helper()
	roots, _, err := c.Client.Connect().CARoots(nil)
	if err != nil {
		t.Fatalf("ca roots: %v", err)
	}
	auth, err := c.Client.Agent().ConnectAuthorize(&api.AgentAuthorizeParams{
		Target:        "web",
		ClientCertURI: fmt.Sprintf("spiffe://%s/ns/default/dc/dc1/svc/api", roots.TrustDomain),
	})
	if err != nil {
		t.Fatalf("authorize: %v", err)
	}
	if auth.Authorized != want {
		t.Fatalf("authorized = %v (%s), want %v", auth.Authorized, auth.Reason, want)
	}
	t.Logf("authorized = %v (%s)", auth.Authorized, auth.Reason)
}

func TestConsulBadLeafCertTTL(t *testing.T) {
	t.Parallel()
	start := time.Now()
	c, err := StartConsul(t, ShortTempDir(t), ConsulOptions{LeafCertTTL: "10m"})
	if err == nil {
		c.Stop()
		t.Fatal("consul accepted leaf_cert_ttl = 10m")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("bad config took %s to be reported", d)
	}
	if !strings.Contains(err.Error(), "exited early") ||
		!strings.Contains(err.Error(), "leaf cert TTL must be greater or equal than 1h") {
		t.Errorf("error lacks exit reason or consul output:\n%v", err)
	}
}

func TestConsulShortLeafCertTTL(t *testing.T) {
	t.Parallel()
	c := Consul(t, ConsulOptions{LeafCertTTL: "2m", SkipCAValidation: true})
	leaf, _, err := c.Client.Agent().ConnectCALeaf("web", nil)
	if err != nil {
		t.Fatalf("leaf cert: %v", err)
	}
	if ttl := leaf.ValidBefore.Sub(leaf.ValidAfter); ttl != 2*time.Minute {
		t.Errorf("leaf cert lifetime %s (%s .. %s), want 2m", ttl, leaf.ValidAfter, leaf.ValidBefore)
	}
}

func TestProcessStopKillsGroup(t *testing.T) {
	t.Parallel()
	// The shell and its children ignore SIGTERM, so stop has to fall back
	// to killing the whole process group.
	p, err := startProcess("sh", "/bin/sh", ShortTempDir(t), "-c", `trap "" TERM; sleep 30 & sleep 30 & echo started; wait`)
	if err != nil {
		t.Fatalf("start: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(p.out.String(), "started") {
		if time.Now().After(deadline) {
			t.Fatalf("shell did not start; output: %q", p.out.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	start := time.Now()
	p.stop(200 * time.Millisecond)
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("stop took %s", d)
	}
	if !p.exited() {
		t.Fatal("process still running after stop")
	}
	assertGroupGone(t, p.pid)
	if got := p.out.String(); got != "started\n" {
		t.Errorf("output = %q", got)
	}
}

// TestConsulClientAgent: a client agent joins the dev server; what is
// written to the server's catalog is read through the client, whose answers
// are not indented, and the client's DNS interface answers for it.
func TestConsulClientAgent(t *testing.T) {
	t.Parallel()
	server := Consul(t, ConsulOptions{})
	client, err := LaunchConsulClient(ConsulBin(t), ShortTempDir(t), server, ConsulOptions{DNS: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.Stop)
	if client.Addr == server.Addr || client.DNSPort == 0 {
		t.Fatalf("client Addr %s (server %s), DNSPort %d", client.Addr, server.Addr, client.DNSPort)
	}
	members, err := client.Client.Agent().Members(false)
	if err != nil || len(members) != 2 {
		t.Fatalf("members seen by the client: %v, %v", members, err)
	}
	_, err = server.Client.Catalog().Register(&api.CatalogRegistration{Node: "other-host", Address: "127.0.9.9",
		Service: &api.AgentService{ID: "web-1", Service: "web", Port: 8080}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get("http://" + client.Addr + "/v1/health/service/web")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), `"Port":8080`) || strings.Contains(string(body), "\n  ") {
		t.Errorf("client agent answer, want compact JSON with the server's entry:\n%s", body)
	}
	if info, err := client.Client.Agent().Self(); err != nil || info["Config"]["Server"] != false {
		t.Errorf("client agent Self: Server = %v, %v", info["Config"]["Server"], err)
	}
}

func TestStatFields(t *testing.T) {
	f := StatFields([]byte("42 (a b) c) S 7 42 42 0 -1 0 0 0 0 0 5 6 7 8 20 0 1 0"))
	if len(f) < 15 || f[0] != "S" || f[1] != "7" || f[11] != "5" || f[14] != "8" {
		t.Errorf("fields %q", f)
	}
	if f := StatFields([]byte("42 (no end")); f != nil {
		t.Errorf("fields of a stat without the command's end: %q", f)
	}
}
