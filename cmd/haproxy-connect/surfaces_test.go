package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

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
