package main

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

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

// TestStartSaysWhatItWaitsFor: a sidecar whose leaf certificate Consul does
// not answer for (its requests held in front of a real agent) serves
// nothing and says, every few seconds, that it waits for the leaf and
// for nothing else; once Consul answers, it starts and becomes ready.
func TestStartSaysWhatItWaitsFor(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{})
	ports := testenv.FreePorts(t, 2)
	register(t, consul.Client, "web", ports[0], ports[1], nil)
	agent, err := url.Parse("http://" + consul.Addr)
	if err != nil {
		t.Fatal(err)
	}
	forward := httputil.NewSingleHostReverseProxy(agent)
	// Blocking queries end cancelled when the sidecar stops: not news.
	forward.ErrorHandler = func(w http.ResponseWriter, _ *http.Request, _ error) { w.WriteHeader(http.StatusBadGateway) }
	hold := make(chan struct{})
	var held atomic.Int32
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/v1/agent/connect/ca/leaf/") {
			held.Add(1)
			select {
			case <-hold:
			case <-r.Context().Done():
				return
			}
		}
		forward.ServeHTTP(w, r)
	}))
	t.Cleanup(front.Close)
	// The last -http-addr wins: the sidecar talks to Consul through front.
	s := launchSidecar(t, consul, "web", testenv.ShortTempDir(t), "-http-addr", strings.TrimPrefix(front.URL, "http://"))
	eventually(t, 20*time.Second, "the sidecar says it waits for the leaf", func() error {
		if !strings.Contains(s.out.String(), `haproxy not started: still waiting for Consul	{"waiting_for": ["leaf certificate"]`) {
			return fmt.Errorf("not logged yet (%d leaf requests held)", held.Load())
		}
		return nil
	})
	if resp, err := s.http.Get("http://" + s.stats + "/readyz"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Fatal("ready without a leaf certificate")
		}
	}
	close(hold)
	s.waitReady(t)
}
