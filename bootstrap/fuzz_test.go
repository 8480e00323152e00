package bootstrap

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/slots"
)

// hostile are seeds for FuzzRender: IPv6 zones that end the line and
// open a section that runs a program at the next reload, ';', quotes,
// spaces, control bytes and non-ASCII.
var hostile = []string{
	"fe80::1%lo]:80\nprogram pwn\n command /bin/true",
	"fe80::1%x\n@1 set server local_app/app addr 127.0.0.9 port 9",
	"fe80::1%x;@1 reload",
	"10.0.0.1 check",
	"a'b\"c\\d#e",
	"a\rb\x00c",
	"wéb",
	"::ffff:1.2.3.4",
	"FD00::1",
	"010.0.0.1",
}

// FuzzRender feeds arbitrary strings and numbers into every field that can
// come from Consul. The oracle does not rely on Render's own line check:
// whatever the validation lets through (renderConfig) must already have only
// known line shapes, exactly one frontend and backend per upstream, and
// carry the endpoint and bind addresses unchanged; and Render must return
// the same text.
func FuzzRender(f *testing.F) {
	f.Add("web", "api", "127.0.0.1", 9191, "tcp", "10.0.0.1", 21000, 1, "127.0.0.1", 8080, "dc2", int64(250))
	f.Add("web", "api\n    server x 1.1.1.1:1", "::1", 1, "http", "fd00::1", 65535, 256, "::1", 1, "", int64(0))
	f.Add("w;b", "a b", "1.2.3.4 ", 0, "grpc\n", "10.0.0.1 port 1", 70000, 999, "localhost", -1, "dc 1", int64(-5))
	for _, h := range hostile {
		f.Add("web", "api", "127.0.0.1", 9191, "http", h, 21000, 1, "127.0.0.1", 8080, "", int64(0))
		f.Add("web", "api", h, 9191, "tcp", "10.0.0.1", 21000, 1, h, 8080, h, int64(0))
		f.Add(h, h, "127.0.0.1", 9191, h, "10.0.0.1", 0, 1, "127.0.0.1", 70000, "dc1", int64(1))
	}
	f.Fuzz(func(t *testing.T, service, dest, bindAddr string, bindPort int, protocol, epAddr string, epPort, weight int, localAddr string, localPort int, dc string, timeoutMS int64) {
		s := baseSpec()
		s.Service = service
		s.Public.LocalAddr, s.Public.LocalPort, s.Public.Protocol = localAddr, localPort, protocol
		s.Public.ConnectTimeout = time.Duration(timeoutMS) * time.Millisecond
		name, err := UpstreamName(dest, dc)
		if err != nil {
			name = "up_" + dest // let Render see the raw value too
		}
		_, table, _ := slots.Plan(slots.New(name, SlotPrefix, 4), []slots.Endpoint{{Addr: epAddr, Port: epPort, Weight: weight}})
		if len(table.Slots) > 0 && !table.Slots[0].Used {
			// Bypass the planner's own validation: Render must hold on its own.
			table.Slots[0] = slots.Slot{Name: "s1", Used: true, Addr: epAddr, Port: epPort, Weight: weight}
		}
		s.Upstreams = []Upstream{{Name: name, Destination: dest, BindAddr: bindAddr, BindPort: bindPort, Protocol: protocol,
			ConnectTimeout: time.Duration(timeoutMS) * time.Millisecond, Slots: table,
			// The instance ID and the reload reason come from Consul too.
			Instances: map[string]string{fuzzKey(epAddr, epPort): service}}}
		s.AccessLog, s.InstanceMap, s.StateMap, s.Reason = true, "/state/instances.map", "/state/state.map", dest
		raw, rawErr := renderConfig(s)
		out, err := Render(s)
		if rawErr != nil {
			if err == nil {
				t.Fatalf("Render accepted what validation refused: %v", rawErr)
			}
			return
		}
		if err != nil || out != raw {
			t.Fatalf("validation accepted the spec but Render refused it: %v", err)
		}
		// Every map line is one key and one value that "set map" could
		// send, so HAProxy reads the file as the controller writes it.
		for _, m := range []string{RenderInstanceMap(s), RenderStateMap(s)} {
			for _, line := range strings.Split(strings.TrimSuffix(m, "\n"), "\n") {
				k, v, _ := strings.Cut(line, " ")
				if !runtime.ValidMapEntry(k, v) {
					t.Fatalf("map line %q (inputs service=%q dest=%q)", line, service, dest)
				}
			}
		}
		frontends, backends := 0, 0
		shapes := shapeSets.Get().([]shape)
		defer shapeSets.Put(shapes)
		for _, line := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
			if !knownLine(shapes, line) {
				t.Fatalf("unexpected config line %q from inputs service=%q dest=%q bind=%q proto=%q ep=%q local=%q", line, service, dest, bindAddr, protocol, epAddr, localAddr)
			}
			if strings.HasPrefix(line, "frontend ") {
				frontends++
			}
			if strings.HasPrefix(line, "backend ") {
				backends++
			}
		}
		// A tcp listener has one more backend: its connections table.
		wantBackends := 3
		if Mode(protocol) == "tcp" {
			wantBackends = 4
		}
		if frontends != 2 || backends != wantBackends {
			t.Fatalf("%d frontends and %d backends, want 2 and %d", frontends, backends, wantBackends)
		}
		for _, want := range []string{
			"    server s1 " + netip.AddrPortFrom(netip.MustParseAddr(epAddr), uint16(epPort)).String() + " weight ",
			"    bind " + netip.AddrPortFrom(netip.MustParseAddr(bindAddr), uint16(bindPort)).String() + "\n",
			"    server app " + netip.AddrPortFrom(netip.MustParseAddr(localAddr), uint16(localPort)).String() + "\n",
		} {
			if !strings.Contains(out, want) || netip.MustParseAddr(epAddr).String() != epAddr {
				t.Fatalf("configuration lacks %q (inputs ep=%q bind=%q local=%q)", want, epAddr, bindAddr, localAddr)
			}
		}
	})
}

