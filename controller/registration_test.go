package controller

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/input"
)

func proxyReg(cfg map[string]any, ups ...api.Upstream) *api.AgentService {
	return &api.AgentService{
		ID: "web-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Service: "web-sidecar-proxy", Port: 21000,
		Proxy: &api.AgentServiceConnectProxyConfig{
			DestinationServiceName: "web", DestinationServiceID: "web", LocalServicePort: 8080, Config: cfg, Upstreams: ups,
		},
	}
}

func TestParseRegistration(t *testing.T) {
	sc, rejected, err := ParseRegistration(proxyReg(
		map[string]any{"protocol": "HTTP", "bind_address": "127.0.0.2", "bind_port": float64(21001), "local_connect_timeout_ms": "1500"},
		api.Upstream{DestinationName: "db", LocalBindPort: 9192, Config: map[string]any{"connect_timeout_ms": float64(250)}},
		api.Upstream{DestinationName: "api", LocalBindPort: 9191, Datacenter: "dc2", Config: map[string]any{"protocol": "grpc"}},
		api.Upstream{DestinationType: api.UpstreamDestTypePreparedQuery, DestinationName: "api", LocalBindAddress: "::1", LocalBindPort: 9193},
	))
	if err != nil || len(rejected) > 0 {
		t.Fatalf("err %v, rejected %v", err, rejected)
	}
	want := Sidecar{
		ProxyID: "web-sidecar-proxy", Service: "web",
		Public: bootstrap.Public{BindAddr: "127.0.0.2", BindPort: 21001, Protocol: "http", LocalAddr: "127.0.0.1", LocalPort: 8080, ConnectTimeout: 1500 * time.Millisecond},
		Upstreams: []Upstream{
			{Name: "qup_api", Type: "prepared_query", Destination: "api", BindAddr: "::1", BindPort: 9193},
			{Name: "up_api_dc2", Type: "service", Destination: "api", Datacenter: "dc2", BindAddr: "127.0.0.1", BindPort: 9191, Protocol: "grpc"},
			{Name: "up_db", Type: "service", Destination: "db", BindAddr: "127.0.0.1", BindPort: 9192, ConnectTimeout: 250 * time.Millisecond},
		},
	}
	if diff := cmp.Diff(want, sc); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

// TestParseRegistrationRejectsBadUpstreams: each bad upstream is dropped
// with a reason that names it, and the good one beside it stays.
func TestParseRegistrationRejectsBadUpstreams(t *testing.T) {
	good := api.Upstream{DestinationName: "good", LocalBindPort: 9100}
	tests := []struct {
		name    string
		bad     api.Upstream
		errPart string
	}{
		{"config injection in the name", api.Upstream{DestinationName: "x\n    server evil 1.2.3.4:80", LocalBindPort: 9101}, "want 1-63 letters"},
		{"semicolon in the name", api.Upstream{DestinationName: "x;shutdown", LocalBindPort: 9101}, "want 1-63 letters"},
		{"zone in the bind address", api.Upstream{DestinationName: "z", LocalBindAddress: "fe80::1%lo]:80\nprogram pwn\n command /bin/true", LocalBindPort: 9101}, "zone"},
		{"ipv4-mapped bind address", api.Upstream{DestinationName: "m", LocalBindAddress: "::ffff:127.0.0.1", LocalBindPort: 9101}, "IPv4-mapped"},
		{"dot in the datacenter", api.Upstream{DestinationName: "d", Datacenter: "dc.2", LocalBindPort: 9101}, "datacenter"},
		{"port out of range", api.Upstream{DestinationName: "big", LocalBindPort: 70000}, "out of range"},
		{"no port", api.Upstream{DestinationName: "noport"}, "out of range"},
		{"hostname bind", api.Upstream{DestinationName: "h", LocalBindAddress: "localhost", LocalBindPort: 9101}, "not an IP literal"},
		{"injected protocol", api.Upstream{DestinationName: "p", LocalBindPort: 9101, Config: map[string]any{"protocol": "tcp\nglobal"}}, "protocol"},
		{"protocol of the wrong type", api.Upstream{DestinationName: "p", LocalBindPort: 9101, Config: map[string]any{"protocol": 7.0}}, "want a string"},
		{"fractional timeout", api.Upstream{DestinationName: "t", LocalBindPort: 9101, Config: map[string]any{"connect_timeout_ms": 1.5}}, "not an integer"},
		{"timeout as junk", api.Upstream{DestinationName: "t", LocalBindPort: 9101, Config: map[string]any{"connect_timeout_ms": "5s;x"}}, "not a number"},
		{"same port as another upstream", api.Upstream{DestinationName: "dup", LocalBindPort: 9100}, "already bound"},
		{"same port as the public listener", api.Upstream{DestinationName: "dup", LocalBindAddress: "0.0.0.0", LocalBindPort: 21000}, "already bound"},
		{"same name twice", good, "already uses the name"},
		{"relative unix socket", api.Upstream{DestinationName: "u", LocalBindSocketPath: "u.sock"}, "local_bind_socket_path"},
		{"unix socket with a space", api.Upstream{DestinationName: "u", LocalBindSocketPath: "/tmp/u.sock mode 777"}, "local_bind_socket_path"},
		{"unix socket with a newline", api.Upstream{DestinationName: "u", LocalBindSocketPath: "/tmp/u.sock\nprogram p"}, "local_bind_socket_path"},
		{"unix socket and a port", api.Upstream{DestinationName: "u", LocalBindSocketPath: "/tmp/u.sock", LocalBindPort: 9101}, "one or the other"},
		{"unix socket mode not octal", api.Upstream{DestinationName: "u", LocalBindSocketPath: "/tmp/u.sock", LocalBindSocketMode: "rw"}, "local_bind_socket_mode"},
		{"same unix socket as another upstream", api.Upstream{DestinationName: "u", LocalBindSocketPath: "/tmp/good.sock"}, "already bound"},
		{"mesh gateway for a cross-datacenter upstream", api.Upstream{DestinationName: "u", Datacenter: "dc2", LocalBindPort: 9101,
			MeshGateway: api.MeshGatewayConfig{Mode: api.MeshGatewayModeLocal}}, "mesh gateways are not supported"},
		{"peer", api.Upstream{DestinationName: "u", DestinationPeer: "other", LocalBindPort: 9101}, "peering"},
		{"limits of the wrong type", api.Upstream{DestinationName: "u", LocalBindPort: 9101, Config: map[string]any{"limits": 5.0}}, "config limits"},
		{"limit out of range", api.Upstream{DestinationName: "u", LocalBindPort: 9101, Config: map[string]any{"limits": map[string]any{"max_connections": -1.0}}}, "config limits"},
		{"passive check of the wrong type", api.Upstream{DestinationName: "u", LocalBindPort: 9101, Config: map[string]any{"passive_health_check": "on"}}, "passive_health_check"},
		{"passive check interval junk", api.Upstream{DestinationName: "u", LocalBindPort: 9101,
			Config: map[string]any{"passive_health_check": map[string]any{"interval": "10s\nglobal"}}}, "interval"},
		{"unknown type", api.Upstream{DestinationName: "u", DestinationType: "mesh-gateway", LocalBindPort: 9101}, "destination type"},
		{"namespace", api.Upstream{DestinationName: "u", DestinationNamespace: "team", LocalBindPort: 9101}, "namespace"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			other := api.Upstream{DestinationName: "sock", LocalBindSocketPath: "/tmp/good.sock"}
			if tt.bad.LocalBindSocketPath != "/tmp/good.sock" {
				other.LocalBindSocketPath = "/tmp/other.sock"
			}
			sc, rejected, err := ParseRegistration(proxyReg(nil, good, other, tt.bad))
			if err != nil {
				t.Fatal(err)
			}
			if len(rejected) != 1 || !strings.Contains(rejected[0].Error(), tt.errPart) {
				t.Fatalf("rejected = %v, want one error containing %q", rejected, tt.errPart)
			}
			if len(sc.Upstreams) != 2 || sc.Upstreams[0].Name != "up_good" {
				t.Errorf("the good upstream did not survive: %+v", sc.Upstreams)
			}
		})
	}
}

