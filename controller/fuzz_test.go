package controller

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/valyala/fastjson"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/slots"
)

// hostile are seeds for the fuzz targets here: IPv6 zones holding a master
// CLI command or a config section, ';', spaces, quotes, control bytes and
// non-ASCII.
var hostile = []string{
	"fe80::1%x\n@1 set server local_app/app addr 127.0.0.9 port 9",
	"fe80::1%lo]:80\nprogram pwn\n command /bin/true",
	"fe80::1%x;@1 reload",
	"10.0.0.1 port 9",
	"10.0.0.1;@1 set server local_app/app state maint",
	`a'b"c\d#e`,
	"a\rb\x00c",
	"wéb",
	"::ffff:1.2.3.4",
	"FD00::1",
}

// TestInstanceFilter: a bad instance is dropped with one log line naming
// its ID, the field and the reason, and one count, however many answers
// repeat it; the good instances beside it are kept; it is logged again
// when it comes back after leaving.
func TestInstanceFilter(t *testing.T) {
	core, logs := observer.New(zapcore.WarnLevel)
	m := newMetrics(nil)
	f := newInstanceFilter("up_api", zap.New(core), m)
	good := healthEntry{ID: "good", Address: "10.0.0.1", Port: 21000, Weight: 2}
	badAnswer := []healthEntry{
		good,
		{ID: "zone", Address: hostile[0], Port: 21000},
		{ID: "program", Address: hostile[1], Port: 21000},
		{ID: "semicolon", Address: hostile[4], Port: 21000},
		{ID: "spaces", Address: hostile[3], Port: 21000},
		{ID: "port0", Address: "10.0.0.2", Port: 0},
		{ID: "port70000", Address: "10.0.0.3", Port: 70000},
		{ID: "weight", Address: "10.0.0.4", Port: 21000, Weight: -1},
		{ID: "node", NodeAddress: "fe80::1%eth0", Port: 21000},
	}
	unreadable := []error{&entryError{Index: 9, ID: "json", Err: errBadPort}}
	want := []slots.Endpoint{{Addr: "10.0.0.1", Port: 21000, Weight: 2}}
	for range 3 {
		if got := f.endpoints(badAnswer, unreadable); len(got) != 1 || got[0] != want[0] {
			t.Fatalf("endpoints %v, want %v", got, want)
		}
	}
	wantFields := map[string]string{"zone": "address", "program": "address", "semicolon": "address", "spaces": "address",
		"port0": "port", "port70000": "port", "weight": "weight", "node": "address", "json": "entry"}
	entries := logs.TakeAll()
	if len(entries) != len(wantFields) {
		t.Fatalf("%d log lines, want one per bad instance (%d): %v", len(entries), len(wantFields), entries)
	}
	for _, e := range entries {
		ctx := e.ContextMap()
		id, _ := ctx["instance_id"].(string)
		if ctx["field"] != wantFields[id] || ctx["upstream"] != "up_api" || ctx["error"] == "" {
			t.Errorf("log line %v, want field %q for instance %q", ctx, wantFields[id], id)
		}
		if strings.ContainsAny(e.Message+ctx["error"].(string), "\n") {
			t.Errorf("log line spans lines: %q", ctx["error"])
		}
	}
	for field, want := range map[string]float64{"address": 5, "port": 2, "weight": 1, "entry": 1} {
		if got := value(t, m, "haproxy_connect_invalid_instances_total", "upstream", "up_api", "field", field); got != want {
			t.Errorf("invalid instances of up_api, field %s: %g, want %g", field, got, want)
		}
	}
	// Gone, then back: logged again.
	f.endpoints([]healthEntry{good}, nil)
	f.endpoints(badAnswer[:2], nil)
	if n := logs.Len(); n != 1 {
		t.Errorf("%d log lines for an instance that came back, want 1", n)
	}
}

// errBadPort stands for a field the health parser could not read.
var errBadPort = &json.UnsupportedValueError{Str: "Service.Port"}

