package controller

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
)

// TestParseProxyConfig: every key this sidecar applies, read once, with
// what it does not apply named in Notes.
func TestParseProxyConfig(t *testing.T) {
	reg := proxyReg(map[string]any{
		"protocol": "http", "local_request_timeout_ms": float64(2500), "local_idle_timeout_ms": "30000",
		"max_inbound_connections": float64(500), "max_connections": float64(8), "max_pending_requests": float64(2),
		"max_concurrent_requests": float64(4), "balance_inbound_connections": "exact_balance",
		"passive_health_check":       map[string]any{"interval": "5s", "max_failures": float64(3)},
		"envoy_public_listener_json": "{}", "handshake_timeout_ms": float64(1000), "made_up": true,
	},
		api.Upstream{DestinationName: "inherits", LocalBindPort: 9101, MeshGateway: api.MeshGatewayConfig{Mode: api.MeshGatewayModeRemote}},
		// Merged from service-defaults: the Go struct's JSON spelling.
		api.Upstream{DestinationName: "own", LocalBindPort: 9102, Config: map[string]any{
			"passive_health_check": map[string]any{"Interval": float64(time.Second), "MaxFailures": float64(7), "MaxEjectionPercent": float64(10)},
			"limits":               map[string]any{"MaxConnections": float64(3), "max_pending_requests": float64(4), "max_concurrent_requests": "2"},
		}},
		api.Upstream{DestinationName: "sock", LocalBindSocketPath: "/run/app/sock.sock", LocalBindSocketMode: "660"},
	)
	reg.Proxy.LocalServiceSocketPath = "/run/app/web.sock"
	reg.Proxy.Expose = api.ExposeConfig{Checks: true, Paths: []api.ExposePath{
		{ListenerPort: 21501, Path: "/grpc.health.v1.Health/Check", LocalPathPort: 8081, Protocol: "http2"},
		{ListenerPort: 21500, Path: "/health", LocalPathPort: 8080, ParsedFromCheck: true},
		{ListenerPort: 21502, Path: "/a b", LocalPathPort: 8080},
		{ListenerPort: 21000, Path: "/taken", LocalPathPort: 8080},
	}}
	reg.Proxy.MeshGateway.Mode = api.MeshGatewayModeLocal
	reg.Proxy.AccessLogs = &api.AccessLogsConfig{Enabled: true}
	reg.Proxy.TransparentProxy = &api.TransparentProxyConfig{OutboundListenerPort: 15001}
	sc, rejected, err := ParseRegistration(reg)
	if err != nil || len(rejected) > 0 {
		t.Fatalf("err %v, rejected %v", err, rejected)
	}
	wantPublic := bootstrap.Public{BindAddr: "0.0.0.0", BindPort: 21000, Protocol: "http", LocalAddr: "127.0.0.1", LocalPort: 8080,
		LocalSocket: "/run/app/web.sock", RequestTimeout: 2500 * time.Millisecond, IdleTimeout: 30 * time.Second, MaxInbound: 500,
		Limits: bootstrap.Limits{MaxConnections: 8, MaxPendingRequests: 2, MaxConcurrentRequests: 4}}
	if diff := cmp.Diff(wantPublic, sc.Public); diff != "" {
		t.Errorf("public (-want +got):\n%s", diff)
	}
	passive := map[string]bootstrap.PassiveCheck{}
	for _, u := range sc.Upstreams {
		passive[u.Name] = u.Passive
	}
	wantPassive := map[string]bootstrap.PassiveCheck{
		"up_inherits": {Interval: 5 * time.Second, MaxFailures: 3},
		"up_own":      {Interval: time.Second, MaxFailures: 7},
		"up_sock":     {Interval: 5 * time.Second, MaxFailures: 3},
	}
	if diff := cmp.Diff(wantPassive, passive); diff != "" {
		t.Errorf("passive checks (-want +got):\n%s", diff)
	}
	if u, _ := sc.upstream("up_own"); u.Limits != (bootstrap.Limits{MaxConnections: 3, MaxPendingRequests: 4, MaxConcurrentRequests: 2}) {
		t.Errorf("limits of up_own: %+v", u.Limits)
	}
	if u, _ := sc.upstream("up_sock"); u.SocketPath != "/run/app/sock.sock" || u.SocketMode != "0660" || u.BindAddr != "" {
		t.Errorf("socket upstream: %+v", u)
	}
	wantExpose := []bootstrap.ExposePath{
		{ListenerPort: 21500, Path: "/health", LocalPort: 8080, Protocol: "http"},
		{ListenerPort: 21501, Path: "/grpc.health.v1.Health/Check", LocalPort: 8081, Protocol: "http2"},
	}
	if diff := cmp.Diff(wantExpose, sc.Expose); diff != "" {
		t.Errorf("expose (-want +got):\n%s", diff)
	}
	got := map[string]zapcore.Level{}
	for _, n := range sc.Notes {
		got[n.Key] = n.Level
	}
	want := map[string]zapcore.Level{
		"config balance_inbound_connections":                             zapcore.InfoLevel,
		"config envoy_public_listener_json":                              zapcore.WarnLevel,
		"config handshake_timeout_ms":                                    zapcore.WarnLevel,
		"config made_up":                                                 zapcore.WarnLevel,
		"upstream up_own config limits.max_pending_requests":             zapcore.InfoLevel,
		"upstream up_own config passive_health_check.maxejectionpercent": zapcore.WarnLevel,
		"Expose.Paths[2]":                                                zapcore.ErrorLevel,
		"Expose.Paths[3]":                                                zapcore.ErrorLevel,
		"MeshGateway.Mode":                                               zapcore.WarnLevel,
		"AccessLogs":                                                     zapcore.WarnLevel,
		"TransparentProxy":                                               zapcore.WarnLevel,
		"upstream inherits MeshGateway.Mode":                             zapcore.WarnLevel,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("notes (-want +got):\n%s\n%+v", diff, sc.Notes)
	}
}

