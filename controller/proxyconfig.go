package controller

import (
	"fmt"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap/zapcore"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
)

// Proxy config keys beyond the listener's (see ParseRegistration): what
// each becomes in HAProxy is in package bootstrap (Render) and in the
// README's table. A key whose value is refused is left out with an
// error-level Note, and the rest of the registration applies.

// proxyKeys are the proxy Config keys this sidecar knows: "" for one it
// applies, else why it does not.
var proxyKeys = map[string]string{
	"protocol": "", "bind_address": "", "bind_port": "", "local_connect_timeout_ms": "",
	"local_request_timeout_ms": "", "local_idle_timeout_ms": "", "max_inbound_connections": "",
	"max_connections": "", "max_pending_requests": "", "max_concurrent_requests": "",
	"passive_health_check": "", "balance_inbound_connections": "",
	"handshake_timeout_ms":   "not supported: the built-in proxy's TLS handshake timeout; HAProxy bounds a handshake with timeout client",
	"local_service_address":  "not supported: the built-in proxy's key; set the registration's LocalServiceAddress and LocalServicePort",
	"max_request_headers_kb": "not supported: HAProxy bounds request headers with tune.bufsize (16 KB), fixed at build",
	"xds_fetch_timeout_ms":   "not supported: an Envoy xDS setting; this sidecar reads Consul's HTTP API",
	"bind_addresses":         "not supported: one public listener, on bind_address:bind_port",
}

// upstreamKeys are the upstream Config keys this sidecar knows.
var upstreamKeys = map[string]string{
	"protocol": "", "connect_timeout_ms": "", "passive_health_check": "", "limits": "",
	"balance_outbound_connections": "no-op: HAProxy's worker threads share each server's connection pool",
}

// noteRegistration notes the registration's fields that this sidecar does
// not apply.
func noteRegistration(p *api.AgentServiceConnectProxyConfig, notes *[]Note) {
	warn := func(key, reason string) {
		*notes = append(*notes, Note{Key: key, Reason: reason, Level: zapcore.WarnLevel})
	}
	if m := p.MeshGateway.Mode; m != "" && m != api.MeshGatewayModeNone && m != api.MeshGatewayModeDefault {
		warn("MeshGateway.Mode", fmt.Sprintf("%q is not supported: upstreams are reached directly, and a cross-datacenter upstream that would go through a mesh gateway is refused", m))
	}
	if p.Mode != "" && p.Mode != api.ProxyModeDefault && p.Mode != api.ProxyModeDirect {
		warn("Mode", fmt.Sprintf("%q is not supported: only explicit upstreams are served (no transparent proxy)", p.Mode))
	}
	if tp := p.TransparentProxy; tp != nil && *tp != (api.TransparentProxyConfig{}) {
		warn("TransparentProxy", "not supported: only explicit upstreams are served")
	}
	if p.AccessLogs != nil && p.AccessLogs.Enabled {
		warn("AccessLogs", "not applied: this sidecar's access log is its -access-log flag")
	}
	if len(p.EnvoyExtensions) > 0 {
		warn("EnvoyExtensions", "not supported: Envoy extensions have no meaning for HAProxy")
	}
}

// noteUnknown notes every key of cfg that keys does not apply: an Envoy
// escape hatch, a known key this sidecar does not support, or an unknown
// one. prefix names where the key is ("config ", "upstream up_x config ").
func noteUnknown(cfg map[string]any, prefix string, keys map[string]string, notes *[]Note) {
	var names []string
	for k := range cfg {
		names = append(names, k)
	}
	slices.Sort(names)
	for _, k := range names {
		reason, known := keys[k]
		switch {
		case known && reason == "":
			continue
		case strings.HasPrefix(k, "envoy_"):
			reason = "not supported: an Envoy escape hatch (raw Envoy configuration) has no meaning for HAProxy"
		case !known:
			reason = "unknown key: not applied"
		}
		*notes = append(*notes, Note{Key: prefix + k, Reason: reason, Level: zapcore.WarnLevel})
	}
}