func TestCheckConfig(t *testing.T) {
	good, err := Render(goldenSpecs()["http_three_upstreams"])
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckConfig(good); err != nil {
		t.Fatalf("golden configuration refused: %v", err)
	}
	tests := []struct{ name, old, new string }{
		{"program section from a zone", "    server s1 10.0.0.1:21000 weight 1\n",
			"    server s1 [fe80::1%lo]:80\nprogram pwn\n command /bin/true\n"},
		{"program section after a valid line", "    balance roundrobin\n", "    balance roundrobin\nprogram pwn\n    command /bin/true\n"},
		{"second server on one line", "    server s1 10.0.0.1:21000 weight 1\n", "    server s1 10.0.0.1:21000 weight 1 backup\n"},
		{"directive before any section", "global\n", "    server x 1.2.3.4:1\nglobal\n"},
		{"backend declared twice", "\nbackend up_db\n", "\nbackend up_api\n"},
		{"uppercase address", "    server s1 10.0.0.1:21000 weight 1\n", "    server s1 [FD00::1]:21000 weight 1\n"},
		{"no final newline", "    default-server", "    default-server"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bad := strings.Replace(good, tt.old, tt.new, 1)
			if tt.name == "no final newline" {
				bad = strings.TrimSuffix(good, "\n")
			}
			if bad == good {
				t.Fatalf("%q not in the configuration", tt.old)
			}
			if err := CheckConfig(bad); !errors.Is(err, ErrInvalid) {
				t.Fatalf("got %v, want ErrInvalid", err)
			}
		})
	}
}

// fuzzKey is the endpoint key of addr and port when they parse, else a string
// that no slot has.
func fuzzKey(addr string, port int) string {
	a, err := netip.ParseAddr(addr)
	if err != nil || port < 0 || port > 65535 {
		return addr
	}
	return netip.AddrPortFrom(a, uint16(port)).String()
}