// TestProxyConfigBadValues: a refused value is left out with an error note
// naming the key, and the rest of the registration applies.
func TestProxyConfigBadValues(t *testing.T) {
	tests := []struct {
		key  string
		val  any
		part string
	}{
		{"local_request_timeout_ms", "2s", "not a number"},
		{"local_request_timeout_ms", float64(-1), "not an integer"},
		{"local_idle_timeout_ms", 1.5, "not an integer"},
		{"max_inbound_connections", float64(bootstrap.MaxLimit + 1), "not an integer"},
		{"max_connections", "8\nglobal", "not a number"},
		{"max_pending_requests", true, "want a number"},
		{"max_concurrent_requests", float64(-3), "not an integer"},
		{"balance_inbound_connections", "round_robin", "not exact_balance"},
		{"balance_inbound_connections", 1.0, "want a string"},
		{"passive_health_check", []any{1}, "want an object"},
		{"passive_health_check", map[string]any{"interval": "-1s"}, "not a duration"},
		{"passive_health_check", map[string]any{"interval": "2h"}, "out of range"},
		{"passive_health_check", map[string]any{"max_failures": float64(1e9)}, "not an integer"},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s=%v", tt.key, tt.val), func(t *testing.T) {
			sc, rejected, err := ParseRegistration(proxyReg(map[string]any{"protocol": "http", "max_inbound_connections": float64(9), tt.key: tt.val},
				api.Upstream{DestinationName: "db", LocalBindPort: 9101}))
			if tt.key == "max_inbound_connections" {
				sc.Public.MaxInbound = 9 // the key under test replaced it
			}
			if err != nil || len(rejected) > 0 || len(sc.Upstreams) != 1 || sc.Public.MaxInbound != 9 {
				t.Fatalf("the rest did not apply: err %v, rejected %v, %+v", err, rejected, sc)
			}
			if len(sc.Notes) != 1 || sc.Notes[0].Key != "config "+tt.key || sc.Notes[0].Level != zapcore.ErrorLevel || !strings.Contains(sc.Notes[0].Reason, tt.part) {
				t.Errorf("notes = %+v, want one error for config %s containing %q", sc.Notes, tt.key, tt.part)
			}
		})
	}
}

// TestProxyConfigTCPListener: HTTP-only keys on a tcp listener are named,
// not applied.
func TestProxyConfigTCPListener(t *testing.T) {
	sc, _, err := ParseRegistration(proxyReg(map[string]any{"local_request_timeout_ms": float64(100), "max_concurrent_requests": float64(2), "max_connections": float64(3)}))
	if err != nil {
		t.Fatal(err)
	}
	if sc.Public.RequestTimeout != 0 || sc.Public.Limits != (bootstrap.Limits{MaxConnections: 3}) {
		t.Errorf("public = %+v", sc.Public)
	}
	if len(sc.Notes) != 2 || sc.Notes[0].Key != "config local_request_timeout_ms" || sc.Notes[1].Key != "config max_concurrent_requests" {
		t.Errorf("notes = %+v", sc.Notes)
	}
}

// TestSidecarDiffNamesFields: a reload's reason names the keys that changed.
func TestSidecarDiffNamesFields(t *testing.T) {
	old, _, err := ParseRegistration(proxyReg(map[string]any{"protocol": "http"}, api.Upstream{DestinationName: "db", LocalBindPort: 9101}))
	if err != nil {
		t.Fatal(err)
	}
	reg := proxyReg(map[string]any{"protocol": "http", "local_request_timeout_ms": float64(100), "max_connections": float64(3)},
		api.Upstream{DestinationName: "db", LocalBindPort: 9101, Config: map[string]any{"passive_health_check": map[string]any{}}})
	reg.Proxy.Expose.Paths = []api.ExposePath{{ListenerPort: 21500, Path: "/health", LocalPathPort: 8080}}
	cur, _, err := ParseRegistration(reg)
	if err != nil {
		t.Fatal(err)
	}
	if old.Equal(cur) {
		t.Fatal("equal")
	}
	want := "expose paths changed, public listener changed (local_request_timeout_ms, max_connections), upstream up_db changed (passive_health_check)"
	if got := old.Diff(cur); got != want {
		t.Errorf("Diff = %q, want %q", got, want)
	}
	// Notes are not the shape: a registration that only adds an unknown
	// key is equal, and reloads nothing.
	reg.Proxy.Config["made_up"] = 1.0
	noted, _, _ := ParseRegistration(reg)
	if !cur.Equal(noted) || len(noted.Notes) != 1 {
		t.Errorf("a note changed the shape: %q, notes %+v", cur.Diff(noted), noted.Notes)
	}
}

