package testenv

import (
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

const consulReadyTimeout = 30 * time.Second

// ConsulOptions configures the Consul dev agent started by Consul.
type ConsulOptions struct {
	// DefaultDeny sets default_intention_policy = "deny": connections
	// without a matching intention are refused. Otherwise the Consul
	// default applies (allow, as ACLs are disabled).
	DefaultDeny bool
	// DNS enables the DNS interface on a free port (ConsulProc.DNSPort).
	DNS bool
	// GRPC enables the plain-text gRPC (xDS) port on a free port
	// (ConsulProc.GRPCPort). grpc_tls is always disabled.
	GRPC bool
	// LeafCertTTL sets connect.ca_config.leaf_cert_ttl, e.g. "1h". Empty
	// means the Consul default (72h). The built-in CA accepts 1h up to
	// 2920h (intermediate_cert_ttl, default 8760h, must be at least
	// 3 * leaf_cert_ttl); anything else makes the agent exit at startup
	// (Consul, and so StartConsul, fails fast) unless SkipCAValidation.
	// Consul backdates NotBefore by 1 minute and computes NotAfter from
	// that, so a fresh leaf is valid for LeafCertTTL minus 1 minute.
	LeafCertTTL string
	// SkipCAValidation sets the CA provider's undocumented SkipValidate
	// knob (meant for Consul's own tests) so that LeafCertTTL may be below
	// 1h, e.g. "2m" for certificate rotation tests.
	SkipCAValidation bool
	// CA, when set, is the built-in CA provider's root (ca_config
	// private_key and root_cert): the test holds the key Consul signs
	// leaves with, and can mint certificates HAProxy's ca-file accepts
	// (another trust domain, an agent identity, two URI SANs).
	CA *CA
	// ACL enables Consul's ACL system with default_policy = "deny", as a
	// production cluster runs it: a request without a token, or with one
	// that lacks a permission, is refused or gets its answer filtered.
	// The agent and ConsulProc.Client use the management token
	// ConsulProc.ManagementToken; NewClient makes clients with other
	// tokens. With no default_intention_policy set (DefaultDeny false),
	// intentions default to deny as well: Consul takes their default from
	// the ACL default policy. Applies to LaunchConsul only.
	ACL bool
	// ExtraHCL is appended verbatim to the agent config file. It must not
	// repeat a key or block the generated config already sets (ports,
	// connect, default_intention_policy, ...).
	ExtraHCL string
}

// ConsulProc is a running Consul dev agent (a single server with Connect
// enabled) listening on 127.0.0.1.
type ConsulProc struct {
	// Addr is the HTTP API address, 127.0.0.1:HTTPPort.
	Addr string
	// HTTPPort is the HTTP API port.
	HTTPPort int
	// DNSPort is the DNS port, 0 unless ConsulOptions.DNS.
	DNSPort int
	// GRPCPort is the plain-text gRPC port, 0 unless ConsulOptions.GRPC.
	GRPCPort int
	// SerfLANPort is the gossip port other agents join.
	SerfLANPort int
	// Dir holds the config file and the data dir.
	Dir string
	// ConfigPath is the agent config file.
	ConfigPath string
	// DataDir is the agent data dir.
	DataDir string
	// Client is an API client for Addr; with ConsulOptions.ACL it sends
	// ManagementToken.
	Client *api.Client
	// ManagementToken is the ACL management token (initial_management),
	// empty unless ConsulOptions.ACL.
	ManagementToken string

	proc *process
	// host is the test network host the agent runs on, nil for the
	// test's own network namespace.
	host *Host
	// node is the agent's node name; empty means "testenv".
	node string
}

// Consul starts a Consul dev agent on free loopback ports and waits (up to
// 30 s) until it has a leader and an active Connect CA root. The test fails
// with the agent's output if it exits or is not ready in time. The agent is
// stopped when the test ends.
func Consul(t testing.TB, opts ConsulOptions) *ConsulProc {
	t.Helper()
	c, err := StartConsul(t, ShortTempDir(t), opts)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return c
}

// StartConsul is Consul with a caller-chosen dir and an error instead of a
// test failure. It still skips (or fails in CI) when consul is not
// installed. On success the agent is stopped when the test ends; on error it
// has already been stopped and the error holds its output.
func StartConsul(t testing.TB, dir string, opts ConsulOptions) (*ConsulProc, error) {
	t.Helper()
	c, err := LaunchConsul(ConsulBin(t), dir, opts)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() {
		c.Stop()
		if t.Failed() {
			t.Logf("consul output (%s):\n%s", c.Dir, c.Output())
		}
	})
	return c, nil
}