// parseInbound reads the proxy Config keys of the inbound side into pub,
// notes what it leaves out, and returns the passive_health_check every
// upstream inherits unless its own config sets one.
func parseInbound(cfg map[string]any, pub *bootstrap.Public, notes *[]Note) bootstrap.PassiveCheck {
	bad := func(key string, err error) {
		*notes = append(*notes, Note{Key: "config " + key, Reason: err.Error() + "; left out", Level: zapcore.ErrorLevel})
	}
	http := bootstrap.Mode(pub.Protocol) == "http"
	for _, t := range []struct {
		key string
		d   *time.Duration
	}{{"local_request_timeout_ms", &pub.RequestTimeout}, {"local_idle_timeout_ms", &pub.IdleTimeout}} {
		// 0 turns Envoy's timeout off; here it leaves HAProxy's default
		// (1 h), which Render does not override.
		v, ok, err := configInt(cfg, t.key, 0, 86_400_000)
		switch {
		case err != nil:
			bad(t.key, err)
		case ok && !http && v > 0:
			*notes = append(*notes, Note{Key: "config " + t.key, Reason: "applies to HTTP listeners only; this one is " + orDefault(pub.Protocol, "tcp"), Level: zapcore.WarnLevel})
		case ok:
			*t.d = time.Duration(v) * time.Millisecond
		}
	}
	for _, l := range []struct {
		key string
		n   *int
	}{
		{"max_inbound_connections", &pub.MaxInbound}, {"max_connections", &pub.Limits.MaxConnections},
		{"max_pending_requests", &pub.Limits.MaxPendingRequests}, {"max_concurrent_requests", &pub.Limits.MaxConcurrentRequests},
	} {
		// 0 is "not set", as in Consul's service-defaults.
		if v, ok, err := configInt(cfg, l.key, 0, bootstrap.MaxLimit); err != nil {
			bad(l.key, err)
		} else if ok {
			*l.n = v
		}
	}
	if pub.Limits.MaxConcurrentRequests > 0 && !http {
		*notes = append(*notes, Note{Key: "config max_concurrent_requests", Reason: "applies to HTTP listeners only (max_connections bounds tcp)", Level: zapcore.WarnLevel})
		pub.Limits.MaxConcurrentRequests = 0
	}
	if v, ok, err := configString(cfg, "balance_inbound_connections"); err != nil {
		bad("balance_inbound_connections", err)
	} else if ok {
		switch v {
		case "", "exact_balance":
			// Envoy's exact_balance hands each accepted connection to the
			// worker thread with the fewest. HAProxy 2.6 does about that
			// by default (tune.listener.multi-queue: the accepting thread
			// passes each connection to the less loaded of two), and has
			// no exact mode: nothing to render.
			if v != "" {
				*notes = append(*notes, Note{Key: "config balance_inbound_connections", Reason: "no-op: HAProxy's listener multi-queue already spreads accepted connections over threads by load", Level: zapcore.InfoLevel})
			}
		default:
			bad("balance_inbound_connections", fmt.Errorf("%q is not exact_balance", v))
		}
	}
	passive, _, err := parsePassive(cfg, "config ", notes)
	if err != nil {
		bad("passive_health_check", err)
	}
	noteUnknown(cfg, "config ", proxyKeys, notes)
	return passive
}

