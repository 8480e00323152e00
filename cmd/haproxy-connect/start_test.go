package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// TestStartErrors: each way the sidecar cannot start exits non-zero with
// one clear line.
func TestStartErrors(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{})
	c := consul.Client
	ports := testenv.FreePorts(t, 4)
	register(t, c, "web", ports[0], ports[1], nil)
	// A second proxy for "web": -sidecar-for web is ambiguous.
	for _, id := range []string{"api-proxy-1", "api-proxy-2"} {
		err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: id, Name: "api-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Port: ports[2], Address: "127.0.0.1",
			Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "api", DestinationServiceID: "api"},
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	haproxy := testenv.HAProxyBin(t)
	worldWritable := testenv.ShortTempDir(t)
	if err := os.Chmod(worldWritable, 0o777); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no registration", []string{"-sidecar-for", "nope", "-http-addr", consul.Addr, "-haproxy-bin", haproxy}, `no connect-proxy registration for that service "nope"`},
		{"two registrations", []string{"-sidecar-for", "api", "-http-addr", consul.Addr, "-haproxy-bin", haproxy}, "more than one connect-proxy registration"},
		{"haproxy missing", []string{"-sidecar-for", "web", "-http-addr", consul.Addr, "-haproxy-bin", "/nonexistent/haproxy"}, "haproxy not found"},
		{"consul unreachable", []string{"-sidecar-for", "web", "-http-addr", fmt.Sprintf("127.0.0.1:%d", ports[3]), "-haproxy-bin", haproxy, "-start-timeout", "1s"}, "unreachable for 1s"},
		{"unknown proxy id", []string{"-proxy-id", "nope", "-http-addr", consul.Addr, "-haproxy-bin", haproxy}, `no service registration "nope"`},
		{"not a proxy", []string{"-proxy-id", "web", "-http-addr", consul.Addr, "-haproxy-bin", haproxy}, "is not a connect-proxy"},
		{"both selectors", []string{"-sidecar-for", "web", "-proxy-id", "x"}, "exactly one of"},
		{"world-writable state dir", []string{"-sidecar-for", "web", "-http-addr", consul.Addr, "-haproxy-bin", haproxy, "-state-dir", worldWritable}, "writable by its group or by others"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := tt.args
			if !slices.Contains(args, "-state-dir") {
				args = append(args, "-state-dir", testenv.ShortTempDir(t))
			}
			cmd := exec.Command(sidecarBin, args...)
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() == 0 {
				t.Fatalf("exit: %v, want non-zero\n%s", err, out)
			}
			last := strings.TrimSpace(string(out))
			if i := strings.LastIndex(last, "\n"); i >= 0 {
				last = last[i+1:]
			}
			if !strings.HasPrefix(last, "haproxy-connect: ") || !strings.Contains(last, tt.want) {
				t.Errorf("last line %q, want one line containing %q\nall output:\n%s", last, tt.want, out)
			}
		})
	}
}