// FuzzParseRegistration: whatever ParseRegistration accepts, Render
// accepts too (so a registration can never make every later reload fail),
// and its names and addresses are the values given, checked.
func FuzzParseRegistration(f *testing.F) {
	f.Add("127.0.0.1", 21000, "127.0.0.1", 8080, "http", "api", "dc2", "127.0.0.1", 9191, "tcp", "service")
	f.Add("", 21000, "", 8080, "", "api", "", "::1", 9191, "grpc", "prepared_query")
	for _, h := range hostile {
		f.Add(h, 21000, "127.0.0.1", 8080, "http", "api", "", "127.0.0.1", 9191, "http", "service")
		f.Add("127.0.0.1", 0, h, 70000, h, h, h, h, 9191, h, h)
		f.Add("127.0.0.1", 21000, "127.0.0.1", 8080, "tcp", "api", "", h, 9191, "tcp", "service")
	}
	f.Fuzz(func(t *testing.T, addr string, port int, local string, localPort int, proto, dest, dc, bind string, bindPort int, upProto, typ string) {
		reg := &api.AgentService{
			ID: "web-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Address: addr, Port: port,
			Proxy: &api.AgentServiceConnectProxyConfig{
				DestinationServiceName: "web", LocalServiceAddress: local, LocalServicePort: localPort,
				Config: map[string]any{"protocol": proto},
				Upstreams: []api.Upstream{
					{DestinationType: api.UpstreamDestType(typ), DestinationName: dest, Datacenter: dc, LocalBindAddress: bind, LocalBindPort: bindPort,
						Config: map[string]any{"protocol": upProto}},
					{DestinationName: "fixed", LocalBindPort: 9999},
				},
			},
		}
		sc, rejected, err := ParseRegistration(reg)
		if err != nil {
			return
		}
		if len(sc.Upstreams)+len(rejected) != 2 {
			t.Fatalf("%d upstreams kept and %d rejected, of 2", len(sc.Upstreams), len(rejected))
		}
		spec := bootstrap.Spec{Service: sc.Service, LeafFile: "/s/leaf.pem", RootsFile: "/s/roots.pem", SPOEFile: "/s/spoe.cfg",
			AuthzMap: "/s/authz.map", CrtList: "/s/leaf.crtlist", SNI: bootstrap.FallbackSNI, SPOASocket: "/s/spoa.sock", HardStopAfter: 1e9, Public: sc.Public}
		for _, u := range sc.Upstreams {
			if u.Destination != dest && u.Destination != "fixed" {
				t.Fatalf("destination %q from %q", u.Destination, dest)
			}
			if a, err := netip.ParseAddr(u.BindAddr); err != nil || a.String() != u.BindAddr {
				t.Fatalf("bind address %q kept", u.BindAddr)
			}
			spec.Upstreams = append(spec.Upstreams, bootstrap.Upstream{Name: u.Name, Destination: u.Destination, BindAddr: u.BindAddr,
				BindPort: u.BindPort, Protocol: u.Protocol, ConnectTimeout: u.ConnectTimeout, Slots: slots.New(u.Name, bootstrap.SlotPrefix, 2)})
		}
		if _, err := bootstrap.Render(spec); err != nil {
			t.Fatalf("ParseRegistration accepted what Render refuses: %v", err)
		}
	})
}

