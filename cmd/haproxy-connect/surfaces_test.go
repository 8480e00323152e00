package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// TestSurfaces: the stats address serves metrics and health but never
// profiles; /debug/pprof answers only on -pprof-addr; the SPOE agent
// listens on a 0600 unix socket in the state dir, which HAProxy uses.
func TestSurfaces(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{})
	ports := testenv.FreePorts(t, 3)
	register(t, consul.Client, "web", ports[0], ports[1], nil)
	pprofAddr := fmt.Sprintf("127.0.0.1:%d", ports[2])
	s := startSidecar(t, consul, "web", "-pprof-addr", pprofAddr)

	status := func(url string) int {
		t.Helper()
		resp, err := http.Get(url)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	tests := []struct {
		url  string
		want int
	}{
		{"http://" + s.stats + "/metrics", 200},
		{"http://" + s.stats + "/readyz", 200},
		{"http://" + s.stats + "/debug/pprof/", 404},
		{"http://" + s.stats + "/debug/pprof/profile?seconds=1", 404},
		{"http://" + s.stats + "/debug/pprof/goroutine?debug=2", 404},
		{"http://" + pprofAddr + "/debug/pprof/", 200},
		{"http://" + pprofAddr + "/debug/pprof/goroutine?debug=1", 200},
		{"http://" + pprofAddr + "/metrics", 404},
	}
	for _, tt := range tests {
		if got := status(tt.url); got != tt.want {
			t.Errorf("GET %s: status %d, want %d", tt.url, got, tt.want)
		}
	}

	// A client that never finishes its headers is cut off (read-header
	// timeout), instead of holding a connection and a goroutine.
	slow, err := net.Dial("tcp", s.stats)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	if _, err := io.WriteString(slow, "GET /metrics HTTP/1.1\r\nHost: x\r\n"); err != nil {
		t.Fatal(err)
	}
	_ = slow.SetReadDeadline(time.Now().Add(4 * httpReadHeaderTimeout))
	if n, err := io.Copy(io.Discard, slow); err != nil {
		t.Errorf("stats server kept a connection with unfinished headers open (%d bytes read): %v", n, err)
	}

	sock := filepath.Join(s.stateDir, "spoa.sock")
	fi, err := os.Lstat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Errorf("%s: mode %v, want a socket with 0600", sock, fi.Mode())
	}
	cfg, err := os.ReadFile(filepath.Join(s.stateDir, "haproxy.cfg"))
	if err != nil {
		t.Fatal(err)
	}
	if want := "    server agent unix@" + sock + "\n"; !strings.Contains(string(cfg), want) {
		t.Errorf("haproxy.cfg has no line %q", want)
	}
}

// TestEndpointLimit: an upstream with more passing endpoints than
// -max-endpoints gets that many, a subset of Consul's, with a log line and
// a counter; requests keep succeeding through the cut and after it.
func TestEndpointLimit(t *testing.T) {
	m := startMesh(t, testenv.ConsulOptions{}, "http", "-max-endpoints", "3")
	eventually(t, 10*time.Second, "client sidecar has the server endpoint", m.client.inBackend("up_server", m.ports[0]))
	stopLoad := load(get200(m.ports[3]))
	for i := range 5 {
		addServerEndpoint(t, m.c, fmt.Sprintf("server-extra-%d", i), m.ports[0])
	}
	// The watch logs the cut of the full list before the loop applies it.
	eventually(t, 10*time.Second, "the cut of the full list logged", func() error {
		if !strings.Contains(m.client.out.String(), `"upstream": "up_server", "endpoints": 6, "kept": 3`) {
			return errors.New("no log line for the cut of up_server from 6 to 3 endpoints")
		}
		return nil
	})
	if v, err := m.client.metric("haproxy_connect_endpoint_limit_hits_total"); err != nil || v == 0 {
		t.Errorf("limit hits %v, %v; want some", v, err)
	}
	entries, _, err := m.c.Health().Connect("server", "", true, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 6 {
		t.Fatalf("consul lists %d passing endpoints, want 6", len(entries))
	}
	// Three servers in service, each one of Consul's endpoints.
	inService := func() error {
		got, err := m.client.inService("up_server")
		if err != nil {
			return err
		}
		for _, k := range got {
			if !slices.ContainsFunc(entries, func(e *api.ServiceEntry) bool { return fmt.Sprintf("127.0.0.1:%d", e.Service.Port) == k }) {
				return fmt.Errorf("server %s in service is not one of Consul's passing endpoints", k)
			}
		}
		if len(got) != 3 {
			return fmt.Errorf("%d servers in service (%v), want 3", len(got), got)
		}
		return nil
	}
	eventually(t, 10*time.Second, "3 of Consul's 6 endpoints in service", inService)
	// Traffic through the cut and after it: 200 more requests.
	for range 200 {
		if err := get200(m.ports[3])(); err != nil {
			t.Fatalf("after the cut: %v", err)
		}
	}
	if err := inService(); err != nil {
		t.Error(err)
	}
	ok, failed, first := stopLoad()
	if failed != 0 {
		t.Errorf("%d of %d requests failed during the cut: %v", failed, ok+failed, first)
	}
}
