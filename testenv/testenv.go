// Package testenv starts and stops real haproxy and consul processes for
// integration tests: binary lookup, free ports, short temp dirs, readiness
// waits and cleanup (process-group kill, output logged on failure); and
// test networks of hosts in network namespaces to run them on (NewNet).
// It does not generate HAProxy configs or register Consul services.
package testenv

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// modulePath is the module whose root holds the bin/ directory filled by
// "make deps".
const modulePath = "github.com/haproxy-connect/haproxy-connect"

// HAProxyBin returns the path of the haproxy binary: $HAPROXY_BIN, then
// <module root>/bin/haproxy, then haproxy (or /usr/sbin/haproxy) on the
// system. If none is found the test is skipped, or fails when CI=true.
func HAProxyBin(t testing.TB) string {
	t.Helper()
	return findBin(t, "haproxy", "HAPROXY_BIN", "/usr/sbin/haproxy")
}

// ConsulBin returns the path of the consul binary: $CONSUL_BIN, then
// <module root>/bin/consul, then consul on $PATH. If none is found the test
// is skipped, or fails when CI=true.
func ConsulBin(t testing.TB) string {
	t.Helper()
	return findBin(t, "consul", "CONSUL_BIN")
}

// errNotFound is FindBinary's error when no binary is found at all.
var errNotFound = errors.New("not found")

// FindBinary looks name up as HAProxyBin and ConsulBin do ($envVar, then
// <module root>/bin/name, then $PATH, then fallbacks), for callers outside
// tests.
func FindBinary(name, envVar string, fallbacks ...string) (string, error) {
	if p := os.Getenv(envVar); p != "" {
		if err := checkExecutable(p); err != nil {
			return "", fmt.Errorf("%s=%q is not usable: %w", envVar, p, err)
		}
		return p, nil
	}
	if root, err := ModuleRoot(); err == nil {
		p := filepath.Join(root, "bin", name)
		if checkExecutable(p) == nil {
			return p, nil
		}
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, p := range fallbacks {
		if checkExecutable(p) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s %w (set %s or run make deps)", name, errNotFound, envVar)
}

func findBin(t testing.TB, name, envVar string, fallbacks ...string) string {
	t.Helper()
	p, err := FindBinary(name, envVar, fallbacks...)
	if err == nil {
		return p
	}
	// An explicitly configured path that does not work is a setup error,
	// never a reason to skip.
	if !errors.Is(err, errNotFound) {
		t.Fatalf("%v", err)
	}
	msg := err.Error()
	if isCI() {
		t.Fatalf("%s", msg)
		return ""
	}
	t.Skipf("%s", msg)
	return ""
}

func checkExecutable(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	if fi.IsDir() {
		return fmt.Errorf("%s is a directory", p)
	}
	if fi.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("%s is not executable", p)
	}
	return nil
}

func isCI() bool {
	ci, _ := strconv.ParseBool(os.Getenv("CI"))
	return ci
}

var (
	moduleRootOnce sync.Once
	moduleRoot     string
	moduleRootErr  error
)

// ModuleRoot returns the directory holding the go.mod of
// github.com/haproxy-connect/haproxy-connect, found by walking up from the
// working directory.
func ModuleRoot() (string, error) {
	moduleRootOnce.Do(func() {
		moduleRoot, moduleRootErr = findModuleRoot()
	})
	return moduleRoot, moduleRootErr
}

func findModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("get working dir: %w", err)
	}
	for {
		if isOurGoMod(filepath.Join(dir, "go.mod")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod with module %s above working dir", modulePath)
		}
		dir = parent
	}
}

func isOurGoMod(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "module" {
			return strings.Trim(fields[1], `"`) == modulePath
		}
	}
	return false
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	return FreePorts(t, 1)[0]
}

// FreePorts returns n distinct TCP ports on 127.0.0.1 that were free a
// moment ago.
//
// They are drawn at random below the kernel's ephemeral range
// (net.ipv4.ip_local_port_range, 32768-60999 by default), not from port 0:
// a port the kernel hands out for ":0" comes from the range every outgoing
// connection takes its local port from, so in a busy parallel test run
// another test's client socket can take it between our close and the
// server's bind. Below that range only another explicit bind can, and the
// ports are also not repeated within this process.
func FreePorts(t testing.TB, n int) []int {
	t.Helper()
	ports, err := freePorts(n)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return ports
}

// PickPorts is FreePorts for callers outside tests.
func PickPorts(n int) ([]int, error) { return freePorts(n) }

const (
	portLow  = 10000
	portHigh = 32000 // below the default ephemeral range
)

var (
	portMu   sync.Mutex
	portUsed = map[int]bool{}
)

func freePorts(n int) ([]int, error) {
	portMu.Lock()
	defer portMu.Unlock()
	ports := make([]int, 0, n)
	for tries := 0; len(ports) < n; tries++ {
		if tries > 1000 {
			return nil, fmt.Errorf("find free port: no free port in %d-%d after %d tries", portLow, portHigh, tries)
		}
		p := portLow + rand.IntN(portHigh-portLow)
		if portUsed[p] {
			continue
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue
		}
		l.Close()
		portUsed[p] = true
		ports = append(ports, p)
	}
	return ports, nil
}

// ShortTempDir returns a new directory directly under /tmp with a short path,
// removed when the test ends. Use it for unix sockets: their paths are
// limited to 108 bytes and t.TempDir() paths are often longer.
func ShortTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "hc")
	if err != nil {
		t.Fatalf("create short temp dir: %v", err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Logf("remove temp dir %s: %v", dir, err)
		}
	})
	return dir
}

// ServeTCP listens on a free loopback port and runs handle for each
// connection in its own goroutine, closing the connection after it. It
// returns the port; the listener closes when the test ends.
func ServeTCP(t testing.TB, handle func(net.Conn)) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go Serve(ln, handle)
	return ln.Addr().(*net.TCPAddr).Port
}

// Serve runs handle for each connection ln accepts, in its own goroutine,
// closing the connection after it; it returns when ln is closed. ServeTCP
// is Serve for a test; meshbench's in-process apps use it directly.
func Serve(ln net.Listener, handle func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			handle(c)
		}()
	}
}

// Relay listens on a free loopback port and copies bytes both ways to
// target: a stand-in for another instance of a service in churn tests.
func Relay(t testing.TB, target string) int {
	t.Helper()
	return ServeTCP(t, func(c net.Conn) { Pipe(c, target) })
}

// Pipe dials target and copies bytes both ways between it and c until
// either side ends; the caller closes c. For relays in tests and meshbench.
func Pipe(c net.Conn, target string) {
	u, err := net.DialTimeout("tcp", target, 5*time.Second)
	if err != nil {
		return
	}
	defer u.Close()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(u, c); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, u); done <- struct{}{} }()
	<-done
}