// FuzzHealthParse: the health-answer parser and the instance filter never
// let a value through that would make a runtime command carry more than
// one command; every endpoint's address is canonical with no zone, and
// every kept endpoint makes a "set server addr" and an "add server" that
// pass the runtime's own grammar. And the parser, which reads an answer
// one entry at a time, reads what a parse of the whole answer would:
// wholeParse, the way it read answers before, whether the answer arrives
// whole or a byte at a time.
func FuzzHealthParse(f *testing.F) {
	f.Add(`[{"Node":{"Address":"10.0.0.1"},"Service":{"ID":"a","Address":"","Port":80,"Weights":{"Passing":3}}}]`)
	for _, body := range []string{
		`[]`, ` [ ] `, `[,]`, `[+]`, `[01]`, `[1,]`, `[1 2]`, `[1,2]`, `[]x`, `[] ]`, `[`, `[{`, `"[]"`, `{"a":[]}`, `[[]]`, `[{]}`, `[{"a":"]"}]`,
		`[{"Service":{"ID":"a\"],","Address":"10.0.0.1","Port":1}} ,{"Service":{"ID":"b","Address":"10.0.0.2","Port":2}}]`,
		"[\t{\"Service\":{\"ID\":\"a\",\"Address\":\"10.0.0.1\",\"Port\":1}}\r\n]\n", `[null,true,"s",{"Service":null}]`,
		`[{"Service":{"ID":"a","Port":1}}}]`, "[]\nshow proc\n", "[1]\x00;quit", `[{"Service":{"ID":"a","Address":"10.0.0.1","Port":1}}]` + "\r\n@1 disable server up/s1", `[{"Service":{"ID":"a\\","Port":1}}]`, `[{"Service":{"ID":"\u005d","Port":1}}]`, " \t\n{\"Service\":{\"ID\":\"a\"}}", "\n[\n", "[{\"Service\":{\"ID\":\"a\",\"Port\":1}} \n,",
		// One endpoint in IPv4-mapped and in plain form, and one under a
		// zone: as map keys they are three addresses, and only the plain
		// one is kept.
		`[{"Service":{"ID":"m","Address":"::ffff:10.0.0.8","Port":80}},{"Service":{"ID":"p","Address":"10.0.0.8","Port":80}},{"Service":{"ID":"z","Address":"fe80::1%eth0","Port":80}}]`,
	} {
		f.Add(body)
	}
	for _, h := range hostile {
		addr, _ := json.Marshal(h)
		f.Add(`[{"Service":{"ID":"x","Address":` + string(addr) + `,"Port":21000}},{"Service":{"ID":"ok","Address":"10.0.0.8","Port":80}}]`)
		f.Add(`[{"Node":{"Address":` + string(addr) + `},"Service":{"ID":` + string(addr) + `,"Port":70000,"Weights":{"Passing":-1}}}]`)
	}
	f.Fuzz(func(t *testing.T, body string) {
		var h healthReader
		entries, bad, err := h.parse([]byte(body))
		// The answer arrives in pieces of any size: a byte at a time
		// reads the same.
		{
			oEntries, oBad, oErr := h.parseEntriesFrom(iotest.OneByteReader(strings.NewReader(body)))
			if (err == nil) != (oErr == nil) || len(entries) != len(oEntries) || len(bad) != len(oBad) {
				t.Fatalf("whole: %d entries, %d bad, %v; a byte at a time: %d entries, %d bad, %v", len(entries), len(bad), err, len(oEntries), len(oBad), oErr)
			}
			for i := range entries {
				if entries[i] != oEntries[i] {
					t.Fatalf("entry %d: %+v; a byte at a time: %+v", i, entries[i], oEntries[i])
				}
			}
		}
		{
			wEntries, wBad, wErr := wholeParse([]byte(body))
			if (err == nil) != (wErr == nil) || len(entries) != len(wEntries) || len(bad) != len(wBad) {
				t.Fatalf("parse: %d entries, %d bad, %v; whole parse: %d entries, %d bad, %v", len(entries), len(bad), err, len(wEntries), len(wBad), wErr)
			}
			for i := range entries {
				if entries[i] != wEntries[i] {
					t.Fatalf("entry %d: %+v; whole parse: %+v", i, entries[i], wEntries[i])
				}
			}
		}
		if err != nil {
			return
		}
		// Standby instances pass the same checks: each kept one has a key.
		for _, e := range standbyEndpoints(entries, 0, "") {
			if _, ok := endpointKey(e.Addr, e.Port); !ok {
				t.Fatalf("standby endpoint %+v kept, but it has no key", e)
			}
		}
		eps := newInstanceFilter("up_api", zap.NewNop(), newMetrics(nil)).endpoints(entries, bad)
		// The instance map is keyed by netip.AddrPort, from the same
		// answer: every endpoint kept finds its instance by its own key.
		insts := healthInstances(entries)
		for _, e := range eps {
			if k, ok := endpointKey(e.Addr, e.Port); !ok {
				t.Fatalf("endpoint %+v kept, but it has no key", e)
			} else if _, ok := insts[k]; !ok {
				t.Fatalf("endpoint %+v kept, but no instance has its key %v", e, k)
			}
		}
		for _, e := range eps {
			a, err := netip.ParseAddr(e.Addr)
			if err != nil || a.Zone() != "" || a.String() != e.Addr || e.Port < 1 || e.Port > 65535 || e.Weight < 1 || e.Weight > slots.MaxWeight {
				t.Fatalf("endpoint %+v kept", e)
			}
			for _, op := range []slots.Op{{Kind: slots.OpSetAddr, Server: "s1", Addr: e.Addr, Port: e.Port}, {Kind: slots.OpAdd, Server: "s9", Addr: e.Addr, Port: e.Port, Weight: e.Weight}} {
				cs, err := runtime.SlotCommands("up_api", op, runtime.ServerOptions{SSL: true, CrtFile: "/s/leaf.pem", CAFile: "/s/roots.pem",
					Passive: runtime.PassiveCheck{Inter: time.Second, Layer7: true, ErrorLimit: 5}})
				if err != nil {
					t.Fatalf("endpoint %+v kept, but its command is refused: %v", e, err)
				}
				for _, cmd := range cs {
					if cmd.Check() != nil || strings.ContainsAny(cmd.String(), "\n;#%") {
						t.Fatalf("command %q", cmd.String())
					}
				}
			}
		}
	})
}