// parsePassive reads passive_health_check from cfg. Consul writes it in
// either of two spellings: as the registration gives it (interval "10s",
// max_failures), or, merged from service-defaults, as its Go struct in
// JSON (Interval in nanoseconds, MaxFailures). Absent fields take Envoy's
// defaults, as Consul leaves them to Envoy: 10 s and 5.
func parsePassive(cfg map[string]any, prefix string, notes *[]Note) (bootstrap.PassiveCheck, bool, error) {
	raw, ok := cfg["passive_health_check"]
	if !ok || raw == nil {
		return bootstrap.PassiveCheck{}, false, nil
	}
	m, ok := raw.(map[string]any)
	if !ok {
		return bootstrap.PassiveCheck{}, false, fmt.Errorf("want an object, got %T", raw)
	}
	pc := bootstrap.PassiveCheck{Interval: 10 * time.Second, MaxFailures: 5}
	fields := map[string]any{}
	var keys []string
	for k, v := range m {
		norm := strings.ToLower(strings.ReplaceAll(k, "_", ""))
		fields[norm] = v
		keys = append(keys, norm)
	}
	slices.Sort(keys)
	for _, k := range keys {
		v := fields[k]
		switch k {
		case "interval":
			d, err := configDuration(v)
			if err != nil {
				return bootstrap.PassiveCheck{}, false, fmt.Errorf("interval: %w", err)
			}
			if d > 0 {
				pc.Interval = d
			}
		case "maxfailures":
			n, _, err := configInt(map[string]any{"max_failures": v}, "max_failures", 0, bootstrap.MaxFailures)
			if err != nil {
				return bootstrap.PassiveCheck{}, false, err
			}
			if n > 0 {
				pc.MaxFailures = n
			}
		case "enforcingconsecutive5xx":
			n, _, err := configInt(map[string]any{"enforcing_consecutive_5xx": v}, "enforcing_consecutive_5xx", 0, 100)
			if err != nil {
				return bootstrap.PassiveCheck{}, false, err
			}
			if n == 0 {
				// Envoy then never ejects: the check is off.
				return bootstrap.PassiveCheck{}, false, nil
			}
			if n < 100 {
				*notes = append(*notes, Note{Key: prefix + "passive_health_check.enforcing_consecutive_5xx",
					Reason: "HAProxy marks a server down every time it reaches max_failures (as 100)", Level: zapcore.WarnLevel})
			}
		case "maxejectionpercent", "baseejectiontime":
			*notes = append(*notes, Note{Key: prefix + "passive_health_check." + k,
				Reason: "not supported: HAProxy may mark every server down, and puts one back after two good checks at interval", Level: zapcore.WarnLevel})
		default:
			*notes = append(*notes, Note{Key: prefix + "passive_health_check." + k, Reason: "unknown field: not applied", Level: zapcore.WarnLevel})
		}
	}
	if pc.Interval < time.Millisecond || pc.Interval > time.Hour {
		return bootstrap.PassiveCheck{}, false, fmt.Errorf("interval %s out of range 1ms-1h", pc.Interval)
	}
	return pc, true, nil
}

// parseLimits reads an upstream's "limits", in either of Consul's
// spellings (max_connections, or MaxConnections from service-defaults).
// 0 is "not set". max_pending_requests is noted: nothing waits in a
// queue before an upstream (see bootstrap.Render).
func parseLimits(cfg map[string]any, prefix string, notes *[]Note) (bootstrap.Limits, error) {
	raw, ok := cfg["limits"]
	if !ok || raw == nil {
		return bootstrap.Limits{}, nil
	}
	m, ok := raw.(map[string]any)
	if !ok {
		return bootstrap.Limits{}, fmt.Errorf("want an object, got %T", raw)
	}
	var l bootstrap.Limits
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		var dst *int
		switch name := strings.ToLower(strings.ReplaceAll(k, "_", "")); name {
		case "maxconnections":
			dst = &l.MaxConnections
		case "maxpendingrequests":
			dst = &l.MaxPendingRequests
		case "maxconcurrentrequests":
			dst = &l.MaxConcurrentRequests
		default:
			*notes = append(*notes, Note{Key: prefix + "limits." + k, Reason: "unknown field: not applied", Level: zapcore.WarnLevel})
			continue
		}
		n, _, err := configInt(map[string]any{k: m[k]}, k, 0, bootstrap.MaxLimit)
		if err != nil {
			return bootstrap.Limits{}, err
		}
		*dst = n
	}
	if l.MaxPendingRequests > 0 {
		*notes = append(*notes, Note{Key: prefix + "limits.max_pending_requests",
			Reason: "no-op for an upstream: requests past its limits are refused at once, none waits in a queue", Level: zapcore.InfoLevel})
	}
	return l, nil
}

// configDuration reads a duration: a Go duration string, or a number of
// nanoseconds (a time.Duration in JSON).
func configDuration(v any) (time.Duration, error) {
	switch x := v.(type) {
	case string:
		d, err := time.ParseDuration(strings.TrimSpace(x))
		if err != nil || d < 0 {
			return 0, fmt.Errorf("%q is not a duration", x)
		}
		return d, nil
	case nil:
		return 0, nil
	}
	n, _, err := configInt(map[string]any{"nanoseconds": v}, "nanoseconds", 0, int(time.Hour))
	return time.Duration(n), err
}

