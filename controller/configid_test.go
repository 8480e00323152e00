package controller

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap/zaptest"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/chain"
	"github.com/haproxy-connect/haproxy-connect/slots"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// TestConfigID: adoption reloads only when the configuration would differ
// apart from its slots, so the id ignores the slot assignment and the
// reason, and moves with everything else a reload would change.
func TestConfigID(t *testing.T) {
	ca := testenv.NewCA(t, "root")
	cert, key := ca.Leaf(t, "spiffe://td.consul/ns/default/dc/dc1/svc/web")
	leaf, err := certs.NewBundle(cert, key, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	newCtl := func(cfg Config) *Controller {
		cfg.Consul, cfg.ProxyID, cfg.StateDir, cfg.SPOASocket, cfg.Log = api.DefaultConfig(), "web-sidecar-proxy", "/state", "/state/spoa.sock", zaptest.NewLogger(t)
		c, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		c.desired.leaf, c.desired.roots = &leaf, &certs.Roots{PEM: ca.CertPEM, TrustDomain: "td.consul"}
		return c
	}
	base := newCtl(Config{})
	want := base.configID(*sidecar(up("db", 9000)), ca.CertPEM)
	if len(want) != 32 {
		t.Fatalf("configID %q", want)
	}
	tests := []struct {
		name  string
		c     *Controller
		sc    *Sidecar
		roots string
		same  bool
	}{
		{"identical", base, sidecar(up("db", 9000)), ca.CertPEM, true},
		{"another controller, same flags", newCtl(Config{}), sidecar(up("db", 9000)), ca.CertPEM, true},
		{"an upstream added", base, sidecar(up("db", 9000), up("cache", 9001)), ca.CertPEM, false},
		{"an upstream's port", base, sidecar(up("db", 9001)), ca.CertPEM, false},
		{"other roots", base, sidecar(up("db", 9000)), ca.CertPEM + "\n", false},
		{"other threads", newCtl(Config{Threads: 3}), sidecar(up("db", 9000)), ca.CertPEM, false},
		{"other hard-stop-after", newCtl(Config{HardStopAfter: time.Minute}), sidecar(up("db", 9000)), ca.CertPEM, false},
		{"access log on", newCtl(Config{AccessLog: true}), sidecar(up("db", 9000)), ca.CertPEM, false},
		{"a request timeout", base, with(sidecar(up("db", 9000)), func(sc *Sidecar) { sc.Public.RequestTimeout = time.Second }), ca.CertPEM, false},
		{"a local socket", base, with(sidecar(up("db", 9000)), func(sc *Sidecar) { sc.Public.LocalSocket = "/run/web.sock" }), ca.CertPEM, false},
		{"a connection limit", base, with(sidecar(up("db", 9000)), func(sc *Sidecar) { sc.Public.Limits.MaxConnections = 2 }), ca.CertPEM, false},
		{"an expose path", base, with(sidecar(up("db", 9000)), func(sc *Sidecar) {
			sc.Expose = []bootstrap.ExposePath{{ListenerPort: 21500, Path: "/health", LocalPort: 8080, Protocol: "http"}}
		}), ca.CertPEM, false},
		{"a passive check", base, with(sidecar(up("db", 9000)), func(sc *Sidecar) {
			sc.Upstreams[0].Passive = bootstrap.PassiveCheck{Interval: time.Second, MaxFailures: 2}
		}), ca.CertPEM, false},
		{"an upstream socket", base, with(sidecar(up("db", 9000)), func(sc *Sidecar) { sc.Upstreams[0].SocketPath = "/run/db.sock" }), ca.CertPEM, false},
		{"a note", base, with(sidecar(up("db", 9000)), func(sc *Sidecar) { sc.Notes = []Note{{Key: "config x"}} }), ca.CertPEM, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.c.configID(*tt.sc, tt.roots); (got == want) != tt.same {
				t.Errorf("configID %s, base %s: same = %v, want %v", got, want, got == want, tt.same)
			}
		})
	}
	// The slots rendered never matter.
	tables := map[string]slots.Table{"up_db": slots.New("up_db", "s", 64)}
	spec := base.spec(*sidecar(up("db", 9000)), tables)
	if len(spec.Upstreams[0].Slots.Slots) != 64 || base.configID(*sidecar(up("db", 9000)), ca.CertPEM) != want {
		t.Errorf("configID depends on the slot tables")
	}
}

// with returns sc changed by f.
func with(sc *Sidecar, f func(*Sidecar)) *Sidecar {
	f(sc)
	return sc
}

// TestConfigIDWithoutNewKeys: a sidecar that sets none of issue 14's keys
// has the spec JSON it had before them (their fields are left out of the
// JSON the id hashes), so an upgraded controller that renders the same
// configuration adopts the HAProxy the previous one left without a reload.
func TestConfigIDWithoutNewKeys(t *testing.T) {
	spec := bootstrap.Spec{Public: bootstrap.Public{BindAddr: "0.0.0.0", BindPort: 21000}, Upstreams: []bootstrap.Upstream{{Name: "up_db"}}}
	b, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	for _, field := range []string{"Expose", "LocalSocket", "RequestTimeout", "IdleTimeout", "MaxInbound", "Limits", "SocketPath", "SocketMode", "Passive"} {
		if strings.Contains(string(b), `"`+field+`"`) {
			t.Errorf("%s is in the JSON of a spec without it: %s", field, b)
		}
	}
}

// TestConfigIDHashesRendering: the id covers what this build renders, so
// a controller whose renderer changed reloads an HAProxy an earlier build
// left running; for every kind of sidecar the rendering succeeds and
// counts.
func TestConfigIDHashesRendering(t *testing.T) {
	leaf, roots := webLeaf(t)
	c, err := New(Config{Consul: api.DefaultConfig(), ProxyID: "web-sidecar-proxy", StateDir: "/state", SPOASocket: "/state/spoa.sock", Log: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	c.desired.leaf, c.desired.roots = &leaf, &roots
	c.desired.chains = map[string]*chain.Chain{"up_web": loadChain(t, "split", nil)}
	httpUp := up("web", 9191)
	httpUp.Protocol = "http"
	tcp := sidecar(up("db", 9000))
	tcp.Public.Protocol = "tcp"
	for name, sc := range map[string]*Sidecar{
		"http listener": sidecar(up("db", 9000)),
		"tcp listener":  tcp,
		"routed":        expand(sidecar(httpUp), c.desired.chains),
	} {
		t.Run(name, func(t *testing.T) {
			real := c.configID(*sc, roots.PEM)
			defer func(r func(bootstrap.Spec, uint64) (string, []bootstrap.File, error)) { renderForID = r }(renderForID)
			renderForID = func(bootstrap.Spec, uint64) (string, []bootstrap.File, error) {
				return "", nil, bootstrap.ErrInvalid
			}
			if specOnly := c.configID(*sc, roots.PEM); specOnly == real {
				t.Fatalf("configID %s does not cover the rendering (the same without it)", real)
			}
			renderForID = func(s bootstrap.Spec, gen uint64) (string, []bootstrap.File, error) {
				cfg, files, err := bootstrap.RenderFiles(s, gen)
				return cfg + "    # a rule a later build renders\n", files, err
			}
			if changed := c.configID(*sc, roots.PEM); changed == real {
				t.Errorf("configID %s did not move with the rendered configuration", real)
			}
		})
	}
}
