package testenv

import (
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"testing"
)

// Consul on the hosts of a test network (NewNet). Each agent has a host to
// itself, so it takes Consul's well-known ports, as on a real host: RPC
// 8300 and gossip 8301 on the host's address, the HTTP API on
// 127.0.0.1:8500 inside the host (where that host's sidecars reach it).
const (
	hostHTTPPort    = 8500
	hostServerPort  = 8300
	hostSerfLANPort = 8301
)

// ConsulServerOn starts a Consul server agent on host h and waits (up to
// 30 s) until it leads and has an active Connect CA root. It runs as a
// single server runs in production, not as a -dev agent: state in a data
// dir on disk, bootstrap_expect = 1, raft_multiplier = 1 (the production
// recommendation; also what makes it lead within seconds). Connect is
// enabled with the built-in CA. Of opts, everything applies except DNS and
// GRPC (off). The agent is stopped when the test ends.
func ConsulServerOn(t testing.TB, h *Host, opts ConsulOptions) *ConsulProc {
	t.Helper()
	opts.DNS, opts.GRPC = false, false
	c := hostConsul(t, h)
	cfg := consulConfig(c, hostServerPort, hostSerfLANPort, opts) + fmt.Sprintf(`server = true
bootstrap_expect = 1
bind_addr = %q
client_addr = "127.0.0.1"
performance {
  raft_multiplier = 1
}
`, h.Addr)
	return startOn(t, c, "consul-server@"+h.Name, cfg)
}

// ConsulClientOn starts a Consul client agent on host h that joins server
// over the network (retry_join to the server's host address) and waits
// until it reaches the server: it sees a leader and the CA roots. The agent
// is stopped when the test ends.
func ConsulClientOn(t testing.TB, h *Host, server *ConsulProc) *ConsulProc {
	t.Helper()
	if server.host == nil {
		t.Fatalf("ConsulClientOn: the server does not run on a test network host")
	}
	c := hostConsul(t, h)
	cfg := fmt.Sprintf(`node_name = %q
data_dir = %q
server = false
bind_addr = %q
client_addr = "127.0.0.1"
retry_join = [%q]
retry_interval = "200ms"
# SIGTERM (the test's end) exits at once: a client's default graceful leave
# takes about 4 s, which the test would only wait for.
leave_on_terminate = false
disable_update_check = true
ports {
  http     = %d
  https    = -1
  serf_lan = %d
  serf_wan = -1
  dns      = -1
  grpc     = -1
  grpc_tls = -1
}
`, c.node, c.DataDir, h.Addr, net.JoinHostPort(server.host.Addr.String(), strconv.Itoa(server.SerfLANPort)), c.HTTPPort, c.SerfLANPort)
	return startOn(t, c, "consul-client@"+h.Name, cfg)
}

// hostConsul is the ConsulProc of an agent on h, before it starts.
func hostConsul(t testing.TB, h *Host) *ConsulProc {
	dir := ShortTempDir(t)
	return &ConsulProc{
		HTTPPort:    hostHTTPPort,
		SerfLANPort: hostSerfLANPort,
		Addr:        net.JoinHostPort("127.0.0.1", strconv.Itoa(hostHTTPPort)),
		Dir:         dir,
		ConfigPath:  filepath.Join(dir, "consul.hcl"),
		DataDir:     filepath.Join(dir, "data"),
		host:        h,
		node:        h.Name,
	}
}

// startOn launches c with cfg, fails the test with the agent's output if
// it does not get ready, and stops it when the test ends.
func startOn(t testing.TB, c *ConsulProc, name, cfg string) *ConsulProc {
	t.Helper()
	if _, err := c.launch(ConsulBin(t), name, cfg, "agent"); err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() {
		c.Stop()
		if t.Failed() {
			t.Logf("%s output (%s):\n%s", name, c.Dir, c.Output())
		}
	})
	return c
}

// Host is the test network host the agent runs on, nil when it runs in
// the test's own network namespace.
func (c *ConsulProc) Host() *Host { return c.host }
