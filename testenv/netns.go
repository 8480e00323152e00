package testenv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A test network of hosts: each host is a network namespace the test
// creates, with lo up and one interface, eth0, whose veth peer is a port
// of a bridge in a namespace of its own (the switch). Nothing of it is
// in the root namespace: the addresses exist only inside the namespaces,
// so parallel test packages can all use the same ones, and the machine's
// own interfaces, routes and ports are never touched.
//
// The addresses are 198.18.0.<n>/24, from 198.18.0.0/15 (RFC 2544, set
// aside for benchmarking network devices): unlike 10/8 or 192.168/16 it is
// no one's LAN, VPN or container network, so an address in a log can only
// be one of these hosts.

const (
	// netnsPrefix starts the name of every namespace a test network
	// creates: <prefix><pid>-<n>-<host>. The pid tells a leftover of a
	// crashed run (its process is gone) from a network of a test binary
	// that is running in parallel.
	netnsPrefix = "hct"
	// netnsSubnet is the network of the hosts' addresses.
	netnsSubnet = "198.18.0.0/24"
)

var (
	// netSeq numbers the networks of this process.
	netSeq     atomic.Int32
	leftoverMu sync.Mutex
)

// Net is a test network: hosts joined by a bridge.
type Net struct {
	// Hosts are the hosts, Hosts[i] with address 198.18.0.<i+1>.
	Hosts []*Host
	// name is <prefix><pid>-<n>, the start of each namespace name.
	name     string
	bridgeNS string
}

// Host is one host of a Net: a network namespace.
type Host struct {
	// Name is the host's name, "host1" for Hosts[0].
	Name string
	// NS is its network namespace, as ip netns names it.
	NS string
	// Addr is its address on eth0.
	Addr netip.Addr
}

