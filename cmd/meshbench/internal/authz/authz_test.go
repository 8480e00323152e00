package authz

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
)

func TestWithoutSPOE(t *testing.T) {
	for _, proto := range []string{"tcp", "http"} {
		t.Run(proto, func(t *testing.T) {
			spec := bootstrap.Spec{
				Service: "web", LeafFile: "/x/leaf.pem", RootsFile: "/x/roots.pem", SPOEFile: "/x/spoe.cfg", AuthzMap: "/x/authz.map",
				CrtList: "/x/public.crtlist", SNI: bootstrap.FallbackSNI,
				SPOASocket: "/x/spoa.sock", HardStopAfter: time.Second,
				Public: bootstrap.Public{BindAddr: "127.0.0.1", BindPort: 20000, Protocol: proto, LocalAddr: "127.0.0.1", LocalPort: 20001},
			}
			cfg, err := bootstrap.Render(spec)
			if err != nil {
				t.Fatal(err)
			}
			off, err := withoutSPOE(cfg)
			if err != nil {
				t.Fatal(err)
			}
			// Exactly the filter, the verdict rules and the inspect
			// delay go; everything else stays, in order.
			var want []string
			for _, l := range strings.Split(cfg, "\n") {
				if !strings.Contains(l, "filter spoe") && !strings.Contains(l, ".hc.allowed)") && !strings.Contains(l, "inspect-delay") &&
					!strings.Contains(l, "stick-table") && !strings.Contains(l, "track-sc0") && !strings.Contains(l, "authz_cached") && !strings.Contains(l, ".hc.cached") &&
					!strings.Contains(l, "hc.l7") {
					want = append(want, l)
				}
			}
			if got := strings.Join(want, "\n"); off != got || len(want) > len(strings.Split(cfg, "\n"))-2 {
				t.Errorf("got:\n%s\nwant:\n%s", off, got)
			}
			if _, err := withoutSPOE(off); err == nil {
				t.Error("a config without the filter passed")
			}
		})
	}
}

func TestSidecarAgentAddr(t *testing.T) {
	dir := t.TempDir()
	cfg := "frontend public_listener\n    mode tcp\n\nbackend local_app\n    server app 127.0.0.1:1\n\n" +
		"backend spoe_agents\n    mode tcp\n    server agent 127.0.0.1:43013\n\nfrontend up_x\n    bind 127.0.0.1:2\n"
	if err := os.WriteFile(filepath.Join(dir, "haproxy.cfg"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := sidecarAgentAddr(dir)
	if err != nil || got != "127.0.0.1:43013" {
		t.Errorf("got %q, %v", got, err)
	}
}
