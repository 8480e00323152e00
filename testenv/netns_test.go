package testenv

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestNet: hosts reach each other over the bridge by their addresses,
// which exist nowhere in the test's own namespace; Cut takes one host's
// route to another away (new connections fail at once, established ones
// are aborted) and Restore gives it back; when the test ends the
// namespaces are gone; a leftover of a dead run is removed.
func TestNet(t *testing.T) {
	t.Parallel()
	// A leftover: a namespace named after a process that is gone.
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	leftover := fmt.Sprintf("%s%d-1-sw", netnsPrefix, dead.Process.Pid)
	if processAlive(dead.Process.Pid) {
		t.Skipf("pid %d already reused", dead.Process.Pid)
	}
	var names []string
	t.Run("net", func(t *testing.T) {
		if os.Geteuid() != 0 {
			skipNet(t, "not root")
		}
		if out, err := exec.Command("ip", "netns", "add", leftover).CombinedOutput(); err != nil {
			skipNet(t, fmt.Sprintf("ip netns add: %v: %s", err, out))
		}
		nw := NewNet(t, 3)
		names = nw.namespaces()
		if netnsExists(t, leftover) {
			t.Errorf("the leftover namespace %s is still there", leftover)
		}
		for _, ns := range names {
			if !netnsExists(t, ns) {
				t.Fatalf("namespace %s missing", ns)
			}
		}
		h2, h3 := nw.Hosts[1], nw.Hosts[2]
		if got := h3.Addr.String(); got != "198.18.0.3" {
			t.Errorf("host3 address %s", got)
		}
		addrs, err := net.InterfaceAddrs()
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range addrs {
			if strings.HasPrefix(a.String(), "198.18.") {
				t.Errorf("the test's own namespace has the address %s", a)
			}
		}

		ln, err := h2.Listen("tcp", net.JoinHostPort(h2.Addr.String(), "7000"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		from := make(chan string, 10)
		go Serve(ln, func(c net.Conn) {
			from <- c.RemoteAddr().(*net.TCPAddr).IP.String()
			sc := bufio.NewScanner(c)
			for sc.Scan() {
				fmt.Fprintln(c, "echo "+sc.Text())
			}
		})
		target := net.JoinHostPort(h2.Addr.String(), "7000")
		echo := func(c net.Conn) error {
			_ = c.SetDeadline(time.Now().Add(3 * time.Second))
			if _, err := fmt.Fprintln(c, "hi"); err != nil {
				return err
			}
			line, err := bufio.NewReader(c).ReadString('\n')
			if err == nil && line != "echo hi\n" {
				err = fmt.Errorf("answer %q", line)
			}
			return err
		}
		kept, err := h3.DialContext(context.Background(), "tcp", target)
		if err != nil {
			t.Fatal(err)
		}
		defer kept.Close()
		if err := echo(kept); err != nil {
			t.Fatal(err)
		}
		if got := <-from; got != h3.Addr.String() {
			t.Errorf("connection from %s, want host3's address %s", got, h3.Addr)
		}

		if err := h3.Cut(h2.Addr); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if c, err := h3.DialContext(context.Background(), "tcp", target); err == nil {
			c.Close()
			t.Errorf("host3 reached host2 after the cut")
		}
		if err := echo(kept); err == nil {
			t.Errorf("the established connection still works after the cut")
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("the cut showed after %s, want at once", d)
		}
		if err := h3.Restore(h2.Addr); err != nil {
			t.Fatal(err)
		}
		c, err := h3.DialContext(context.Background(), "tcp", target)
		if err != nil {
			t.Fatalf("after restore: %v", err)
		}
		defer c.Close()
		if err := echo(c); err != nil {
			t.Fatalf("after restore: %v", err)
		}
	})
	for _, ns := range names {
		if netnsExists(t, ns) {
			t.Errorf("namespace %s left after the test", ns)
		}
	}
}

func netnsExists(t *testing.T, ns string) bool {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[0] == ns {
			return true
		}
	}
	return false
}

// TestConsulOnHosts: a server on one host and client agents on two others
// form one cluster over the test network.
func TestConsulOnHosts(t *testing.T) {
	t.Parallel()
	nw := NewNet(t, 3)
	server := ConsulServerOn(t, nw.Hosts[0], ConsulOptions{})
	a := ConsulClientOn(t, nw.Hosts[1], server)
	b := ConsulClientOn(t, nw.Hosts[2], server)
	// host3 learns of host2 by gossip, a moment after both joined.
	want := fmt.Sprint(map[string]string{"host1": "198.18.0.1", "host2": "198.18.0.2", "host3": "198.18.0.3"})
	var got string
	for deadline := time.Now().Add(10 * time.Second); got != want && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		members, err := b.Client.Agent().Members(false)
		if err != nil {
			t.Fatal(err)
		}
		m := map[string]string{}
		for _, mem := range members {
			m[mem.Name] = mem.Addr
		}
		got = fmt.Sprint(m)
	}
	if got != want {
		t.Errorf("members seen by host3: %v, want %v", got, want)
	}
	if info, err := a.Client.Agent().Self(); err != nil || info["Config"]["Server"] != false {
		t.Errorf("host2 agent Self: Server = %v, %v", info["Config"]["Server"], err)
	}
	if info, err := server.Client.Agent().Self(); err != nil || info["Config"]["Server"] != true {
		t.Errorf("host1 agent Self: Server = %v, %v", info["Config"]["Server"], err)
	}
}