// TestLogNotesOnce: a note is logged when it first appears, not again while
// it stays, and again if it comes back after it went away.
func TestLogNotesOnce(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	c := &Controller{log: zap.New(core), cfg: Config{ProxyID: "web-sidecar-proxy"}}
	a := Note{Key: "config made_up", Reason: "unknown key: not applied", Level: zapcore.WarnLevel}
	b := Note{Key: "config max_connections", Reason: "bad; left out", Level: zapcore.ErrorLevel}
	var got []string
	for _, step := range [][]Note{{a}, {a}, {a, b}, {b}, {a, b}} {
		c.logNotes(step)
		for _, e := range logs.TakeAll() {
			got = append(got, e.Level.String()+" "+e.ContextMap()["key"].(string))
		}
		got = append(got, "|")
	}
	want := []string{"warn config made_up", "|", "|", "error config max_connections", "|", "|", "warn config made_up", "|"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

// TestExposedCheckPaths: the paths of Expose.Checks come from the checks'
// exposed ports and outputs (Consul serves no check definitions).
func TestExposedCheckPaths(t *testing.T) {
	checks := map[string]*api.AgentCheck{
		"ok":            {CheckID: "ok", ServiceID: "web", Type: "http", ExposedPort: 21500, Output: "HTTP GET http://127.0.0.1:21500/health?full=1: 200 OK Output: fine"},
		"failing":       {CheckID: "failing", ServiceID: "WEB", Type: "http", ExposedPort: 21502, Output: `Get "http://10.0.0.5:21502/ready": dial tcp 10.0.0.5:21502: connect: connection refused`},
		"grpc":          {CheckID: "grpc", ServiceID: "web", Type: "grpc", ExposedPort: 21501, Output: "rpc error"},
		"not run":       {CheckID: "not run", ServiceID: "web", Type: "http", ExposedPort: 21503},
		"elsewhere":     {CheckID: "elsewhere", ServiceID: "web", Type: "http", ExposedPort: 21504, Output: "HTTP GET http://127.0.0.1:8080/x: 200 OK"},
		"not exposed":   {CheckID: "not exposed", ServiceID: "web", Type: "http", Output: "HTTP GET http://127.0.0.1:8080/health: 200 OK"},
		"other service": {CheckID: "other service", ServiceID: "db", Type: "http", ExposedPort: 21505, Output: "HTTP GET http://127.0.0.1:21505/h: 200 OK"},
		"tcp":           {CheckID: "tcp", ServiceID: "web", Type: "tcp", ExposedPort: 21506},
	}
	paths, errs := exposedCheckPaths(checks, "web", 8080)
	want := []api.ExposePath{
		{ListenerPort: 21500, Path: "/health", LocalPathPort: 8080, Protocol: "http", ParsedFromCheck: true},
		{ListenerPort: 21501, Path: "/grpc.health.v1.Health/Check", LocalPathPort: 8080, Protocol: "http2", ParsedFromCheck: true},
		{ListenerPort: 21502, Path: "/ready", LocalPathPort: 8080, Protocol: "http", ParsedFromCheck: true},
	}
	if diff := cmp.Diff(want, paths); diff != "" {
		t.Errorf("paths (-want +got):\n%s", diff)
	}
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "check elsewhere") {
		t.Errorf("errors = %v, want one for the check asking another port", errs)
	}
	// A hostile path in an output is refused by the expose validation.
	hostile := map[string]*api.AgentCheck{"h": {CheckID: "h", ServiceID: "web", Type: "http", ExposedPort: 21500,
		Output: "HTTP GET http://127.0.0.1:21500/a}%0A: 200 OK"}}
	paths, _ = exposedCheckPaths(hostile, "web", 8080)
	reg := proxyReg(nil)
	reg.Proxy.Expose.Paths = paths
	sc, _, err := ParseRegistration(reg)
	if err != nil || len(sc.Expose) != 0 || len(sc.Notes) != 1 || sc.Notes[0].Level != zapcore.ErrorLevel {
		t.Errorf("a hostile check path: err %v, expose %+v, notes %+v", err, sc.Expose, sc.Notes)
	}
}
