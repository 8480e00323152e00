package bootstrap

import (
	"errors"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/l7"
	"github.com/haproxy-connect/haproxy-connect/slots"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// goldenState is the state directory the golden files are rendered with; the
// haproxy -c check substitutes a real directory.
const goldenState = "/state"

func baseSpec() Spec {
	return Spec{
		Service:       "web",
		LeafFile:      goldenState + "/leaf.pem",
		RootsFile:     goldenState + "/roots.pem",
		SPOEFile:      goldenState + "/spoe.cfg",
		AuthzMap:      goldenState + "/authz.map",
		L7Map:         goldenState + "/l7.map",
		SourcesMap:    goldenState + "/sources.map",
		CrtList:       goldenState + "/public.crtlist",
		SNI:           "web.default.dc1.internal.11111111-2222-3333-4444-555555555555.consul",
		SPOASocket:    goldenState + "/spoa.sock",
		HardStopAfter: 30 * time.Second,
		Public: Public{
			BindAddr: "0.0.0.0", BindPort: 21000, Protocol: "tcp",
			LocalAddr: "127.0.0.1", LocalPort: 8080,
		},
	}
}

func upstream(dest string, port int, protocol string, n int, used ...slots.Endpoint) Upstream {
	name, err := UpstreamName(dest, "")
	if err != nil {
		panic(err)
	}
	_, table, _ := slots.Plan(slots.New(name, SlotPrefix, n), used)
	return Upstream{Name: name, Destination: dest, BindAddr: "127.0.0.1", BindPort: port, Protocol: protocol, Slots: table}
}

func goldenSpecs() map[string]Spec {
	tcpOnly := baseSpec()

	http := baseSpec()
	http.Public.Protocol = "http"
	http.Public.ConnectTimeout = 1500 * time.Millisecond
	http.AccessLog = true
	http.Threads = 2
	http.InstanceMap = goldenState + "/instances.map"
	http.StateMap = goldenState + "/state.map"
	http.Reason = "registration: upstream up_db added; CA roots changed"
	http.ConfigID = "c0ffee-1"
	// Access logs on: the exporter's frontend logs nothing anyway.
	http.ExporterSocket = goldenState + "/exporter.sock"
	db := upstream("db", 9192, "tcp", 8)
	db.ConnectTimeout = 250 * time.Millisecond
	db.ServerID = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/db"
	api := upstream("api", 9191, "http", 8,
		slots.Endpoint{Addr: "10.0.0.1", Port: 21000, Weight: 1},
		slots.Endpoint{Addr: "10.0.0.2", Port: 21000, Weight: 5})
	api.ServerID = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/api"
	// One instance ID HAProxy may see, one it may not.
	api.Instances = map[string]string{"10.0.0.1:21000": "api-1-sidecar-proxy", "10.0.0.2:21000": "api 2;@1 reload"}
	grpcSvc := upstream("grpc-svc", 9193, "grpc", 4, slots.Endpoint{Addr: "fd00::7", Port: 21000, Weight: 1})
	grpcSvc.Instances = map[string]string{"[fd00::7]:21000": "grpc-a"}
	http.Upstreams = []Upstream{api, db, grpcSvc}

	// A gRPC service: its application is reached over h2c.
	grpc := baseSpec()
	grpc.Service = "greeter"
	grpc.Public.Protocol = "grpc"
	grpc.AccessLog = true
	grpc.Upstreams = []Upstream{
		upstream("files", 9194, "http2", 2, slots.Endpoint{Addr: "10.0.0.9", Port: 21000, Weight: 1}),
	}

	// Freed slots in the middle render as several template ranges.
	holes := baseSpec()
	u := upstream("api", 9191, "tcp", 8,
		slots.Endpoint{Addr: "10.0.0.1", Port: 1, Weight: 1}, slots.Endpoint{Addr: "10.0.0.2", Port: 2, Weight: 1},
		slots.Endpoint{Addr: "10.0.0.3", Port: 3, Weight: 1}, slots.Endpoint{Addr: "10.0.0.4", Port: 4, Weight: 1})
	_, u.Slots, _ = slots.Plan(u.Slots, []slots.Endpoint{{Addr: "10.0.0.1", Port: 1, Weight: 1}, {Addr: "10.0.0.3", Port: 3, Weight: 1}})
	holes.Upstreams = []Upstream{u}
	holes.Public.BindAddr = "::"

	// Every proxy config key and registration feature of issue 14 on an
	// HTTP sidecar: timeouts and limits of the local app, passive health
	// checks, an upstream on a unix socket, and two expose paths.
	limits := baseSpec()
	limits.Public.Protocol = "http"
	limits.Public.RequestTimeout, limits.Public.IdleTimeout = 2*time.Second, 30*time.Second
	limits.Public.MaxInbound = 1000
	limits.Public.Limits = Limits{MaxConnections: 8, MaxPendingRequests: 16, MaxConcurrentRequests: 4}
	checked := upstream("api", 9191, "http", 2, slots.Endpoint{Addr: "10.0.0.1", Port: 21000, Weight: 1})
	checked.Passive = PassiveCheck{Interval: 10 * time.Second, MaxFailures: 5}
	checked.Limits = Limits{MaxConnections: 100, MaxPendingRequests: 10, MaxConcurrentRequests: 50}
	sock := upstream("db", 0, "tcp", 2)
	sock.BindAddr, sock.SocketPath, sock.SocketMode = "", "/run/app/db.sock", "0660"
	sock.Passive = PassiveCheck{Interval: time.Second, MaxFailures: 3}
	sock.Limits = Limits{MaxConnections: 20, MaxConcurrentRequests: 5}
	limits.Upstreams = []Upstream{checked, sock}
	limits.Expose = []ExposePath{
		{ListenerPort: 21500, Path: "/health", LocalPort: 8080, Protocol: "http"},
		{ListenerPort: 21501, Path: "/grpc.health.v1.Health/Check", LocalPort: 8081, Protocol: "http2"},
	}

	// A tcp application on a unix socket, its connections limited.
	unix := baseSpec()
	unix.Public.LocalAddr, unix.Public.LocalPort, unix.Public.LocalSocket = "", 0, "/run/app/web.sock"
	unix.Public.RequestTimeout = time.Second // HTTP only: not rendered
	unix.Public.Limits = Limits{MaxConnections: 2, MaxPendingRequests: 1, MaxConcurrentRequests: 1}

	return map[string]Spec{"tcp_no_upstreams": tcpOnly, "http_three_upstreams": http, "slot_holes_ipv6_bind": holes, "grpc_http2_upstream": grpc,
		"http_limits_expose_unix_upstream": limits, "tcp_local_socket_limits": unix}
}

// render returns the HAProxy config and the SPOE file for spec.
func render(t *testing.T, spec Spec) (cfg, spoe string) {
	t.Helper()
	cfg, err := Render(spec)
	if err != nil {
		t.Fatal(err)
	}
	spoe, err = RenderSPOE(spec)
	if err != nil {
		t.Fatal(err)
	}
	return cfg, spoe
}

func TestRenderGolden(t *testing.T) {
	for name, spec := range goldenSpecs() {
		t.Run(name, func(t *testing.T) {
			cfg, spoe := render(t, spec)
			crtList, err := RenderCrtList(spec)
			if err != nil {
				t.Fatal(err)
			}
			goldens := map[string]string{name + ".golden": cfg, name + ".spoe.golden": spoe, name + ".crtlist.golden": crtList}
			if spec.InstanceMap != "" {
				goldens[name+".instances.golden"] = RenderInstanceMap(spec)
				goldens[name+".state.golden"] = RenderStateMap(spec)
			}
			for file, got := range goldens {
				checkGolden(t, file, got)
			}
		})
	}
}

// sampleL7 is an L7 intention compiled for the L7 map, with every kind of
// entry: allow, deny, for the agent, the default.
func sampleL7(t testing.TB) l7.Compiled {
	t.Helper()
	in, err := l7.Parse("api", []*api.IntentionPermission{
		{Action: api.IntentionActionDeny, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/admin.x", Methods: []string{"POST", "DELETE"}}},
		{Action: api.IntentionActionAllow, HTTP: &api.IntentionHTTPPermission{PathExact: "/v1/(a)+$*"}},
		{Action: api.IntentionActionAllow, HTTP: &api.IntentionHTTPPermission{PathRegex: "/x/.*"}},
		{Action: api.IntentionActionDeny, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/h", Header: []api.IntentionHTTPHeaderPermission{{Name: "X-A", Present: true}}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return in.Compile(false)
}

// checkGolden compares got with testdata/file, after writing it there
// with -update.
func checkGolden(t *testing.T, file, got string) {
	t.Helper()
	path := filepath.Join("testdata", file)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./bootstrap -update)", err)
	}
	if diff := cmp.Diff(string(want), got); diff != "" {
		t.Errorf("%s (-golden +rendered):\n%s", file, diff)
	}
}

// haproxyCheck runs haproxy -c on cfg (rendered for goldenState) in a new
// state directory holding real certificates, the authz, L7 and sources
// maps, and
// files (name: content, rendered for goldenState too); it fails t on an
// error, a warning or an alert.
func haproxyCheck(t *testing.T, cfg string, files map[string]string) {
	t.Helper()
	ca := testenv.NewCA(t, "test root")
	cert, key := ca.Leaf(t, "spiffe://test.consul/ns/default/dc/dc1/svc/web")
	dir := t.TempDir()
	local := func(s string) string { return strings.ReplaceAll(s, goldenState+"/", dir+"/") }
	testenv.WriteFile(t, dir, "leaf.pem", cert+key)
	testenv.WriteFile(t, dir, "roots.pem", ca.CertPEM)
	testenv.WriteFile(t, dir, "authz.map", RenderAuthzMap(0))
	testenv.WriteFile(t, dir, "l7.map", l7.MapContent(sampleL7(t).Entries))
	testenv.WriteFile(t, dir, "sources.map", "")
	for name, content := range files {
		testenv.WriteFile(t, dir, name, local(content))
	}
	path := testenv.WriteFile(t, dir, "haproxy.cfg", local(cfg))
	out, err := exec.Command(testenv.HAProxyBin(t), "-c", "-f", path).CombinedOutput()
	if err != nil || strings.Contains(string(out), "[WARNING]") || strings.Contains(string(out), "[ALERT]") {
		t.Fatalf("haproxy -c: %v\n%s", err, out)
	}
}

// TestGoldenFilesPassHAProxyCheck runs haproxy -c on every golden
// configuration, with its golden SPOE file and real certificates in place.
func TestGoldenFilesPassHAProxyCheck(t *testing.T) {
	for name := range goldenSpecs() {
		t.Run(name, func(t *testing.T) {
			read := func(file string) string {
				b, err := os.ReadFile(filepath.Join("testdata", file))
				if err != nil {
					t.Fatal(err)
				}
				return string(b)
			}
			files := map[string]string{"spoe.cfg": read(name + ".spoe.golden"), "public.crtlist": read(name + ".crtlist.golden")}
			if spec := goldenSpecs()[name]; spec.InstanceMap != "" {
				files["instances.map"] = read(name + ".instances.golden")
				files["state.map"] = read(name + ".state.golden")
			}
			haproxyCheck(t, read(name+".golden"), files)
		})
	}
}

func TestValidateRejects(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*Spec)
	}{
		{"newline in upstream name", func(s *Spec) { s.Upstreams[0].Name = "up_x\n    server evil 1.2.3.4:80" }},
		{"space in destination", func(s *Spec) { s.Upstreams[0].Destination = "a b" }},
		{"hostname bind", func(s *Spec) { s.Upstreams[0].BindAddr = "localhost" }},
		{"bind port out of range", func(s *Spec) { s.Upstreams[0].BindPort = 70000 }},
		{"bind port zero", func(s *Spec) { s.Upstreams[0].BindPort = 0 }},
		{"unknown protocol", func(s *Spec) { s.Upstreams[0].Protocol = "tcp\nglobal" }},
		{"negative timeout", func(s *Spec) { s.Upstreams[0].ConnectTimeout = -time.Second }},
		{"duplicate bind", func(s *Spec) { s.Upstreams[0].BindPort = 21000; s.Upstreams[0].BindAddr = "0.0.0.0" }},
		{"duplicate upstream", func(s *Spec) { s.Upstreams = append(s.Upstreams, s.Upstreams[0]) }},
		{"public local address", func(s *Spec) { s.Public.LocalAddr = "127.0.0.1 check" }},
		{"relative leaf file", func(s *Spec) { s.LeafFile = "leaf.pem" }},
		{"file with space", func(s *Spec) { s.RootsFile = "/a b.pem" }},
		{"relative crt-list", func(s *Spec) { s.CrtList = "public.crtlist" }},
		{"no SNI", func(s *Spec) { s.SNI = "" }},
		{"wildcard SNI", func(s *Spec) { s.SNI = "*" }},
		{"SNI with an option", func(s *Spec) { s.SNI = "web.consul [verify none]" }},
		{"SNI with a newline", func(s *Spec) { s.SNI = "web.consul\n/etc/other.pem" }},
		{"negated SNI", func(s *Spec) { s.SNI = "!web.consul" }},
		{"spoe agent on tcp", func(s *Spec) { s.SPOASocket = "127.0.0.1:21999" }},
		{"spoe socket relative", func(s *Spec) { s.SPOASocket = "spoa.sock" }},
		{"spoe socket with space", func(s *Spec) { s.SPOASocket = "/state/spoa.sock check" }},
		{"spoe socket with newline", func(s *Spec) { s.SPOASocket = "/state/spoa.sock\nprogram x" }},
		{"spoe socket too long", func(s *Spec) { s.SPOASocket = "/" + strings.Repeat("d", MaxSocketPath) }},
		{"exporter socket relative", func(s *Spec) { s.ExporterSocket = "exporter.sock" }},
		{"exporter socket with newline", func(s *Spec) { s.ExporterSocket = "/state/exporter.sock\nprogram x" }},
		{"exporter socket too long", func(s *Spec) { s.ExporterSocket = "/" + strings.Repeat("d", MaxSocketPath) }},
		{"slot endpoint hostname", func(s *Spec) { s.Upstreams[0].Slots.Slots[0].Addr = "evil host" }},
		{"slot endpoint zone with a program section", func(s *Spec) {
			s.Upstreams[0].Slots.Slots[0].Addr = "fe80::1%lo]:80\nprogram pwn\n command /bin/true"
		}},
		{"slot endpoint ipv4-mapped", func(s *Spec) { s.Upstreams[0].Slots.Slots[0].Addr = "::ffff:10.0.0.1" }},
		{"slot endpoint weight", func(s *Spec) { s.Upstreams[0].Slots.Slots[0].Weight = 257 }},
		{"bind zone", func(s *Spec) { s.Upstreams[0].BindAddr = "fe80::1%x;y" }},
		{"public bind upper case", func(s *Spec) { s.Public.BindAddr = "FD00::1" }},
		{"service with newline", func(s *Spec) { s.Service = "web\nprogram pwn" }},
		{"slot table of another backend", func(s *Spec) { s.Upstreams[0].Slots.Backend = "up_other" }},
		{"no hard stop", func(s *Spec) { s.HardStopAfter = 0 }},
		{"negative threads", func(s *Spec) { s.Threads = -1 }},
		{"threads over haproxy's limit", func(s *Spec) { s.Threads = MaxThreads + 1 }},
		{"instance map relative", func(s *Spec) { s.InstanceMap = "instances.map" }},
		{"state map with a space", func(s *Spec) { s.StateMap = "/state/state.map x" }},
		{"sources map ending the line", func(s *Spec) {
			s.Public.Protocol, s.SourcesMap = "http", "/state/sources.map) %[src] x\n    http-request set-var(sess.hc.allowed) bool(1)"
		}},
		{"config ID with a newline", func(s *Spec) { s.ConfigID = "c1\nprogram p" }},
		{"upstream socket relative", func(s *Spec) { s.Upstreams[0].SocketPath = "db.sock" }},
		{"upstream socket with a space", func(s *Spec) { s.Upstreams[0].SocketPath = "/run/db.sock mode 777" }},
		{"upstream socket with a newline", func(s *Spec) { s.Upstreams[0].SocketPath = "/run/db.sock\nprogram p" }},
		{"upstream socket too long", func(s *Spec) { s.Upstreams[0].SocketPath = "/" + strings.Repeat("d", MaxSocketPath) }},
		{"upstream socket mode not octal", func(s *Spec) { s.Upstreams[0].SocketPath, s.Upstreams[0].SocketMode = "/run/db.sock", "0999" }},
		{"upstream socket mode injected", func(s *Spec) { s.Upstreams[0].SocketPath, s.Upstreams[0].SocketMode = "/run/db.sock", "600 user root" }},
		{"two upstreams on one socket", func(s *Spec) {
			u := upstream("other", 9999, "tcp", 1)
			s.Upstreams[0].SocketPath, u.SocketPath = "/run/a.sock", "/run/a.sock"
			s.Upstreams = append(s.Upstreams, u)
		}},
		{"local socket relative", func(s *Spec) { s.Public.LocalSocket = "web.sock" }},
		{"local socket with a newline", func(s *Spec) { s.Public.LocalSocket = "/run/web.sock\nprogram p" }},
		{"request timeout over a day", func(s *Spec) { s.Public.RequestTimeout = 25 * time.Hour }},
		{"negative idle timeout", func(s *Spec) { s.Public.IdleTimeout = -time.Second }},
		{"negative max inbound", func(s *Spec) { s.Public.MaxInbound = -1 }},
		{"max connections too large", func(s *Spec) { s.Public.Limits.MaxConnections = MaxLimit + 1 }},
		{"negative max pending", func(s *Spec) { s.Public.Limits.MaxPendingRequests = -1 }},
		{"upstream limit negative", func(s *Spec) { s.Upstreams[0].Limits.MaxConcurrentRequests = -1 }},
		{"passive check without interval", func(s *Spec) { s.Upstreams[0].Passive = PassiveCheck{MaxFailures: 3} }},
		{"passive check failures too many", func(s *Spec) {
			s.Upstreams[0].Passive = PassiveCheck{Interval: time.Second, MaxFailures: MaxFailures + 1}
		}},
		{"expose path with a space", func(s *Spec) { s.Expose = []ExposePath{{ListenerPort: 21500, Path: "/a b", LocalPort: 8080}} }},
		{"expose path with a brace", func(s *Spec) { s.Expose = []ExposePath{{ListenerPort: 21500, Path: "/a}", LocalPort: 8080}} }},
		{"expose path relative", func(s *Spec) { s.Expose = []ExposePath{{ListenerPort: 21500, Path: "health", LocalPort: 8080}} }},
		{"expose port out of range", func(s *Spec) { s.Expose = []ExposePath{{ListenerPort: 70000, Path: "/h", LocalPort: 8080}} }},
		{"expose local port zero", func(s *Spec) { s.Expose = []ExposePath{{ListenerPort: 21500, Path: "/h"}} }},
		{"expose protocol grpc", func(s *Spec) {
			s.Expose = []ExposePath{{ListenerPort: 21500, Path: "/h", LocalPort: 8080, Protocol: "grpc"}}
		}},
		{"expose on the public port", func(s *Spec) { s.Expose = []ExposePath{{ListenerPort: 21000, Path: "/h", LocalPort: 8080}} }},
		{"two expose paths on one port", func(s *Spec) {
			s.Expose = []ExposePath{{ListenerPort: 21500, Path: "/h", LocalPort: 8080}, {ListenerPort: 21500, Path: "/m", LocalPort: 8080}}
		}},
		{"server identity not a SPIFFE ID", func(s *Spec) { s.Upstreams[0].ServerID = "spiffe://td/ns/default/dc/dc1/svc/x\nprogram p" }},
		{"server identity service name too long", func(s *Spec) {
			s.Upstreams[0].ServerID = "spiffe://td/ns/default/dc/dc1/svc/" + strings.Repeat("x", 64)
		}},
		{"server identity partition too long", func(s *Spec) {
			s.Upstreams[0].ServerID = "spiffe://td/ap/" + strings.Repeat("p", 64) + "/ns/default/dc/dc1/svc/x"
		}},
		{"server identity trust domain too long", func(s *Spec) {
			s.Upstreams[0].ServerID = "spiffe://" + strings.Repeat("t", 254) + "/ns/default/dc/dc1/svc/x"
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := baseSpec()
			s.Upstreams = []Upstream{upstream("api", 9191, "tcp", 2, slots.Endpoint{Addr: "10.0.0.1", Port: 80, Weight: 1})}
			tt.mutate(&s)
			if _, err := Render(s); !errors.Is(err, ErrInvalid) {
				t.Fatalf("Render: got %v, want ErrInvalid", err)
			}
		})
	}
}

func TestUpstreamName(t *testing.T) {
	for _, tt := range []struct{ dest, dc, want string }{
		{"web", "", "up_web"}, {"web", "dc2", "up_web_dc2"}, {"a.b-c_d", "", "up_a.b-c_d"},
	} {
		if got, err := UpstreamName(tt.dest, tt.dc); err != nil || got != tt.want {
			t.Errorf("UpstreamName(%q, %q) = %q, %v; want %q", tt.dest, tt.dc, got, err, tt.want)
		}
	}
	for _, bad := range []string{"", "a b", "a;b", "a\nb", "-x", "a/b", "a{b}", strings.Repeat("x", 64)} {
		if _, err := UpstreamName(bad, ""); !errors.Is(err, ErrInvalid) {
			t.Errorf("UpstreamName(%q) accepted", bad)
		}
	}
}

func TestRenderFiles(t *testing.T) {
	spec := baseSpec()
	cfg, files, err := RenderFiles(spec, 7)
	if err != nil {
		t.Fatal(err)
	}
	wantCfg, wantSPOE := render(t, spec)
	wantCrtList, err := RenderCrtList(spec)
	if err != nil {
		t.Fatal(err)
	}
	want := []File{{spec.SPOEFile, wantSPOE}, {spec.CrtList, wantCrtList}, {spec.AuthzMap, "gen 7\n"}, {spec.SourcesMap, ""}}
	withMaps := spec
	withMaps.InstanceMap, withMaps.StateMap, withMaps.Reason = "/state/instances.map", "/state/state.map", "start"
	_, mapFiles, err := RenderFiles(withMaps, 7)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(append(want[:3:3], File{"/state/instances.map", ""}, File{"/state/state.map", "reload_reason start\n"}, want[3]), mapFiles); diff != "" {
		t.Errorf("files with the maps (-want +got):\n%s", diff)
	}
	if cfg != wantCfg {
		t.Errorf("configuration differs from Render's")
	}
	if diff := cmp.Diff(want, files); diff != "" {
		t.Errorf("files (-want +got):\n%s", diff)
	}
	spec.CrtList = "relative"
	if _, _, err := RenderFiles(spec, 0); !errors.Is(err, ErrInvalid) {
		t.Errorf("an invalid spec: %v, want ErrInvalid", err)
	}
}

// TestPublicBindVerifiesClients pins the contract the SPOE agent relies on
// (spoa: served.go): every configuration's public listener requires a
// client certificate that verifies against the roots file, and nothing
// lets a failed verification through.
func TestPublicBindVerifiesClients(t *testing.T) {
	for name, spec := range goldenSpecs() {
		t.Run(name, func(t *testing.T) {
			cfg, _ := render(t, spec)
			crtList, err := RenderCrtList(spec)
			if err != nil {
				t.Fatal(err)
			}
			var bind string
			for _, l := range strings.Split(cfg, "\n") {
				if f := strings.Fields(l); len(f) > 1 && f[0] == "bind" && strings.Contains(l, " crt-list ") {
					if bind != "" {
						t.Fatalf("two public binds:\n%s\n%s", bind, l)
					}
					bind = l
				}
			}
			for what, line := range map[string]string{"public bind": bind, "crt-list": crtList} {
				if !strings.Contains(line, "verify required") || !strings.Contains(line, "ca-file "+spec.RootsFile) {
					t.Errorf("%s %q: want verify required and ca-file %s", what, line, spec.RootsFile)
				}
				for _, bad := range []string{"ignore-err", "verify none", "verify optional"} {
					if strings.Contains(line, bad) {
						t.Errorf("%s %q has %q", what, line, bad)
					}
				}
			}
		})
	}
}

// TestLocalAppLimits: the local app's "timeout server" and maxconn are the
// lower of the keys that bound them, and HTTP-only keys stay off in tcp.
func TestLocalAppLimits(t *testing.T) {
	tests := []struct {
		name          string
		p             Public
		timeout       time.Duration
		maxconn       int
		upstreamLimit int
	}{
		{"nothing set", Public{Protocol: "http"}, 0, 0, 0},
		{"request timeout", Public{Protocol: "http", RequestTimeout: 2 * time.Second}, 2 * time.Second, 0, 0},
		{"idle shorter", Public{Protocol: "http", RequestTimeout: 2 * time.Second, IdleTimeout: time.Second}, time.Second, 0, 0},
		{"idle alone", Public{Protocol: "grpc", IdleTimeout: time.Second}, time.Second, 0, 0},
		{"tcp ignores timeouts and concurrency", Public{Protocol: "tcp", RequestTimeout: time.Second, Limits: Limits{MaxConnections: 5, MaxConcurrentRequests: 2}}, 0, 5, 5},
		{"concurrency lower", Public{Protocol: "http", Limits: Limits{MaxConnections: 5, MaxConcurrentRequests: 2}}, 0, 2, 2},
		{"connections lower", Public{Protocol: "http", Limits: Limits{MaxConnections: 3, MaxConcurrentRequests: 8}}, 0, 3, 3},
		{"concurrency alone", Public{Protocol: "http2", Limits: Limits{MaxConcurrentRequests: 8}}, 0, 8, 8},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := localServerTimeout(tt.p); got != tt.timeout {
				t.Errorf("timeout server %s, want %s", got, tt.timeout)
			}
			if got := localMaxConn(tt.p); got != tt.maxconn {
				t.Errorf("maxconn %d, want %d", got, tt.maxconn)
			}
			if got := upstreamMaxActive(tt.p.Limits, Mode(tt.p.Protocol)); got != tt.upstreamLimit {
				t.Errorf("upstream limit %d, want %d", got, tt.upstreamLimit)
			}
		})
	}
}

// TestCheckServerIDLengths: names at their longest pass.
func TestCheckServerIDLengths(t *testing.T) {
	for _, id := range []string{
		"spiffe://td/ns/default/dc/dc1/svc/" + strings.Repeat("x", 63),
		"spiffe://td/ap/" + strings.Repeat("p", 63) + "/ns/" + strings.Repeat("n", 63) + "/dc/" + strings.Repeat("d", 63) + "/svc/x",
		"spiffe://" + strings.Repeat("t", 253) + "/ns/default/dc/dc1/svc/x",
	} {
		if err := CheckServerID(id); err != nil {
			t.Errorf("%s: %v", id, err)
		}
	}
}