// LaunchConsul starts the agent outside a test (meshbench uses it): the
// caller stops it. On error the process is already stopped and the error
// holds its output.
func LaunchConsul(bin, dir string, opts ConsulOptions) (*ConsulProc, error) {
	ports, err := freePorts(5)
	if err != nil {
		return nil, err
	}
	c := &ConsulProc{
		HTTPPort:   ports[0],
		Addr:       net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0])),
		Dir:        dir,
		ConfigPath: filepath.Join(dir, "consul.hcl"),
		DataDir:    filepath.Join(dir, "data"),
	}
	if opts.DNS {
		c.DNSPort = ports[3]
	}
	if opts.GRPC {
		c.GRPCPort = ports[4]
	}
	c.SerfLANPort = ports[2]
	if opts.ACL {
		if c.ManagementToken, err = newToken(); err != nil {
			return nil, err
		}
	}
	return c.launch(bin, "consul", consulConfig(c, ports[1], ports[2], opts),
		"agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1")
}

// launch writes cfg to c.ConfigPath, starts the agent with args (plus the
// config file and the log level) in c.Dir, and waits until it is ready.
func (c *ConsulProc) launch(bin, name, cfg string, args ...string) (*ConsulProc, error) {
	if err := os.WriteFile(c.ConfigPath, []byte(cfg), 0o600); err != nil {
		return nil, fmt.Errorf("write %s config: %w", name, err)
	}
	var err error
	if c.Client, err = newConsulClient(c.Addr, c.ManagementToken, 0, c.host); err != nil {
		return nil, err
	}
	// The readiness probe gets its own client with a short timeout;
	// c.Client has none so that blocking queries work.
	probe, err := newConsulClient(c.Addr, c.ManagementToken, 2*time.Second, c.host)
	if err != nil {
		return nil, err
	}
	args = append(args, "-config-file", c.ConfigPath, "-log-level", "info")
	if c.host != nil {
		// ip netns exec execs consul in place: the process group and
		// parent-death signal startProcess sets are consul's own.
		bin, args = "ip", append([]string{"netns", "exec", c.host.NS, bin}, args...)
	}
	if c.proc, err = startProcess(name, bin, c.Dir, args...); err != nil {
		return nil, err
	}
	if err := c.waitReady(probe, consulReadyTimeout); err != nil {
		return nil, c.proc.failStart(err)
	}
	return c, nil
}

// LaunchConsulClient starts a Consul client agent (not a server) that
// joins server, as on a host that runs services and their sidecars: its
// HTTP answers are not indented as a dev agent's are, and the proxy
// registrations it holds get their data over RPC and streaming from the
// server, not from the server's own state store. Of opts only DNS and
// GRPC apply. The caller stops it; on error it is already stopped.
func LaunchConsulClient(bin, dir string, server *ConsulProc, opts ConsulOptions) (*ConsulProc, error) {
	ports, err := freePorts(4)
	if err != nil {
		return nil, err
	}
	c := &ConsulProc{
		HTTPPort:    ports[0],
		SerfLANPort: ports[1],
		Addr:        net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0])),
		Dir:         dir,
		ConfigPath:  filepath.Join(dir, "consul.hcl"),
		DataDir:     filepath.Join(dir, "data"),
	}
	dns, grpc := -1, -1
	if opts.DNS {
		c.DNSPort, dns = ports[2], ports[2]
	}
	if opts.GRPC {
		c.GRPCPort, grpc = ports[3], ports[3]
	}
	cfg := fmt.Sprintf(`node_name = "testenv-client"
data_dir = %q
server = false
bind_addr = "127.0.0.1"
client_addr = "127.0.0.1"
retry_join = ["127.0.0.1:%d"]
retry_interval = "200ms"
disable_update_check = true
ports {
  http     = %d
  https    = -1
  serf_lan = %d
  serf_wan = -1
  dns      = %d
  grpc     = %d
  grpc_tls = -1
}
`, c.DataDir, server.SerfLANPort, c.HTTPPort, c.SerfLANPort, dns, grpc)
	return c.launch(bin, "consul-client", cfg, "agent")
}

// NewClient returns an API client for the agent that sends token (none
// when empty), without an HTTP timeout, so blocking queries work.
func (c *ConsulProc) NewClient(token string) (*api.Client, error) {
	return newConsulClient(c.Addr, token, 0, c.host)
}

// newToken returns a random UUID (version 4), the form Consul requires
// of an ACL token's secret.
func newToken() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("acl token: %w", err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:]), nil
}