// NewNet creates a network of n hosts (at most 250) and removes it when
// the test ends: the processes still inside its namespaces are killed and
// the namespaces deleted (which deletes their interfaces). It first
// removes what a crashed earlier run left behind. It skips the test when
// the process is not root or ip netns does not work (fails it in CI).
func NewNet(t testing.TB, n int) *Net {
	t.Helper()
	if n < 1 || n > 250 {
		t.Fatalf("NewNet: %d hosts, want 1 to 250", n)
	}
	if os.Geteuid() != 0 {
		skipNet(t, "not root")
	}
	ip, err := exec.LookPath("ip")
	if err != nil {
		skipNet(t, err.Error())
	}
	removeLeftoverNets(t)
	nw := &Net{name: fmt.Sprintf("%s%d-%d", netnsPrefix, os.Getpid(), netSeq.Add(1))}
	nw.bridgeNS = nw.name + "-sw"
	// The first namespace tells whether namespaces work here at all
	// (a container without CAP_SYS_ADMIN, no /run/netns).
	if out, err := exec.Command(ip, "netns", "add", nw.bridgeNS).CombinedOutput(); err != nil {
		skipNet(t, fmt.Sprintf("ip netns add: %v: %s", err, bytes2str(out)))
	}
	t.Cleanup(func() { removeNamespaces(t, nw.namespaces()) })
	prefix := netip.MustParsePrefix(netnsSubnet)
	for i := range n {
		h := &Host{Name: fmt.Sprintf("host%d", i+1), Addr: addrPlus(prefix.Addr(), i+1)}
		h.NS = nw.name + "-" + h.Name
		nw.Hosts = append(nw.Hosts, h)
	}
	steps := [][]string{
		{"-n", nw.bridgeNS, "link", "set", "lo", "up"},
		{"-n", nw.bridgeNS, "link", "add", "br0", "type", "bridge"},
		{"-n", nw.bridgeNS, "link", "set", "br0", "up"},
	}
	for _, h := range nw.Hosts {
		port := "p-" + h.Name // the switch's end of the host's cable
		steps = append(steps,
			[]string{"netns", "add", h.NS},
			[]string{"-n", h.NS, "link", "set", "lo", "up"},
			// Made inside the switch with its peer moved at once: no
			// interface ever appears in the root namespace.
			[]string{"-n", nw.bridgeNS, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", h.NS},
			[]string{"-n", nw.bridgeNS, "link", "set", port, "master", "br0", "up"},
			[]string{"-n", h.NS, "addr", "add", netip.PrefixFrom(h.Addr, prefix.Bits()).String(), "dev", "eth0"},
			[]string{"-n", h.NS, "link", "set", "eth0", "up"},
		)
	}
	for _, args := range steps {
		if err := runIP(args...); err != nil {
			t.Fatalf("create test network: %v", err)
		}
	}
	return nw
}

// skipNet skips the test for want of network namespaces, or fails it in
// CI (CI=true), which runs as root: there a skip would hide the tests
// across hosts, as a missing binary would hide the others.
func skipNet(t testing.TB, why string) {
	t.Helper()
	msg := "test network of hosts in network namespaces: needs root and ip netns (" + why + ")"
	if isCI() {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// namespaces are the network's namespace names, hosts first.
func (nw *Net) namespaces() []string {
	var out []string
	for _, h := range nw.Hosts {
		out = append(out, h.NS)
	}
	return append(out, nw.bridgeNS)
}

// Command is an exec.Cmd that runs name with args inside the host's
// network namespace: ip netns exec execs it in place, so the process ID,
// process group and parent-death signal the caller sets are the
// program's own.
func (h *Host) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
}

// Do runs f on an OS thread that is inside the host's network namespace.
// A socket keeps the namespace it was created in, so a listener or
// connection f opens serves the rest of the test from any goroutine. f
// must create its sockets on its own goroutine: what it starts on others
// runs in the test's namespace.
func (h *Host) Do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		// Left locked if the thread cannot be put back: the runtime
		// then ends the thread with the goroutine, instead of
		// scheduling other goroutines on it inside the host.
		runtime.LockOSThread()
		back, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			errc <- fmt.Errorf("%s: open own network namespace: %w", h.Name, err)
			return
		}
		defer back.Close()
		target, err := os.Open("/run/netns/" + h.NS)
		if err != nil {
			errc <- fmt.Errorf("%s: open network namespace: %w", h.Name, err)
			return
		}
		defer target.Close()
		if err := setns(target); err != nil {
			errc <- fmt.Errorf("%s: enter network namespace: %w", h.Name, err)
			return
		}
		err = f()
		if setns(back) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

func setns(f *os.File) error {
	return unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
}

// DialContext dials addr, an IP literal and port, from inside the host.
func (h *Host) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := h.Do(func() error {
		var err error
		c, err = (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// Listen listens on addr inside the host.
func (h *Host) Listen(network, addr string) (net.Listener, error) {
	var ln net.Listener
	err := h.Do(func() error {
		var err error
		ln, err = net.Listen(network, addr)
		return err
	})
	return ln, err
}

// Transport is an HTTP transport whose connections are made from inside
// the host.
func (h *Host) Transport() *http.Transport {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.Proxy = nil
	tr.DialContext = h.DialContext
	return tr
}

// Relay listens on the host's address, on a port of its choosing, and
// copies bytes both ways to target, dialled from inside the host: a
// stand-in for another instance of a service running there. It returns the
// port; it stops when the test ends.
func (h *Host) Relay(t testing.TB, target string) int {
	t.Helper()
	ln, err := h.Listen("tcp", net.JoinHostPort(h.Addr.String(), "0"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go Serve(ln, func(c net.Conn) {
		u, err := h.DialContext(context.Background(), "tcp", target)
		if err != nil {
			return
		}
		defer u.Close()
		done := make(chan struct{}, 2)
		go func() { _, _ = io.Copy(u, c); done <- struct{}{} }()
		go func() { _, _ = io.Copy(c, u); done <- struct{}{} }()
		<-done
	})
	return ln.Addr().(*net.TCPAddr).Port
}

// Cut takes away the host's route to dst: a blackhole route, so the
// kernel refuses new connections at once, and ss -K aborts the
// established ones, as when the host's link towards dst goes down.
// Without the abort an established connection would stay silent until the
// peers' own keepalives give up (Consul's RPC connection: about 30 s).
// Everything else the host reaches, it still reaches.
func (h *Host) Cut(dst netip.Addr) error {
	if err := runIP("-n", h.NS, "route", "add", "blackhole", netip.PrefixFrom(dst, dst.BitLen()).String()); err != nil {
		return err
	}
	out, err := h.Command("ss", "-K", "-t", "dst", dst.String()).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: ss -K dst %s: %v: %s", h.Name, dst, err, bytes2str(out))
	}
	return nil
}

// Restore gives the host its route to dst back.
func (h *Host) Restore(dst netip.Addr) error {
	return runIP("-n", h.NS, "route", "del", "blackhole", netip.PrefixFrom(dst, dst.BitLen()).String())
}

// addrPlus is the IPv4 address n after a.
func addrPlus(a netip.Addr, n int) netip.Addr {
	for range n {
		a = a.Next()
	}
	return a
}

func runIP(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, bytes2str(out))
	}
	return nil
}

func bytes2str(b []byte) string { return strings.TrimSpace(string(b)) }

// removeNamespaces kills every process still inside the namespaces (the
// test's own processes have had their cleanup by now: this is for one that
// outlived it, such as a detached HAProxy) and deletes them.
func removeNamespaces(t testing.TB, names []string) {
	for _, ns := range names {
		if err := killNamespacePids(ns); err != nil {
			t.Logf("remove test network: %v", err)
		}
		if err := runIP("netns", "del", ns); err != nil {
			t.Logf("remove test network: %v", err)
		}
	}
}

// killNamespacePids kills the processes inside ns and waits (up to 5 s)
// until they are gone.
func killNamespacePids(ns string) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		out, err := exec.Command("ip", "netns", "pids", ns).Output()
		if err != nil {
			return fmt.Errorf("ip netns pids %s: %w", ns, err)
		}
		pids := strings.Fields(string(out))
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes %v still in %s after SIGKILL", pids, ns)
		}
		for _, p := range pids {
			if pid, err := strconv.Atoi(p); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// removeLeftoverNets deletes the namespaces of test networks whose
// process is gone: a run that crashed or was killed before its cleanup.
func removeLeftoverNets(t testing.TB) {
	// One sweep at a time: parallel tests would both find, and both
	// delete, the same leftover.
	leftoverMu.Lock()
	defer leftoverMu.Unlock()
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return // ip netns add will tell
	}
	var stale []string
	for _, line := range strings.Split(string(out), "\n") {
		fields := strings.Fields(line) // "<name> (id: 3)"
		if len(fields) == 0 {
			continue
		}
		if pid, ok := leftoverPid(fields[0]); ok && !processAlive(pid) {
			stale = append(stale, fields[0])
		}
	}
	if len(stale) > 0 {
		t.Logf("removing namespaces left by an earlier run: %v", stale)
		removeNamespaces(t, stale)
	}
}

// leftoverPid is the pid in a namespace name of a test network.
func leftoverPid(ns string) (int, bool) {
	rest, ok := strings.CutPrefix(ns, netnsPrefix)
	if !ok {
		return 0, false
	}
	p, _, ok := strings.Cut(rest, "-")
	if !ok {
		return 0, false
	}
	pid, err := strconv.Atoi(p)
	return pid, err == nil && pid > 0
}

func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