func TestParseRegistrationRejectsBadPublic(t *testing.T) {
	for name, cfg := range map[string]map[string]any{
		"bind_port text":    {"bind_port": "http"},
		"bind_port too big": {"bind_port": float64(99999)},
		"bind_address type": {"bind_address": 12.0},
		"timeout negative":  {"local_connect_timeout_ms": float64(-1)},
		"bind_address zone": {"bind_address": "fe80::1%x\n@1 set server local_app/app addr 127.0.0.9 port 9"},
		"bind_address name": {"bind_address": "localhost"},
		"unknown protocol":  {"protocol": "0"},
	} {
		t.Run(name, func(t *testing.T) {
			if _, _, err := ParseRegistration(proxyReg(cfg)); err == nil {
				t.Fatal("accepted")
			}
		})
	}
	reg := proxyReg(nil)
	reg.Proxy.DestinationServiceName = "web\nglobal"
	if _, _, err := ParseRegistration(reg); !errors.Is(err, bootstrap.ErrInvalid) {
		t.Errorf("bad destination: %v", err)
	}
	reg = proxyReg(nil)
	reg.Proxy.LocalServiceAddress = "127.0.0.1 check"
	if _, _, err := ParseRegistration(reg); !errors.Is(err, input.ErrInvalid) {
		t.Errorf("bad local address: %v", err)
	}
}

func TestFindSidecar(t *testing.T) {
	proxy := func(id, dest string) *api.AgentService {
		return &api.AgentService{ID: id, Kind: api.ServiceKindConnectProxy, Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceID: dest}}
	}
	services := map[string]*api.AgentService{
		"web":               {ID: "web"},
		"web-sidecar-proxy": proxy("web-sidecar-proxy", "web"),
		"api-1":             proxy("api-1", "api"),
		"api-2":             proxy("api-2", "API"),
	}
	if id, err := FindSidecar(services, "WEB"); err != nil || id != "web-sidecar-proxy" {
		t.Errorf("web: %q %v", id, err)
	}
	if _, err := FindSidecar(services, "db"); !errors.Is(err, ErrNoSidecar) {
		t.Errorf("db: %v", err)
	}
	if _, err := FindSidecar(services, "api"); !errors.Is(err, ErrManySidecars) {
		t.Errorf("api: %v", err)
	}
}