// newConsulClient returns an API client for addr over plain HTTP that
// sends token (none when empty), reached from inside host when it is not
// nil. It brings its own http.Client and sets the token itself so that
// CONSUL_CACERT, CONSUL_HTTP_TOKEN and friends from the environment cannot
// break it.
func newConsulClient(addr, token string, timeout time.Duration, host *Host) (*api.Client, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if host != nil {
		tr = host.Transport()
	}
	client, err := api.NewClient(&api.Config{
		Address:    addr,
		Scheme:     "http",
		Token:      token,
		HttpClient: &http.Client{Transport: tr, Timeout: timeout},
	})
	if err != nil {
		return nil, fmt.Errorf("create consul api client: %w", err)
	}
	return client, nil
}

// consulConfig renders the agent config file.
func consulConfig(c *ConsulProc, serverPort, serfLANPort int, opts ConsulOptions) string {
	dns, grpc := -1, -1
	if opts.DNS {
		dns = c.DNSPort
	}
	if opts.GRPC {
		grpc = c.GRPCPort
	}
	var b strings.Builder
	node := c.node
	if node == "" {
		node = "testenv"
	}
	fmt.Fprintf(&b, "node_name = %q\n", node)
	fmt.Fprintf(&b, "data_dir = %q\n", c.DataDir)
	b.WriteString("disable_update_check = true\n")
	fmt.Fprintf(&b, `ports {
  http     = %d
  https    = -1
  server   = %d
  serf_lan = %d
  serf_wan = -1
  dns      = %d
  grpc     = %d
  grpc_tls = -1
}
`, c.HTTPPort, serverPort, serfLANPort, dns, grpc)
	b.WriteString("connect {\n  enabled = true\n")
	if opts.LeafCertTTL != "" || opts.SkipCAValidation || opts.CA != nil {
		// An explicit ca_provider makes the agent validate ca_config at
		// startup and exit on error; without it a bad value only shows up
		// as a CA that never initializes.
		b.WriteString("  ca_provider = \"consul\"\n  ca_config {\n")
		if opts.LeafCertTTL != "" {
			fmt.Fprintf(&b, "    leaf_cert_ttl = %q\n", opts.LeafCertTTL)
		}
		if opts.CA != nil {
			kder, err := x509.MarshalECPrivateKey(opts.CA.Key)
			if err != nil {
				panic(err) // a key GenerateCA made
			}
			fmt.Fprintf(&b, "    private_key = %q\n", pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}))
			fmt.Fprintf(&b, "    root_cert = %q\n", opts.CA.CertPEM)
		}
		if opts.SkipCAValidation {
			// The key is matched against the Go field name: the
			// snake_case form is silently ignored.
			b.WriteString("    SkipValidate = true\n")
		}
		b.WriteString("  }\n")
	}
	b.WriteString("}\n")
	if opts.DefaultDeny {
		b.WriteString("default_intention_policy = \"deny\"\n")
	}
	if opts.ACL {
		// The agent token registers the node and syncs services; the
		// management token serves for it in a test.
		fmt.Fprintf(&b, `acl {
  enabled        = true
  default_policy = "deny"
  tokens {
    initial_management = %q
    agent              = %q
  }
}
`, c.ManagementToken, c.ManagementToken)
	}
	if opts.ExtraHCL != "" {
		b.WriteString(opts.ExtraHCL)
		b.WriteString("\n")
	}
	return b.String()
}

func (c *ConsulProc) waitReady(probe *api.Client, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		err := checkConsulReady(probe)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("consul not ready after %s (last error: %v)", timeout, err)
		}
		select {
		case <-c.proc.done:
			return c.proc.exitError()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func checkConsulReady(client *api.Client) error {
	leader, err := client.Status().Leader()
	if err != nil {
		return fmt.Errorf("get leader: %w", err)
	}
	if leader == "" {
		return fmt.Errorf("no leader yet")
	}
	roots, _, err := client.Connect().CARoots(nil)
	if err != nil {
		return fmt.Errorf("get ca roots: %w", err)
	}
	for _, r := range roots.Roots {
		if r.Active {
			return nil
		}
	}
	return fmt.Errorf("no active ca root yet")
}

// Output returns everything consul wrote to stdout and stderr so far.
func (c *ConsulProc) Output() string {
	return c.proc.out.String()
}

// PID returns the process id of the agent.
func (c *ConsulProc) PID() int {
	return c.proc.pid
}

// Exited returns a channel closed once the agent has exited.
func (c *ConsulProc) Exited() <-chan struct{} {
	return c.proc.done
}

// Stop sends SIGTERM to the agent, waits up to 5 s, then kills its process
// group. It is idempotent.
func (c *ConsulProc) Stop() {
	c.proc.stop(stopGrace)
}