// wholeParse reads a health answer as one fastjson value, then each entry:
// the model FuzzHealthParse holds the parser to.
func wholeParse(body []byte) (entries []healthEntry, bad []error, err error) {
	var p fastjson.Parser
	v, err := p.ParseBytes(body)
	if err != nil {
		return nil, nil, err
	}
	list, err := v.Array()
	if err != nil {
		return nil, nil, err
	}
	for i, e := range list {
		he, err := readHealthEntry(e)
		if err == nil {
			err = readChecks(e, &he)
		}
		if err != nil {
			bad = append(bad, &entryError{Index: i, ID: he.ID, Err: err})
			continue
		}
		entries = append(entries, he)
	}
	return entries, bad, nil
}

// FuzzRegistrationPaths: the paths a registration puts into HAProxy's
// configuration (an expose path, an upstream's unix socket and its mode,
// the local application's unix socket) are either refused or rendered,
// never a configuration Render refuses, and an accepted one is the value
// given.
func FuzzRegistrationPaths(f *testing.F) {
	f.Add("/health", "/run/hc/db.sock", "0600", "/run/app.sock")
	f.Add("/metrics", "", "", "")
	for _, h := range append(hostile, "/h\nprogram pwn", "/a b", "/a#b", "/a'b", "relative/x", "/"+strings.Repeat("p", 300), "0777\n", "8000") {
		f.Add(h, "/run/hc/db.sock", "0600", "")
		f.Add("/health", h, "0600", "")
		f.Add("/health", "/run/hc/db.sock", h, "")
		f.Add("/health", "", "", h)
	}
	// The first seed is accepted whole: the target checks something.
	if sc, _, err := ParseRegistration(pathsRegistration("/health", "/run/hc/db.sock", "0600", "/run/app.sock")); err != nil ||
		len(sc.Expose) != 1 || len(sc.Upstreams) != 1 || sc.Upstreams[0].SocketPath == "" {
		f.Fatalf("the valid seed: %+v, %v", sc, err)
	}
	f.Fuzz(func(t *testing.T, exposePath, socketPath, socketMode, localSocket string) {
		sc, _, err := ParseRegistration(pathsRegistration(exposePath, socketPath, socketMode, localSocket))
		if err != nil {
			return
		}
		for _, e := range sc.Expose {
			if e.Path != exposePath {
				t.Fatalf("expose path %q from %q", e.Path, exposePath)
			}
		}
		spec := bootstrap.Spec{Service: sc.Service, LeafFile: "/s/leaf.pem", RootsFile: "/s/roots.pem", SPOEFile: "/s/spoe.cfg",
			AuthzMap: "/s/authz.map", CrtList: "/s/leaf.crtlist", SNI: bootstrap.FallbackSNI, SPOASocket: "/s/spoa.sock", HardStopAfter: 1e9,
			Public: sc.Public, Expose: sc.Expose}
		for _, u := range sc.Upstreams {
			if u.SocketPath != "" && u.SocketPath != socketPath {
				t.Fatalf("socket path %q from %q", u.SocketPath, socketPath)
			}
			spec.Upstreams = append(spec.Upstreams, bootstrap.Upstream{Name: u.Name, Destination: u.Destination, BindAddr: u.BindAddr,
				BindPort: u.BindPort, Protocol: u.Protocol, SocketPath: u.SocketPath, SocketMode: u.SocketMode,
				Slots: slots.New(u.Name, bootstrap.SlotPrefix, 2)})
		}
		if _, err := bootstrap.Render(spec); err != nil {
			t.Fatalf("ParseRegistration accepted what Render refuses: %v", err)
		}
	})
}

// pathsRegistration is a sidecar registration with an expose path, an
// upstream on a unix socket (or port 9191 without one) and a local
// application socket.
func pathsRegistration(exposePath, socketPath, socketMode, localSocket string) *api.AgentService {
	bindPort := 9191 // an upstream binds a socket or a port, not both
	if socketPath != "" {
		bindPort = 0
	}
	return &api.AgentService{
		ID: "web-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Address: "127.0.0.1", Port: 21000,
		Proxy: &api.AgentServiceConnectProxyConfig{
			DestinationServiceName: "web", LocalServiceAddress: "127.0.0.1", LocalServicePort: 8080,
			LocalServiceSocketPath: localSocket,
			Config:                 map[string]any{"protocol": "http"},
			Expose:                 api.ExposeConfig{Paths: []api.ExposePath{{ListenerPort: 21500, Path: exposePath, LocalPathPort: 8080, Protocol: "http"}}},
			Upstreams: []api.Upstream{{DestinationName: "db", LocalBindSocketPath: socketPath, LocalBindSocketMode: socketMode,
				LocalBindPort: bindPort}},
		},
	}
}