// parseExpose reads Proxy.Expose.Paths, those Consul adds for
// Expose.Checks included. A path that is invalid or whose listener port
// is taken is left out with an error Note; the others are served.
func parseExpose(e api.ExposeConfig, pub bootstrap.Public, binds map[string]string, notes *[]Note) []bootstrap.ExposePath {
	var out []bootstrap.ExposePath
	for i, p := range e.Paths {
		ep := bootstrap.ExposePath{ListenerPort: p.ListenerPort, Path: p.Path, LocalPort: p.LocalPathPort, Protocol: strings.ToLower(p.Protocol)}
		if ep.Protocol == "" {
			ep.Protocol = "http"
		}
		key := fmt.Sprintf("Expose.Paths[%d]", i)
		err := bootstrap.CheckExpose(ep)
		bind := bindKey(pub.BindAddr, ep.ListenerPort)
		if other, taken := binds[bind]; err == nil && taken {
			err = fmt.Errorf("listener %s is already bound by %s", bind, other)
		}
		if err != nil {
			*notes = append(*notes, Note{Key: key, Reason: err.Error() + "; left out", Level: zapcore.ErrorLevel})
			continue
		}
		binds[bind] = "expose path " + ep.Path
		out = append(out, ep)
	}
	slices.SortFunc(out, func(a, b bootstrap.ExposePath) int { return a.ListenerPort - b.ListenerPort })
	return out
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// grpcHealthPath is the one path a gRPC health check asks (grpc.health.v1).
const grpcHealthPath = "/grpc.health.v1.Health/Check"

// checkURLRE finds the URL an HTTP check asked in its output: Consul
// writes "HTTP GET <url>: 200 OK Output: ..." for an answer and
// `Get "<url>": dial tcp ...` for a failed request. A URL longer than
// maxCheckURL bytes is not read (its length is checked beside the
// expression: a bounded repetition compiles to that many copies).
var checkURLRE = regexp.MustCompile(`^(?:HTTP [A-Z]{1,16} (http://[^\s"]+): |[A-Z][a-z]{1,16} "(http://[^\s"]+)": )`)

const maxCheckURL = 1000

// exposedCheckPaths are the expose paths of the destination service's
// checks when the registration says Expose.Checks. The agent does not add
// them to the proxy's registration: it gives each HTTP and gRPC check of
// the service a listener port from its expose range (21500 up) as the
// check's ExposedPort, and runs the check against the proxy at that port.
// Envoy learns the paths over xDS from the checks' definitions (Consul
// agent/proxycfg, parseCheckPath), which the HTTP API does not serve
// (Definition is empty in /v1/agent/checks and /v1/health/checks on
// 1.22). So: the listener port is ExposedPort; the path of an HTTP check
// is the one its output shows it asked (the agent rewrites only the host
// and port), and a gRPC check's is the health service's; the application
// is reached at the service's own port, localPort, as Consul's own
// sidecar registration assumes. An HTTP check that has not run yet has no
// path: it is left out until its output shows one (the next poll).
func exposedCheckPaths(checks map[string]*api.AgentCheck, serviceID string, localPort int) ([]api.ExposePath, []error) {
	var out []api.ExposePath
	var errs []error
	for _, ch := range checks {
		if ch == nil || ch.ExposedPort == 0 || !strings.EqualFold(ch.ServiceID, serviceID) {
			continue
		}
		p := api.ExposePath{ListenerPort: ch.ExposedPort, LocalPathPort: localPort, ParsedFromCheck: true}
		switch ch.Type {
		case "http":
			m := checkURLRE.FindStringSubmatch(ch.Output)
			if m == nil || len(m[1]+m[2]) > maxCheckURL {
				continue // not run yet
			}
			u, err := url.Parse(m[1] + m[2])
			if err != nil || u.Port() != strconv.Itoa(ch.ExposedPort) {
				errs = append(errs, fmt.Errorf("check %s: its output does not show a request to the expose port %d: %q", ch.CheckID, ch.ExposedPort, truncate(ch.Output, 120)))
				continue
			}
			p.Path, p.Protocol = u.Path, "http"
			if p.Path == "" {
				p.Path = "/"
			}
		case "grpc":
			p.Path, p.Protocol = grpcHealthPath, "http2"
		default:
			continue
		}
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b api.ExposePath) int { return a.ListenerPort - b.ListenerPort })
	slices.SortFunc(errs, func(a, b error) int { return strings.Compare(a.Error(), b.Error()) })
	return out, errs
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}
