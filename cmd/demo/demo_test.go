package main

import (
	"bytes"
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// TestScriptedDemo runs the demo's scripted path (deny by default, allow,
// the client app through the mesh, deny again) on free ports, with the real
// consul, haproxy and a freshly built haproxy-connect.
func TestScriptedDemo(t *testing.T) {
	consul, haproxy := testenv.ConsulBin(t), testenv.HAProxyBin(t)
	bin := filepath.Join(t.TempDir(), "haproxy-connect")
	if out, err := exec.Command("go", "build", "-o", bin, "../haproxy-connect").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	ports := testenv.FreePorts(t, 10)
	var out bytes.Buffer
	d := &Demo{ConsulBin: consul, SidecarBin: bin, HAProxyBin: haproxy, Dir: testenv.ShortTempDir(t), Out: &out,
		Ports: Ports{Consul: ports[0], ConsulServer: ports[8], ConsulSerf: ports[9], Web: ports[1], WebSidecar: ports[2], Client: ports[3], ClientSidecar: ports[4], Upstream: ports[5], WebStats: ports[6], ClientStats: ports[7]}}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if err := d.Run(ctx, true); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	for _, want := range []string{"denied by default: ok", "allowed after the allow intention: ok", "client app calls web through the mesh: ok", "denied again after the deny intention: ok"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out.String())
		}
	}
}
