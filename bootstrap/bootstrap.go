// Package bootstrap renders the HAProxy configuration (and its SPOE file)
// for one sidecar from a Spec: the public mTLS listener, the local app
// backend, and per upstream a frontend and a backend of server slots. It is
// pure: it validates every value and returns text; it writes nothing.
package bootstrap

import (
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/haproxy-connect/haproxy-connect/authzgen"
	"github.com/haproxy-connect/haproxy-connect/input"
	"github.com/haproxy-connect/haproxy-connect/slots"
)

// ErrInvalid is wrapped by every validation error.
var ErrInvalid = errors.New("invalid sidecar spec")

// Spec describes one sidecar. Every string in it may come from Consul, and
// is validated before it reaches the configuration.
type Spec struct {
	// Service is the destination service this sidecar fronts (logs only).
	Service string
	// Files, all absolute paths. Leaf holds the leaf chain and its key,
	// Roots every trusted CA root. AuthzMap holds one entry, "gen <n>":
	// the intentions generation, changed at run time with "set map".
	// CrtList is the public listener's certificate list (RenderCrtList).
	LeafFile, RootsFile, SPOEFile, AuthzMap, CrtList string
	// InstanceMap and StateMap, when set, are the slot-to-instance map
	// and the state map (absolute paths; see maps.go). Reason is why this
	// configuration is loaded (a reload's reason, or the start), and
	// ConfigID an identifier of it, both for the state map.
	InstanceMap, StateMap, Reason, ConfigID string
	// L7Map, when set, is the L7 map (an absolute path): the L7
	// permissions HAProxy decides itself (package l7, Compile), which
	// the controller writes and keeps current at run time. Empty: every
	// request under an L7 intention goes to the agent.
	L7Map string
	// SourcesMap, when set, is the public listener's sources map (an
	// absolute path): the SPIFFE ID of each client certificate whose
	// allow the listener remembers, keyed by the certificate's SHA-256
	// (upper-case hex), written by an HTTP listener's own rules or by the
	// controller for a tcp listener, and cleared by the controller (see
	// Render). Empty: an HTTP listener remembers no allow, and asks the
	// agent on every new connection; a tcp listener remembers allows
	// without the caller's name (access log src=cached).
	SourcesMap string `json:",omitzero"`
	// SNI is the public listener's certificate list filter: the service's
	// Consul SNI name (certs.ID.SNI). What matters is that there is one;
	// see RenderCrtList.
	SNI string
	// SPOASocket is the SPOE agent's unix socket, an absolute path (in
	// the private state directory, so that only this user can reach the
	// agent, which answers as an intentions oracle with the sidecar's
	// token).
	SPOASocket string
	// ExporterSocket, when set, is the unix socket (an absolute path in
	// the private state directory) on which HAProxy serves its built-in
	// Prometheus exporter, for the sidecar's /metrics to include (see
	// Render). Empty: no exporter.
	ExporterSocket string
	// HardStopAfter bounds how long an old worker may live after a reload.
	HardStopAfter time.Duration
	// AccessLog sends one log line per connection/request to stdout.
	AccessLog bool
	// Threads is HAProxy's nbthread; 0 leaves HAProxy's default, one
	// thread per CPU the process may run on (which ignores CPU quotas).
	Threads   int
	Public    Public
	Upstreams []Upstream
	// The fields of issue 14 (Expose, and in Public and Upstream) are left
	// out of the JSON when zero: a sidecar that sets none of them has the
	// configuration id (package controller) it had before them, so an
	// upgrade adopts its HAProxy without a reload.
	//
	// Expose are the plain HTTP listeners that forward one path each to
	// the local application (the registration's Proxy.Expose.Paths).
	Expose []ExposePath `json:",omitzero"`
}

// Limits bound the connections and requests to a cluster (Envoy's circuit
// breakers, Consul's "limits"); zero means not set. See Render for what
// each becomes in HAProxy.
type Limits struct {
	MaxConnections        int
	MaxPendingRequests    int
	MaxConcurrentRequests int
}

// PassiveCheck is Consul's passive_health_check: a server that fails
// MaxFailures requests (or connections) in a row is marked down, and
// checked every Interval until it answers again. Zero MaxFailures: off.
type PassiveCheck struct {
	Interval    time.Duration
	MaxFailures int
}

// ExposePath is one path of the local application served without mTLS on
// its own listener (Consul's Expose.Paths), for the agent's HTTP and gRPC
// checks and for metrics scrapers.
type ExposePath struct {
	ListenerPort int
	Path         string
	LocalPort    int    // the application's port serving Path
	Protocol     string // http (default) or http2
}

// Public is the inbound mTLS listener and the local application behind it.
type Public struct {
	BindAddr       string
	BindPort       int
	Protocol       string // tcp (default), http, http2, grpc
	LocalAddr      string
	LocalPort      int
	ConnectTimeout time.Duration // local_connect_timeout_ms
	// LocalSocket, when set, is the application's unix socket
	// (local_service_socket_path), used instead of LocalAddr:LocalPort.
	LocalSocket string `json:",omitzero"`
	// RequestTimeout and IdleTimeout are local_request_timeout_ms and
	// local_idle_timeout_ms (HTTP only), MaxInbound max_inbound_connections,
	// and Limits the local application's; zero means not set.
	RequestTimeout time.Duration `json:",omitzero"`
	IdleTimeout    time.Duration `json:",omitzero"`
	MaxInbound     int           `json:",omitzero"`
	Limits         Limits        `json:",omitzero"`
}

// Upstream is one local port forwarding to a service's endpoints.
type Upstream struct {
	// Name is the backend and frontend identifier (see UpstreamName).
	Name string
	// Destination is the upstream service (or prepared query) name.
	Destination    string
	BindAddr       string
	BindPort       int
	Protocol       string
	ConnectTimeout time.Duration
	// SocketPath, when set, is the unix socket the upstream listens on
	// (local_bind_socket_path) instead of BindAddr:BindPort, with the
	// permission bits SocketMode ("0600" when empty).
	SocketPath string `json:",omitzero"`
	SocketMode string `json:",omitzero"`
	// Passive is the upstream's passive_health_check, Limits its limits.
	Passive PassiveCheck `json:",omitzero"`
	Limits  Limits       `json:",omitzero"`
	// Slots is the current endpoint-to-slot assignment; its size is the
	// number of servers rendered.
	Slots slots.Table
	// Instances names the Consul instance of each used slot for the
	// instance map: instance ID by endpoint key (slots.Endpoint.Key).
	Instances map[string]string
	// ServerID, when set, is the SPIFFE ID every server of the backend
	// must present: a response from a server whose certificate does not
	// carry it is refused (see Render). Empty for a prepared query, whose
	// instances may serve different services.
	ServerID string
	// Routing, when set, routes the frontend's requests over the
	// discovery chain's targets (chain.go).
	Routing *Routing
	// Target, when set, makes this a chain target's backend: no
	// frontend, no bind (chain.go).
	Target *TargetBackend
}

// MaxSocketPath is the longest unix socket path accepted.
const MaxSocketPath = 100

// Names of the fixed sections, used by the controller too.
const (
	PublicFrontend = "public_listener"
	LocalBackend   = "local_app"
	SPOEBackend    = "spoe_agents"
	// ExporterFrontend serves HAProxy's Prometheus exporter
	// (Spec.ExporterSocket). Its series carry proxy="prometheus".
	ExporterFrontend = "prometheus"
	// The SPOE and authz map names are the authorization protocol's
	// (package authzgen), shared with the agent and the controller.
	SPOEEngine = authzgen.Engine
	SPOEGroup  = authzgen.Group
	VarPrefix  = authzgen.VarPrefix
	// AuthzGenKey is the AuthzMap key holding the intentions generation.
	AuthzGenKey = authzgen.MapKey
	SlotPrefix  = "s"
	// AuthzCacheSize bounds the allows a listener's worker remembers
	// (see Render): client certificates, and on an HTTP listener the
	// request shapes of L7 sources too; past it HAProxy drops the least
	// recently used, which are asked about again.
	AuthzCacheSize = 20000
	// AuthzCacheExpire is how long a listener's worker remembers an
	// allow its certificate has not used (the stick table's expire, in
	// whole minutes). The controller clears the sources map as often.
	AuthzCacheExpire = 10 * time.Minute
	// MaxThreads is HAProxy's build-time thread limit (MAX_THREADS, 64
	// on the 64-bit builds Debian ships).
	MaxThreads = 64
	// GoawayIdleTimeout is how long an HTTP listener keeps an HTTP/2
	// connection it sent a GOAWAY on (after a reload, in the old
	// worker) once no stream is left on it ("timeout client-fin").
	GoawayIdleTimeout = 5 * time.Second
	// H2MaxStreams is how many concurrent streams a listener lets one
	// HTTP/2 connection carry (HAProxy's default: 100). A calling sidecar
	// whose connections to an endpoint are full opens another for each
	// request, and with ALPN a new connection carries nothing until its
	// handshake ends: while the endpoint's sidecar is slow, during its
	// reload, a burst of requests opens hundreds. Its old worker accepts
	// them, then stops and sends a GOAWAY on each, which fails every
	// request waiting on it; each of those retries on the next such
	// connection and can run out of retries (runtime/HAPROXY26.md). With
	// room for a whole burst on the connections already open, the burst
	// opens none.
	H2MaxStreams = 1000
	// SSLSessionCache is the size of the listeners' TLS session cache,
	// in HAProxy's blocks of about 200 bytes; a session holding the
	// caller's certificate takes several (HAProxy's default: 20 000
	// blocks, about 5 MB, which a one-thread worker holds as private
	// memory it touches). The public listener's callers are sidecars,
	// whose upstream servers never resume (no-ssl-reuse), so a small
	// cache is enough: it keeps resumption for other callers, TLS 1.3
	// ones included since the listener issues no stateless tickets
	// (no-tls-tickets, rendered below).
	SSLSessionCache = 1000
)

// serverIDRE is the shape of a Consul service SPIFFE ID: a trust domain
// of at most 253 bytes, then partition, namespace, datacenter and service
// names of at most 63 (checked by CheckServerID: a bounded repetition
// compiles to that many copies of its class).
var serverIDRE = regexp.MustCompile(`^spiffe://([A-Za-z0-9.-]+)(?:/ap/([A-Za-z0-9_.-]+))?/ns/([A-Za-z0-9_.-]+)/dc/([A-Za-z0-9_.-]+)/svc/([A-Za-z0-9_.-]+)$`)

// UpstreamName derives the HAProxy identifier of an upstream from its
// destination and datacenter ("up_web", "up_web_dc2"). It fails for names
// outside HAProxy's identifier alphabet instead of rewriting them, so two
// names can never collide into one backend.
func UpstreamName(destination, datacenter string) (string, error) {
	if _, err := input.Name("upstream destination", destination); err != nil {
		return "", invalid(err)
	}
	name := "up_" + destination
	if datacenter != "" {
		if _, err := input.Datacenter("upstream datacenter", datacenter); err != nil {
			return "", invalid(err)
		}
		name += "_" + datacenter
	}
	return name, nil
}

// invalid wraps an input rejection (which names the field and the reason)
// as an invalid spec.
func invalid(err error) error { return fmt.Errorf("%w: %w", ErrInvalid, err) }

// Mode maps a Consul protocol to an HAProxy mode. Unknown protocols are
// served as tcp, as Consul's own proxies do.
func Mode(protocol string) string {
	switch protocol {
	case "http", "http2", "grpc":
		return "http"
	}
	return "tcp"
}

// UpstreamProto is the mux an upstream's servers speak whatever ALPN
// says: "h2" for http2 and grpc, whose application answers only HTTP/2,
// none otherwise. A peer that negotiates no ALPN (Consul's built-in
// proxy, which hands the bytes to the application) would otherwise get
// HTTP/1.1. And a connection with a fixed mux takes streams during its
// handshake: with ALPN, every request that finds the open connections
// full opens one more until a handshake ends (runtime/HAPROXY26.md).
// Dynamic servers do not inherit default-server on 2.6, so the
// controller adds it to each.
func UpstreamProto(protocol string) string {
	switch protocol {
	case "http2", "grpc":
		return "h2"
	}
	return ""
}

// UpstreamALPN is the ALPN list an upstream's servers offer the other
// sidecar for protocol: "h2,http/1.1" for http (see Render), "h2" for
// http2 and grpc, none for tcp. Dynamic servers ("add server") do not
// inherit default-server on 2.6, so the controller adds it to each.
func UpstreamALPN(protocol string) string {
	switch protocol {
	case "http":
		return "h2,http/1.1"
	case "http2", "grpc":
		return "h2"
	}
	return ""
}

// localProto is the option of the local application's server line for
// protocol. A grpc or http2 application speaks HTTP/2 in clear text with
// prior knowledge, and only that (grpc-go's server, like Go's with
// Protocols set to unencrypted HTTP/2 alone, resets a connection that
// opens with an HTTP/1.1 request): "proto h2" makes HAProxy speak h2 to
// it whatever the other sidecar spoke, HTTP/1.1 requests included.
// Without it HAProxy 2.6 speaks HTTP/1.1 to the application and every
// request gets a 502. An http application is reached over HTTP/1.1.
func localProto(protocol string) string {
	switch protocol {
	case "http2", "grpc":
		return " proto h2"
	}
	return ""
}

func checkProtocol(what, p string) error {
	switch p {
	case "", "tcp", "http", "http2", "grpc":
		return nil
	}
	return fmt.Errorf("%w: %s protocol %q (want tcp, http, http2 or grpc)", ErrInvalid, what, p)
}

func checkAddrPort(what, addr string, port int) error {
	if _, err := input.Addr(what+" address", addr); err != nil {
		return invalid(err)
	}
	if _, err := input.Port(what+" port", port); err != nil {
		return invalid(err)
	}
	return nil
}

func checkTimeout(what string, d time.Duration) error {
	if d < 0 || d > 24*time.Hour {
		return fmt.Errorf("%w: %s timeout %s out of range 0-24h", ErrInvalid, what, d)
	}
	return nil
}

// ValidateUpstream checks one upstream on its own, so that a caller can
// drop a bad one and keep the rest.
func ValidateUpstream(u Upstream) error {
	if _, err := input.Ident("upstream name", u.Name); err != nil {
		return invalid(err)
	}
	if _, err := input.Name("upstream "+u.Name+" destination", u.Destination); err != nil {
		return invalid(err)
	}
	if u.Target != nil {
		if err := validateTarget(u); err != nil {
			return err
		}
	} else if u.SocketPath != "" {
		if err := checkSocket("upstream "+u.Name+" socket", u.SocketPath); err != nil {
			return err
		}
		if _, err := input.SocketMode("upstream "+u.Name+" socket mode", u.SocketMode); u.SocketMode != "" && err != nil {
			return invalid(err)
		}
	} else if err := checkAddrPort("upstream "+u.Name+" bind", u.BindAddr, u.BindPort); err != nil {
		return err
	}
	if u.Routing != nil {
		if err := validateRouting(u); err != nil {
			return err
		}
	}
	if err := checkProtocol("upstream "+u.Name, u.Protocol); err != nil {
		return err
	}
	if err := checkTimeout("upstream "+u.Name+" connect", u.ConnectTimeout); err != nil {
		return err
	}
	if err := checkPassive("upstream "+u.Name, u.Passive); err != nil {
		return err
	}
	if err := checkLimits("upstream "+u.Name, u.Limits); err != nil {
		return err
	}
	if err := CheckServerID(u.ServerID); u.ServerID != "" && err != nil {
		return fmt.Errorf("upstream %s: %w", u.Name, err)
	}
	if u.Slots.Backend != u.Name || u.Slots.Prefix != SlotPrefix || len(u.Slots.Slots) == 0 {
		return fmt.Errorf("%w: upstream %s slot table (backend %q, prefix %q, %d slots)", ErrInvalid, u.Name, u.Slots.Backend, u.Slots.Prefix, len(u.Slots.Slots))
	}
	for _, s := range u.Slots.Slots {
		if s.Used {
			if err := checkAddrPort("upstream "+u.Name+" endpoint", s.Addr, s.Port); err != nil {
				return err
			}
			if _, err := input.Weight("upstream "+u.Name+" endpoint weight", s.Weight); err != nil {
				return invalid(err)
			}
		}
	}
	return nil
}

// MaxLimit bounds every connection and request limit (Limits,
// max_inbound_connections): far above what one sidecar serves, and far
// below HAProxy's integer limits.
const MaxLimit = 1_000_000

// checkSocket checks a unix socket path: absolute, of input.Path's
// alphabet, and short enough for sun_path (108 bytes with its NUL), which
// HAProxy refuses longer.
func checkSocket(what, path string) error {
	if _, err := input.Path(what, path); err != nil {
		return invalid(err)
	}
	if len(path) > MaxSocketPath {
		return fmt.Errorf("%w: %s %q is longer than %d bytes", ErrInvalid, what, path, MaxSocketPath)
	}
	return nil
}

func checkLimit(what string, n int) error {
	if n < 0 || n > MaxLimit {
		return fmt.Errorf("%w: %s %d out of range 0-%d", ErrInvalid, what, n, MaxLimit)
	}
	return nil
}

func checkLimits(what string, l Limits) error {
	for _, c := range []struct {
		key string
		n   int
	}{{"max_connections", l.MaxConnections}, {"max_pending_requests", l.MaxPendingRequests}, {"max_concurrent_requests", l.MaxConcurrentRequests}} {
		if err := checkLimit(what+" "+c.key, c.n); err != nil {
			return err
		}
	}
	return nil
}

// MaxFailures bounds passive_health_check's max_failures.
const MaxFailures = 10000

func checkPassive(what string, p PassiveCheck) error {
	if p.MaxFailures < 0 || p.MaxFailures > MaxFailures {
		return fmt.Errorf("%w: %s passive_health_check max_failures %d out of range 0-%d", ErrInvalid, what, p.MaxFailures, MaxFailures)
	}
	if p.MaxFailures > 0 && (p.Interval < time.Millisecond || p.Interval > time.Hour) {
		return fmt.Errorf("%w: %s passive_health_check interval %s out of range 1ms-1h", ErrInvalid, what, p.Interval)
	}
	return nil
}

// CheckExpose checks one expose path on its own.
func CheckExpose(e ExposePath) error {
	if _, err := input.Port("expose listener port", e.ListenerPort); err != nil {
		return invalid(err)
	}
	if _, err := input.Port("expose local path port", e.LocalPort); err != nil {
		return invalid(err)
	}
	if _, err := input.ExposePath("expose path", e.Path); err != nil {
		return invalid(err)
	}
	switch e.Protocol {
	case "", "http", "http2":
		return nil
	}
	return fmt.Errorf("%w: expose path %s protocol %q (want http or http2)", ErrInvalid, e.Path, e.Protocol)
}

// CheckServerID reports whether id is a Consul service SPIFFE ID that
// Upstream.ServerID can carry.
func CheckServerID(id string) error {
	m := serverIDRE.FindStringSubmatch(id)
	ok := m != nil && len(m[1]) <= 253
	for _, name := range m[min(len(m), 2):] {
		ok = ok && len(name) <= 63
	}
	if !ok {
		return fmt.Errorf("%w: server identity %q is not a Consul service SPIFFE ID", ErrInvalid, id)
	}
	return nil
}

// sanPattern is the hex of the URI SAN id as DER encodes it in a
// certificate's SubjectAltName: the GeneralName tag [6] (0x86), the length,
// the URI's bytes. With the tag and the exact length, a longer URI that
// starts with id (".../svc/web-admin" for ".../svc/web") does not match.
func sanPattern(id string) string {
	var b []byte
	switch n := len(id); {
	case n < 0x80:
		b = []byte{0x86, byte(n)}
	case n <= 0xff:
		b = []byte{0x86, 0x81, byte(n)}
	default:
		b = []byte{0x86, 0x82, byte(n >> 8), byte(n)}
	}
	return strings.ToUpper(hex.EncodeToString(append(b, id...)))
}

// ValidatePublic checks the public listener on its own, so that a caller
// can refuse a registration with the reason before rendering anything.
func ValidatePublic(p Public) error {
	if err := checkAddrPort("public listener", p.BindAddr, p.BindPort); err != nil {
		return err
	}
	if p.LocalSocket != "" {
		if err := checkSocket("local service socket", p.LocalSocket); err != nil {
			return err
		}
	} else if err := checkAddrPort("local service", p.LocalAddr, p.LocalPort); err != nil {
		return err
	}
	if err := checkProtocol("public listener", p.Protocol); err != nil {
		return err
	}
	for _, t := range []struct {
		what string
		d    time.Duration
	}{{"local connect", p.ConnectTimeout}, {"local request", p.RequestTimeout}, {"local idle", p.IdleTimeout}} {
		if err := checkTimeout(t.what, t.d); err != nil {
			return err
		}
	}
	if err := checkLimit("max_inbound_connections", p.MaxInbound); err != nil {
		return err
	}
	return checkLimits("local service", p.Limits)
}

// Validate checks the whole spec.
func (s Spec) Validate() error {
	if s.Service != "" {
		if _, err := input.Name("service name", s.Service); err != nil {
			return invalid(err)
		}
	}
	for _, f := range []string{s.LeafFile, s.RootsFile, s.SPOEFile, s.AuthzMap, s.CrtList} {
		if _, err := input.Path("file path", f); err != nil {
			return invalid(err)
		}
	}
	for _, f := range []string{s.InstanceMap, s.StateMap, s.L7Map, s.SourcesMap} {
		if _, err := input.Path("map path", f); f != "" && err != nil {
			return invalid(err)
		}
	}
	if _, err := input.InstanceID("config ID", s.ConfigID); s.ConfigID != "" && err != nil {
		return invalid(err)
	}
	if !ValidSNI(s.SNI) {
		return fmt.Errorf("%w: public listener SNI name %q", ErrInvalid, s.SNI)
	}
	// A unix socket path fits in sun_path (108 bytes with its NUL);
	// HAProxy refuses longer ones.
	if _, err := input.Path("spoe agent socket", s.SPOASocket); err != nil {
		return invalid(err)
	}
	if len(s.SPOASocket) > MaxSocketPath {
		return fmt.Errorf("%w: spoe agent socket %q is longer than %d bytes", ErrInvalid, s.SPOASocket, MaxSocketPath)
	}
	if s.ExporterSocket != "" {
		if _, err := input.Path("exporter socket", s.ExporterSocket); err != nil {
			return invalid(err)
		}
		if len(s.ExporterSocket) > MaxSocketPath {
			return fmt.Errorf("%w: exporter socket %q is longer than %d bytes", ErrInvalid, s.ExporterSocket, MaxSocketPath)
		}
	}
	if s.HardStopAfter <= 0 || s.HardStopAfter > 24*time.Hour {
		return fmt.Errorf("%w: hard-stop-after %s", ErrInvalid, s.HardStopAfter)
	}
	if s.Threads < 0 || s.Threads > MaxThreads {
		return fmt.Errorf("%w: %d threads (want 0 for HAProxy's default, or 1 to %d)", ErrInvalid, s.Threads, MaxThreads)
	}
	p := s.Public
	if err := ValidatePublic(p); err != nil {
		return err
	}
	seenName := map[string]bool{}
	seenBind := map[string]string{netip.AddrPortFrom(netip.MustParseAddr(p.BindAddr), uint16(p.BindPort)).String(): "public listener"}
	for _, u := range s.Upstreams {
		if err := ValidateUpstream(u); err != nil {
			return err
		}
		if seenName[u.Name] {
			return fmt.Errorf("%w: two upstreams named %s", ErrInvalid, u.Name)
		}
		seenName[u.Name] = true
		if u.Target != nil {
			continue
		}
		b := "unix@" + u.SocketPath
		if u.SocketPath == "" {
			b = netip.AddrPortFrom(netip.MustParseAddr(u.BindAddr), uint16(u.BindPort)).String()
		}
		if other, ok := seenBind[b]; ok {
			return fmt.Errorf("%w: upstream %s binds %s, already bound by %s", ErrInvalid, u.Name, b, other)
		}
		seenBind[b] = u.Name
	}
	for _, e := range s.Expose {
		if err := CheckExpose(e); err != nil {
			return err
		}
		if err := checkAddrPort("expose path "+e.Path+" local", p.LocalAddr, e.LocalPort); err != nil {
			return err
		}
		b := addr(p.BindAddr, e.ListenerPort)
		if other, ok := seenBind[b]; ok {
			return fmt.Errorf("%w: expose path %s binds %s, already bound by %s", ErrInvalid, e.Path, b, other)
		}
		seenBind[b] = "expose path " + e.Path
	}
	return nil
}

// addr renders an address for a bind or server line (IPv6 in brackets is
// not needed by HAProxy's "addr:port" parser, which splits on the last
// colon, but brackets read better and are accepted).
func addr(a string, port int) string {
	return netip.AddrPortFrom(netip.MustParseAddr(a), uint16(port)).String()
}

func ms(d time.Duration) string { return strconv.FormatInt(d.Milliseconds(), 10) + "ms" }

// Render returns the HAProxy configuration for s. Beyond validating s, it
// checks what it wrote: every line must have one of the shapes in
// configShapes, in a section (see CheckConfig). A value that slipped past
// validation and ended a line early fails that check, here and at run
// time, instead of reaching HAProxy.
func Render(s Spec) (string, error) {
	out, err := renderConfig(s)
	if err != nil {
		return "", err
	}
	if err := CheckConfig(out); err != nil {
		return "", err
	}
	return out, nil
}

func renderConfig(s Spec) (string, error) {
	if err := s.Validate(); err != nil {
		return "", err
	}
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }

	w("# Rendered by haproxy-connect for service %s. Endpoints and certificates", orDash(s.Service))
	w("# change at run time through the master socket; this file changes only")
	w("# when upstreams, binds or modes do.")
	w("global")
	w("    master-worker")
	w("    hard-stop-after %s", ms(s.HardStopAfter))
	if s.Threads > 0 {
		w("    nbthread %d", s.Threads)
	}
	// no-tls-tickets: the public listener keeps resumable sessions in
	// its session cache (SSLSessionCache) instead of sealing each one
	// into two stateless TLS 1.3 tickets per handshake. Its callers are
	// sidecars, whose servers are no-ssl-reuse, and their identity
	// proofs: neither resumes, so the sealed tickets were thrown away,
	// and with OpenSSL 3.0 sealing them was a large share of the
	// listener's CPU per handshake (BenchmarkProofHAProxy in verify).
	// Other callers still resume through the cache.
	w("    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets")
	w("    ssl-default-server-options ssl-min-ver TLSv1.2")
	w("    tune.ssl.default-dh-param 2048")
	w("    tune.h2.max-concurrent-streams %d", H2MaxStreams)
	w("    tune.ssl.cachesize %d", SSLSessionCache)
	if s.AccessLog {
		// Only frontends name this logger ("log global" in each that
		// logs), not the defaults: a backend without a logger reports a
		// server's state change once, on stderr, where HAProxy 2.6 prints
		// it anyway ("[WARNING] ... is going DOWN for maintenance"), not
		// twice. One line per slot change is what endpoint churn costs.
		w("    log stdout format raw local0 info")
	}
	if s.StateMap != "" {
		// HAProxy loads a map file only for a converter that names it, and
		// "show map" shows only loaded maps: this line is what makes the
		// state map readable from the master socket. Evaluated once, at
		// start and at each reload.
		w("    set-var proc.%s.config_id str(%s),map(%s,-)", VarPrefix, StateConfigIDKey, s.StateMap)
	}
	w("")
	w("defaults")
	w("    timeout connect 5s")
	w("    timeout client 1h")
	w("    timeout server 1h")
	w("    timeout http-request 30s")
	w("    timeout http-keep-alive 1m")
	w("")

	p := s.Public
	mode := Mode(p.Protocol)
	w("frontend %s", PublicFrontend)
	w("    mode %s", mode)
	if p.MaxInbound > 0 {
		// max_inbound_connections. Envoy closes a connection over the
		// limit; HAProxy stops accepting, and the connection waits in
		// the kernel's accept queue until one ends.
		w("    maxconn %d", p.MaxInbound)
	}
	if mode == "http" {
		// After a reload the old worker sends a GOAWAY on each HTTP/2
		// connection from a calling sidecar, which then opens no new
		// stream on it but keeps it open while idle. HAProxy closes an
		// idle connection after its GOAWAY at "timeout client-fin", else
		// at "timeout client" (1 h): the old worker would stay until
		// hard-stop-after on every reload.
		w("    timeout client-fin %s", ms(GoawayIdleTimeout))
	}
	alpn := ""
	if mode == "http" {
		alpn = " alpn h2,http/1.1"
	}
	// crt-list, not crt: see RenderCrtList. ca-file and verify stay on the
	// bind too, for the handshake's initial context.
	w("    bind %s ssl crt-list %s ca-file %s verify required%s", addr(p.BindAddr, p.BindPort), s.CrtList, s.RootsFile, alpn)
	w("    filter spoe engine %s config %s", SPOEEngine, s.SPOEFile)
	noVerdict := fmt.Sprintf("!{ var(%s) -m found }", authzgen.SessVar(authzgen.VarAllowed))
	// cert is the client certificate's SHA-256 (authzgen.VarCert).
	cert := authzgen.TxnVar(authzgen.VarCert)
	if mode == "http" {
		// A connection is authorized on its first request, and again on
		// the first request after the intentions changed: the verdict
		// carries the generation it was made under, and the controller
		// publishes the current one in the authz map. So a deny reaches
		// kept-alive connections (as Envoy's HTTP RBAC filter does) at the
		// cost of a map lookup per request, not an agent call. An unset
		// verdict means the agent could not decide: in a worker stopping
		// after a reload (its SPOE applets are gone) the connection is
		// closed without a response, which the calling sidecar retries on a
		// new connection, so on the new worker; otherwise 503. A deny is
		// 403. Nothing reaches the application without an allow. On
		// HTTP/2 the close takes every stream of the connection with it
		// (2.6 has no rule that refuses one stream), and the calling
		// sidecar retries those too, one the application was already
		// serving included: it happens only to a connection whose verdict
		// is missing or stale while its worker stops.
		//
		// With a sources map (Spec.SourcesMap), an allow is remembered per
		// worker, as the tcp listener does (below): by the SHA-256 of the
		// client certificate, with the generation it was made under plus
		// one, in the listener's stick table (the one the L7 shapes use);
		// and the certificate's SPIFFE ID is kept in the sources map
		// under the same key, for the access log. A connection with no
		// verdict whose certificate was allowed under the current
		// generation and is named there takes that allow, its generation
		// and its source without an agent round trip. The map holds only
		// what the agent read from a certificate it allowed, which no
		// later decision changes; the controller clears it periodically,
		// which bounds it, and a certificate missing from it is asked
		// about again. Only an allow of a source under no L7 intention is
		// remembered: an L7 verdict carries the intention's entries
		// (sess.hc.l7rules), which a stick table cannot hold, so such a
		// source asks the agent on each new connection. A deny is never
		// remembered, and a new generation makes every remembered allow
		// stale.
		w("    acl authz_stale str(%s),map_str_int(%s,0),sub(%s) -m int gt 0", AuthzGenKey, s.AuthzMap, authzgen.SessVar(authzgen.VarGen))
		w("    http-request unset-var(%s) if authz_stale", authzgen.SessVar(authzgen.VarAllowed))
		w("    http-request unset-var(%s) if authz_stale", authzgen.SessVar(authzgen.VarL7))
		w("    http-request unset-var(%s) if authz_stale", authzgen.SessVar(authzgen.VarL7Rules))
		w("    stick-table type binary len 32 size %d expire %dm store gpt0", AuthzCacheSize, AuthzCacheExpire/time.Minute)
		named := fmt.Sprintf("{ var(txn.%s.name) -m found }", VarPrefix)
		if s.SourcesMap != "" {
			w("    http-request set-var(%s) ssl_c_der,sha2(256) if %s", cert, noVerdict)
			w("    http-request track-sc0 var(%s) if %s", cert, noVerdict)
			w("    http-request set-var(txn.%s.cached) sc0_get_gpt0 if %s", VarPrefix, noVerdict)
			w("    acl authz_cached str(%s),map_str_int(%s,0),add(1),sub(txn.%s.cached) -m int eq 0", AuthzGenKey, s.AuthzMap, VarPrefix)
			w("    http-request set-var(txn.%s.name) var(%s),hex,map(%s) if authz_cached", VarPrefix, cert, s.SourcesMap)
			w("    http-request set-var(%s) var(txn.%s.cached),sub(1) if %s", authzgen.SessVar(authzgen.VarGen), VarPrefix, named)
			w("    http-request set-var(%s) var(txn.%s.name) if %s", authzgen.SessVar(authzgen.VarSource), VarPrefix, named)
			w("    http-request set-var(%s) bool(1) if %s", authzgen.SessVar(authzgen.VarAllowed), named)
		}
		w("    http-request send-spoe-group %s %s if %s", SPOEEngine, SPOEGroup, noVerdict)
		if s.SourcesMap != "" {
			record := fmt.Sprintf("{ var(%s) -m found } !%s { var(%s) -m bool } !{ var(%s) -m bool } { var(%s) -m beg spiffe:// }",
				cert, named, authzgen.SessVar(authzgen.VarAllowed), authzgen.SessVar(authzgen.VarL7), authzgen.SessVar(authzgen.VarSource))
			w("    http-request sc-set-gpt0(0) var(%s),add(1) if %s", authzgen.SessVar(authzgen.VarGen), record)
			w("    http-request set-map(%s) %%[var(%s),hex] %%[var(%s)] if %s", s.SourcesMap, cert, authzgen.SessVar(authzgen.VarSource), record)
		}
		w("    http-request reject if !{ var(%s) -m found } { stopping }", authzgen.SessVar(authzgen.VarAllowed))
		w("    http-request deny deny_status 503 unless { var(%s) -m found }", authzgen.SessVar(authzgen.VarAllowed))
		w("    http-request deny deny_status 403 unless { var(%s) -m bool }", authzgen.SessVar(authzgen.VarAllowed))
		// A source under an L7 intention (the agent set sess.hc.l7 with
		// its allow) has each request decided by the intention's
		// permissions. Other sources skip these lines at the cost of one
		// variable lookup.
		//
		// First HAProxy itself, from the L7 map (when the spec names
		// one): the connection's verdict names its intention's entries
		// (sess.hc.l7rules), and the first entry matching
		// "<l7rules>:<method>:/<header names>/:<path>" (l7.Subject) gives
		// the action, the intention and the permission (package l7,
		// Compile). Allow (A) and deny (D)
		// decide the request there, with no agent round trip; an entry
		// for a permission the map cannot decide (S), or no entry, sends
		// it to the agent.
		//
		// The agent gets the source, method, path and headers, and
		// answers txn.hc.l7allowed with the intention and permission that
		// decided, for the access log. No answer: as above, closed in a
		// stopping worker, else 503.
		//
		// An agent's allow is remembered per worker in the same table, as
		// a connection's is (above): keyed by the SHA-256 of everything the
		// decision depends on (the source, the method, the path and
		// every request header with its value; the rules are the
		// generation's), with the generation plus one. The same request
		// shape again under the same generation is allowed without an
		// agent round trip (access log perm=cached). A deny is never
		// remembered, so every 403 is the agent's or the map's, with its
		// intention and permission in the log; a new generation (any
		// intentions or permissions change) makes every remembered allow
		// stale.
		l7 := fmt.Sprintf("{ var(%s) -m bool }", authzgen.SessVar(authzgen.VarL7))
		ask := l7
		w("    http-request set-var(txn.%s.method) method if %s", VarPrefix, l7)
		w("    http-request set-var(txn.%s.path) path if %s", VarPrefix, l7)
		if s.L7Map != "" {
			w("    http-request set-var(txn.%s.names) req.hdr_names(/) if %s", VarPrefix, l7)
			w("    http-request set-var(txn.%[1]s.l7rule) var(%[2]s),concat(:,txn.%[1]s.method,:/),concat(,txn.%[1]s.names,/:),concat(,txn.%[1]s.path,),map_reg(%[3]s) if %[4]s",
				VarPrefix, authzgen.SessVar(authzgen.VarL7Rules), s.L7Map, l7)
			decided := fmt.Sprintf("{ var(%s) -m found }", authzgen.TxnVar(authzgen.VarL7Allowed))
			w("    http-request set-var(%s) bool(1) if %s { var(txn.%s.l7rule) -m beg A/ }", authzgen.TxnVar(authzgen.VarL7Allowed), l7, VarPrefix)
			w("    http-request set-var(%s) bool(0) if %s { var(txn.%s.l7rule) -m beg D/ }", authzgen.TxnVar(authzgen.VarL7Allowed), l7, VarPrefix)
			w("    http-request set-var(%s) var(txn.%s.l7rule),field(2,/) if %s %s", authzgen.TxnVar(authzgen.VarIntention), VarPrefix, l7, decided)
			w("    http-request set-var(%s) var(txn.%s.l7rule),field(3,/) if %s %s", authzgen.TxnVar(authzgen.VarPerm), VarPrefix, l7, decided)
			// Not "!decided": the agent's answer and a remembered allow
			// set txn.hc.l7allowed too, and the lines after them read
			// this condition.
			ask = fmt.Sprintf("%s !{ var(txn.%s.l7rule) -m beg A/ D/ }", l7, VarPrefix)
		}
		w("    http-request set-var(txn.%s.hdrs) req.hdrs if %s", VarPrefix, ask)
		w("    http-request set-var(txn.%[1]s.l7key) var(%[2]s),concat(|,txn.%[1]s.method,|),concat(,txn.%[1]s.path,|),concat(,txn.%[1]s.hdrs,),sha2(256) if %[3]s",
			VarPrefix, authzgen.SessVar(authzgen.VarSource), ask)
		w("    http-request track-sc1 var(txn.%s.l7key) if %s", VarPrefix, ask)
		w("    http-request set-var(txn.%s.l7cached) sc1_get_gpt0 if %s", VarPrefix, ask)
		w("    acl l7_cached str(%s),map_str_int(%s,0),add(1),sub(txn.%s.l7cached) -m int eq 0", AuthzGenKey, s.AuthzMap, VarPrefix)
		w("    http-request set-var(%s) bool(1) if %s l7_cached", authzgen.TxnVar(authzgen.VarL7Allowed), ask)
		w("    http-request set-var(%s) str(cached) if %s l7_cached", authzgen.TxnVar(authzgen.VarPerm), ask)
		w("    http-request send-spoe-group %s %s if %s !l7_cached", SPOEEngine, authzgen.GroupL7, ask)
		w("    http-request sc-set-gpt0(1) var(%s),add(1) if %s !l7_cached { var(%s) -m bool }", authzgen.SessVar(authzgen.VarGen), ask, authzgen.TxnVar(authzgen.VarL7Allowed))
		w("    http-request reject if %s !{ var(%s) -m found } { stopping }", l7, authzgen.TxnVar(authzgen.VarL7Allowed))
		w("    http-request deny deny_status 503 if %s !{ var(%s) -m found }", l7, authzgen.TxnVar(authzgen.VarL7Allowed))
		w("    http-request deny deny_status 403 if %s !{ var(%s) -m bool }", l7, authzgen.TxnVar(authzgen.VarL7Allowed))
	} else {
		// A connection is authorized once, before its first byte reaches
		// the application. An allow is remembered per worker, by the
		// client certificate's SHA-256, with the generation it was made
		// under plus one (0 is "never allowed"): the next connection with
		// that certificate under the same intentions generation is
		// allowed without asking the agent. Besides the round trip it
		// saves, this is what lets a worker stopping after a reload
		// accept the connections it took just before: HAProxy 2.6's SPOE
		// lets go of a stopping worker's idle agent connections and fails
		// what was queued on them (spoe_err=256 in the access log), and a
		// calling sidecar cannot retry a tcp connection after its
		// handshake. A deny is never remembered, and a new generation
		// (any intentions change) makes every remembered allow stale.
		//
		// With a sources map (Spec.SourcesMap), a remembered allow also
		// takes the caller's SPIFFE ID from it, for the access log, as on
		// an HTTP listener; 2.6's tcp-request rules cannot write a map,
		// so the controller adds each name the agent allows that the map
		// lacks (spoa WithSourceHook). A remembered certificate the map
		// does not name yet asks the agent, which names it; if it gives no
		// verdict (unreachable, or the SPOE of a stopping worker), the
		// remembered allow stands, logged src=cached as without a map.
		w("    stick-table type binary len 32 size %d expire %dm store gpt0", AuthzCacheSize, AuthzCacheExpire/time.Minute)
		w("    tcp-request inspect-delay 5s")
		// The certificate's digest, once: the connections table's key,
		// the remembered allow's and the sources map's.
		w("    tcp-request content set-var(%s) ssl_c_der,sha2(256)", cert)
		// Every connection is recorded, before it is authorized, in the
		// connections table (authzgen.ConnTable): so a deny reaches the
		// ones already established (see package authzgen).
		w("    tcp-request content set-var-fmt(txn.%s.conn) \"%s\"", VarPrefix, authzgen.ConnKeyFormat)
		w("    tcp-request content track-sc1 var(txn.%s.conn) table %s", VarPrefix, authzgen.ConnTable)
		w("    tcp-request content track-sc0 var(%s)", cert)
		w("    tcp-request content set-var(txn.%s.cached) sc0_get_gpt0", VarPrefix)
		w("    acl authz_cached str(%s),map_str_int(%s,0),add(1),sub(txn.%s.cached) -m int eq 0", AuthzGenKey, s.AuthzMap, VarPrefix)
		if s.SourcesMap != "" {
			// The name is looked up for every connection, remembered or
			// not: the agent is told whether the map has it (ArgNamed),
			// and hands the controller only the names it lacks.
			named := fmt.Sprintf("authz_cached { var(txn.%s.name) -m found }", VarPrefix)
			w("    tcp-request content set-var(txn.%s.name) var(%s),hex,map(%s)", VarPrefix, cert, s.SourcesMap)
			w("    tcp-request content set-var(%s) bool(1) if %s", authzgen.SessVar(authzgen.VarAllowed), named)
			w("    tcp-request content set-var(%s) var(txn.%s.name) if %s", authzgen.SessVar(authzgen.VarSource), VarPrefix, named)
			w("    tcp-request content send-spoe-group %s %s if %s", SPOEEngine, SPOEGroup, noVerdict)
			w("    tcp-request content set-var(%s) str(cached) if authz_cached %s !{ var(%s) -m found }", authzgen.SessVar(authzgen.VarSource), noVerdict, authzgen.SessVar(authzgen.VarSource))
			w("    tcp-request content set-var(%s) bool(1) if authz_cached %s", authzgen.SessVar(authzgen.VarAllowed), noVerdict)
		} else {
			w("    tcp-request content set-var(%s) bool(1) if authz_cached", authzgen.SessVar(authzgen.VarAllowed))
			w("    tcp-request content set-var(%s) str(cached) if authz_cached", authzgen.SessVar(authzgen.VarSource))
			w("    tcp-request content send-spoe-group %s %s if %s", SPOEEngine, SPOEGroup, noVerdict)
		}
		w("    tcp-request content sc-set-gpt0(0) var(%s),add(1) if { var(%s) -m bool } !authz_cached", authzgen.SessVar(authzgen.VarGen), authzgen.SessVar(authzgen.VarAllowed))
		w("    tcp-request content reject unless { var(%s) -m bool }", authzgen.SessVar(authzgen.VarAllowed))
	}
	if n := p.Limits.MaxPendingRequests; n > 0 {
		// max_pending_requests: a request (tcp: a connection) that finds
		// n already waiting for a free connection to the application
		// (see the local app's maxconn) is refused at once, as Envoy's
		// circuit breaker does, instead of joining the queue. Evaluated
		// after authorization, so a denied caller learns nothing of the
		// application's load.
		if mode == "http" {
			w("    http-request deny deny_status 503 if { queue(%s) ge %d }", LocalBackend, n)
		} else {
			w("    tcp-request content reject if { queue(%s) ge %d }", LocalBackend, n)
		}
	}
	if s.AccessLog {
		w("    log global")
		if mode == "http" {
			// A line per request and per failed handshake, none for a
			// connection that carries no request: each calling sidecar's
			// identity proof (a handshake, then close), and each
			// connect-and-close probe such as Consul's TCP check, would
			// otherwise write one ("<fe>/1: Success", "Connection closed
			// during SSL handshake"). 2.6 still logs every other
			// connection error with dontlognull, handshake failures
			// (no or untrusted client certificate) included. tcp mode
			// keeps logging empty connections: there one may be a
			// refused caller of a protocol in which the server speaks
			// first.
			w("    option dontlognull")
			// intention= and perm= name what decided a request under
			// an L7 intention ("-" for other sources).
			w(`    log-format "%%ci:%%cp src=%%[var(sess.%s.source)] crt=%%[ssl_c_serial,hex] spoe_err=%%[var(txn.%s.error)] %%HM %%HU %%ST %%B %%Tt %%b/%%s intention=%%[var(%s)] perm=%%[var(%s)]"`,
				VarPrefix, VarPrefix, authzgen.TxnVar(authzgen.VarIntention), authzgen.TxnVar(authzgen.VarPerm))
		} else {
			w(`    log-format "%%ci:%%cp src=%%[var(sess.%s.source)] crt=%%[ssl_c_serial,hex] spoe_err=%%[var(txn.%s.error)] %%B %%Tt %%b/%%s %%ts"`, VarPrefix, VarPrefix)
		}
	} else {
		w("    no log")
	}
	w("    default_backend %s", LocalBackend)
	w("")
	w("backend %s", LocalBackend)
	w("    mode %s", mode)
	if p.ConnectTimeout > 0 {
		w("    timeout connect %s", ms(p.ConnectTimeout))
	}
	if t := localServerTimeout(p); t > 0 {
		w("    timeout server %s", ms(t))
	}
	w("    server app %s%s%s", localTarget(p), maxconn(localMaxConn(p)), localProto(p.Protocol))
	w("")
	if mode == "tcp" {
		w("backend %s", authzgen.ConnTable)
		w("    stick-table type string len %d size %d expire %s", authzgen.ConnKeyLen, authzgen.ConnTableSize, authzgen.ConnTableExpire)
		w("")
	}
	w("backend %s", SPOEBackend)
	w("    mode tcp")
	w("    timeout connect 1s")
	w("    timeout server 3m")
	w("    server agent unix@%s", s.SPOASocket)
	if s.ExporterSocket != "" {
		// HAProxy's own traffic series (per frontend and backend: requests,
		// responses by class, errors, time averages), which the sidecar's
		// /metrics serves beside its own: one scrape target. A unix socket
		// in the private state directory, so nothing else reaches it and
		// it takes no port; never logged, whatever AccessLog says (one
		// line per scrape would be noise). Served by the current worker:
		// a stopping one unbinds it.
		w("")
		w("frontend %s", ExporterFrontend)
		w("    mode http")
		w("    bind unix@%s mode 600", s.ExporterSocket)
		w("    no log")
		w("    http-request use-service prometheus-exporter")
	}

	ups := slices.Clone(s.Upstreams)
	slices.SortFunc(ups, func(a, b Upstream) int { return strings.Compare(a.Name, b.Name) })
	for _, u := range ups {
		mode := Mode(u.Protocol)
		w("")
		if u.Target != nil {
			// A chain target has no frontend: only its backend. (A
			// jump rather than the frontend in a block, to keep this
			// long loop's lines where they are.)
			goto backend
		}
		w("frontend %s", u.Name)
		w("    mode %s", mode)
		// In mode http a clear bind takes HTTP/1.1 and HTTP/2 with prior
		// knowledge (h2c, what gRPC clients speak without TLS) on the same
		// port: HAProxy 2.6 picks the h2 multiplexer when a connection
		// opens with the h2 preface. Checked on 2.6.12 with curl --http1.1
		// and --http2-prior-knowledge against one such bind; trailers pass
		// to h2 clients, and to HTTP/1.1 clients when the response is
		// chunked. So the local client of an http, http2 or grpc upstream
		// may speak either (a gRPC client speaks h2c); in mode tcp the
		// bytes pass as they are.
		if u.SocketPath != "" {
			// local_bind_socket_path: HAProxy creates the socket (after
			// removing a stale one) with local_bind_socket_mode.
			w("    bind unix@%s mode %s", u.SocketPath, orDefault(u.SocketMode, "0600"))
		} else {
			w("    bind %s", addr(u.BindAddr, u.BindPort))
		}
		if s.AccessLog {
			w("    log global")
		}
		if s.AccessLog && s.InstanceMap != "" {
			// HAProxy's httplog and tcplog formats (2.6, doc
			// configuration.txt 8.2.3 and 8.2.2), then the instance that
			// served: the serving slot looked up in the instance map.
			// srv_name is evaluated when the line is logged, so it is the
			// slot that served, after any redispatch; the backend is this
			// frontend's own, written in by regsub (2.6 can concatenate
			// a sample only with a variable). No slot: "-".
			inst := fmt.Sprintf("inst=%%[srv_name,regsub(^,%s/),map(%s,%s)]", u.Name, s.InstanceMap, FreeSlot)
			if mode == "http" {
				w(`    log-format "%s %s"`, httpLogFormat, inst)
			} else {
				w(`    log-format "%s %s"`, tcpLogFormat, inst)
			}
		} else if s.AccessLog {
			if mode == "http" {
				w("    option httplog")
			} else {
				w("    option tcplog")
			}
		} else {
			w("    no log")
		}
		if mode == "http" {
			// After a reload, the old worker answers the next request
			// of each kept-alive local connection with "Connection:
			// close" instead of closing the idle connection at once
			// (HAProxy 2.4-2.6's default, src/mux_h1.c h1_process): a
			// close at once races with a request the client is
			// sending, which then fails, and clients replay only
			// idempotent requests (Go's transport), so a POST was
			// lost. Idle connections that send nothing more end at
			// "timeout http-keep-alive" or hard-stop-after. HTTP/2
			// connections (h2c) get a GOAWAY either way, and are
			// closed once idle as on the public listener.
			w("    option idle-close-on-response")
			w("    timeout client-fin %s", ms(GoawayIdleTimeout))
		}
		if n := upstreamMaxActive(u.Limits, mode); n > 0 {
			// An upstream's limits (Consul's upstream "limits"): a request
			// (tcp: a connection) that finds n already in progress to the
			// upstream is refused at once, as Envoy's circuit breakers
			// refuse past their limit. be_conn counts the backend's
			// streams, each request in HTTP and each connection in tcp,
			// whatever connections carry them. Nothing waits in a queue
			// here (no server has a maxconn), so max_pending_requests has
			// nothing to bound. A routed upstream counts every backend
			// its frontend can pick (renderRoutedLimit).
			if u.Routing != nil {
				renderRoutedLimit(w, u, n)
			} else if mode == "http" {
				w("    http-request deny deny_status 503 if { be_conn(%s) ge %d }", u.Name, n)
			} else {
				w("    tcp-request content reject if { be_conn(%s) ge %d }", u.Name, n)
			}
		}
		if u.Routing != nil {
			renderRouting(w, u)
		}
		w("    default_backend %s", u.Name)
		w("")
	backend:
		w("backend %s", u.Name)
		w("    mode %s", mode)
		if u.Target != nil {
			for _, l := range balanceLines(u.Target.Balance) {
				w("    %s", l)
			}
			if u.Target.Retries > 0 {
				w("    retries %d", u.Target.Retries)
			}
			// The request timeout of the route that took the request
			// (2.6 allows set-timeout in a backend only).
			w("    http-request set-timeout server var(%s),map(%s,%s)", routeVar, u.Target.Map, noTimeout)
		} else {
			w("    balance roundrobin")
		}
		// A connection refused by an endpoint that is going away (before
		// Consul says so) is retried on another; in HTTP mode so is a
		// request the other sidecar closed without answering (a reused
		// connection it was closing, or its worker stopping after a
		// reload: nothing was forwarded to the application then; or its
		// application resetting or closing the connection on the
		// request, which it then gets again on another instance).
		w("    option redispatch")
		if mode == "http" && u.Target != nil {
			w("    retry-on %s", retryOn(u.Target))
		} else if mode == "http" {
			w("    retry-on conn-failure empty-response")
		}
		if mode == "http" {
			// Every connection to another sidecar carries this sidecar's
			// identity, whichever local client opened it, so any request
			// may take any idle one: a local client that opens a
			// connection per request then costs no mTLS handshake per
			// request (meshbench datapath, new conn). The other sidecar
			// keeps idle connections 1 min, longer than the 5 s pool
			// purge here; a race with its close is retried (empty-response,
			// above). HAProxy drops a server's idle connections when its
			// address changes or it enters maintenance, so a reused slot
			// never sends to the endpoint it held before.
			w("    http-reuse always")
		}
		if u.ConnectTimeout > 0 {
			w("    timeout connect %s", ms(u.ConnectTimeout))
		}
		// HTTP/1.1 upstreams also offer h2 to the other sidecar (whose
		// http listener accepts both; a peer without it answers
		// http/1.1): multiplexed streams on few pooled connections cost
		// fewer wakeups and syscalls per request than one connection per
		// request in flight. meshbench datapath, keep-alive at 128
		// clients: p99 157 ms with HTTP/1.1 between sidecars, 18 ms with
		// h2.
		alpn := ""
		if a := UpstreamALPN(u.Protocol); a != "" {
			alpn = " alpn " + a
		}
		if p := UpstreamProto(u.Protocol); p != "" {
			alpn += " proto " + p
		}
		if u.ServerID != "" {
			// The second line of upstream identity (the first: the
			// controller places only endpoints whose own handshake showed
			// ServerID). 2.6 cannot match a URI SAN at the handshake and
			// has no SAN fetch (ssl_s_san is 3.1+), but the server's
			// certificate is in ssl_s_der, and its URI SAN is there as
			// bytes. So a server that holds another identity, one whose
			// address changed hands since it was verified, gets the
			// request but cannot answer: HTTP 502, or the TCP connection
			// closed. Checked on each response (HTTP) or connection
			// (TCP), with no agent round trip.
			if mode == "http" {
				w("    http-response deny deny_status 502 unless { ssl_s_der,hex -m sub %s }", sanPattern(u.ServerID))
			} else {
				w("    tcp-response content reject unless { ssl_s_der,hex -m sub %s }", sanPattern(u.ServerID))
			}
		}
		// no-ssl-reuse: a connection to another sidecar never resumes a
		// TLS session, so it presents the leaf HAProxy holds now. On
		// 2.6.12, "commit ssl cert" empties each server's session cache,
		// but a handshake in flight at that moment stores its session,
		// made with the old leaf, after the flush; each resumption of it
		// stores a fresh ticket (OpenSSL 3.0 restarts a TLS 1.3 session's
		// lifetime on resumption), so under steady new connections the
		// old leaf is presented indefinitely, past its expiry. The other
		// sidecar's agent then refuses it as expired whenever it decides
		// again (an intentions change): new connections denied on a
		// healthy mesh. HTTP modes pool their server connections, so the
		// full handshakes are rare there; tcp mode makes one per
		// connection.
		w("    default-server ssl crt %s ca-file %s verify required%s no-ssl-reuse%s", s.LeafFile, s.RootsFile, alpn, passive(u.Passive, mode))
		renderSlots(w, u.Slots)
	}
	for _, e := range s.Expose {
		// An expose path: a plain HTTP listener that serves one path of
		// the application and answers 404 to any other, as Envoy's
		// exposed-path listeners do (an exact match on the path, the
		// query string aside). No mTLS and no intentions: this is what
		// the Consul agent's HTTP and gRPC checks reach when the
		// registration says Expose.Checks.
		name := fmt.Sprintf("expose_%d", e.ListenerPort)
		w("")
		w("frontend %s", name)
		w("    mode http")
		w("    bind %s", addr(p.BindAddr, e.ListenerPort))
		if s.AccessLog {
			w("    log global")
			w("    option httplog")
		} else {
			w("    no log")
		}
		w("    http-request deny deny_status 404 unless { path %s }", e.Path)
		w("    default_backend %s", name)
		w("")
		w("backend %s", name)
		w("    mode http")
		w("    server app %s%s", addr(p.LocalAddr, e.LocalPort), localProto(e.Protocol))
	}
	return b.String(), nil
}

// localServerTimeout is the local app's "timeout server" (0: the
// defaults'), for an HTTP listener: local_request_timeout_ms, or
// local_idle_timeout_ms when it is shorter. HAProxy 2.6 has no timer on a
// whole response: "timeout server" bounds the wait for the response
// headers (a 504 when it fires first) and then each silence of the
// application, so a request timeout is enforced on an application that
// does not answer, not on one that streams slowly. The idle timeout
// (Envoy's stream idle timeout on requests to the application) is such a
// silence. It is not applied to the calling side: there "timeout client"
// would also close the idle pooled HTTP/2 connections of calling sidecars,
// which Envoy's per-stream timer does not.
func localServerTimeout(p Public) time.Duration {
	if Mode(p.Protocol) != "http" {
		return 0
	}
	t := p.RequestTimeout
	if p.IdleTimeout > 0 && (t == 0 || p.IdleTimeout < t) {
		t = p.IdleTimeout
	}
	return t
}

// localMaxConn is the local app server's maxconn (0: none): max_connections,
// and for HTTP max_concurrent_requests, whichever is lower. HAProxy 2.6
// sends one request at a time on a connection to an HTTP/1.1 server, so
// concurrent connections and concurrent requests are the same count; past
// it, requests (tcp: connections) wait in the backend's queue for at most
// "timeout queue" (by default "timeout connect"), then get a 503.
func localMaxConn(p Public) int {
	n := p.Limits.MaxConnections
	if c := p.Limits.MaxConcurrentRequests; Mode(p.Protocol) == "http" && c > 0 && (n == 0 || c < n) {
		n = c
	}
	return n
}

func maxconn(n int) string {
	if n == 0 {
		return ""
	}
	return " maxconn " + strconv.Itoa(n)
}

// upstreamMaxActive is the most requests (tcp: connections) an upstream
// has in progress, 0 for no limit: max_connections, and for HTTP
// max_concurrent_requests, whichever is lower. HTTP requests to another
// sidecar share pooled and multiplexed connections, so a request is what
// can be counted; the two keys then bound the same thing.
func upstreamMaxActive(l Limits, mode string) int {
	n := l.MaxConnections
	if c := l.MaxConcurrentRequests; mode == "http" && c > 0 && (n == 0 || c < n) {
		n = c
	}
	return n
}

// localTarget is where the local app server connects.
func localTarget(p Public) string {
	if p.LocalSocket != "" {
		return "unix@" + p.LocalSocket
	}
	return addr(p.LocalAddr, p.LocalPort)
}

// passive is the default-server options of passive_health_check: HAProxy
// watches the traffic to each server ("observe layer7": a 5xx answer other
// than 501 and 505 or a failed connection is an error; layer4 for tcp:
// failed connections) and marks it down after max_failures errors in a row
// (Envoy's consecutive_5xx ejection), then checks it every interval with a
// TLS handshake and puts it back after two good ones (HAProxy's "rise").
// Observing requires health checks, hence "check".
func passive(p PassiveCheck, mode string) string {
	if p.MaxFailures == 0 {
		return ""
	}
	layer := "layer4"
	if mode == "http" {
		layer = "layer7"
	}
	return fmt.Sprintf(" check inter %s observe %s error-limit %d on-error mark-down", ms(p.Interval), layer, p.MaxFailures)
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// httpLogFormat and tcpLogFormat are "option httplog" and "option tcplog"
// of HAProxy 2.6 as log-format strings.
const (
	httpLogFormat = `%ci:%cp [%tr] %ft %b/%s %TR/%Tw/%Tc/%Tr/%Ta %ST %B %CC %CS %tsc %ac/%fc/%bc/%sc/%rc %sq/%bq %hr %hs %{+Q}r`
	tcpLogFormat  = `%ci:%cp [%t] %ft %b/%s %Tw/%Tc/%Tt %B %ts %ac/%fc/%bc/%sc/%rc %sq/%bq`
)

// renderSlots writes used slots as servers at their endpoints and runs of
// free slots as server-template ranges parked in maintenance.
func renderSlots(w func(string, ...any), t slots.Table) {
	run := 0 // first slot number of the current free run, 0 for none
	flush := func(end int) {
		if run > 0 {
			w("    server-template %s %d-%d %s:%d disabled", t.Prefix, run, end, slots.ParkAddr, slots.ParkPort)
			run = 0
		}
	}
	for i, sl := range t.Slots {
		n := i + 1
		if !sl.Used {
			if run == 0 {
				run = n
			}
			continue
		}
		flush(n - 1)
		w("    server %s %s weight %d", sl.Name, addr(sl.Addr, sl.Port), sl.Weight)
	}
	flush(len(t.Slots))
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// FallbackSNI is a crt-list filter for a service whose Consul SNI name is
// not a plain DNS name.
const FallbackSNI = "public-listener.haproxy-connect.invalid"

// ValidSNI reports whether name can be the public listener's crt-list
// filter: a DNS name of lower-case labels, nothing HAProxy would read as an
// option, a negation or a wildcard.
func ValidSNI(name string) bool {
	_, err := input.DNSName("SNI name", name)
	return err == nil
}

// RenderCrtList returns the public listener's certificate list: one line,
// the leaf with its verification settings and an SNI filter.
//
// The filter is what keeps mutual TLS across "commit ssl cert" on HAProxy
// 2.6. A commit rebuilds each instance of the certificate
// (ckch_inst_rebuild, src/ssl_ckch.c) and prepares the SSL_CTX of the new
// instance (verify mode, CA list, ALPN, protocol versions:
// ssl_sock_prep_ctx_and_inst) only through the instance's SNI entries.
// Those come from the crt-list filters, else from the certificate's DNS
// SANs and CN. A Consul leaf has neither (an empty subject and a SPIFFE URI
// SAN only), so with a plain "crt" the new instance has no SNI entry, its
// context is never prepared, and ssl_sock_load_cert_sni still installs it
// as the bind's default context: from the first swap on, the listener asks
// no client for a certificate, and the SPOE agent, which fails closed,
// refuses every new connection. With a filter the new instance has one
// SNI entry, its context is prepared with the line's (and the bind's)
// settings, and that same context becomes the default, so a client with
// that SNI, another or none gets the new leaf and is asked for its
// certificate. The name itself only needs to be valid; the service's
// Consul SNI is what Consul's own proxies send. (A filter of "*" does not
// help: verification is lost as with no filter.)
func RenderCrtList(s Spec) (string, error) {
	if err := s.Validate(); err != nil {
		return "", err
	}
	return fmt.Sprintf("%s [verify required ca-file %s] %s\n", s.LeafFile, s.RootsFile, s.SNI), nil
}

// RenderSPOE returns the SPOE configuration that sends the client
// certificate of an inbound connection to the agent (HAProxy 2.6 cannot
// read URI SANs, so the whole DER goes) and expects sess.<prefix>.allowed,
// .source and .gen back. The
// message fires only in the public listener, the one frontend with the
// filter. On agent errors or timeouts the variable stays unset and the
// listener rejects: fail closed.
func RenderSPOE(s Spec) (string, error) {
	if err := s.Validate(); err != nil {
		return "", err
	}
	// The listener sends the message through a group when the connection
	// has no current verdict (see Render); the verdict lives in the
	// session.
	var b strings.Builder
	fmt.Fprintf(&b, "[%s]\n", SPOEEngine)
	fmt.Fprintf(&b, "spoe-agent %s-agent\n", SPOEEngine)
	http := Mode(s.Public.Protocol) == "http"
	if http {
		fmt.Fprintf(&b, "    groups %s %s\n", SPOEGroup, authzgen.GroupL7)
	} else {
		fmt.Fprintf(&b, "    groups %s\n", SPOEGroup)
	}
	fmt.Fprintf(&b, "    option var-prefix %s\n", VarPrefix)
	b.WriteString("    option set-on-error error\n")
	b.WriteString("    timeout hello 2s\n")
	b.WriteString("    timeout idle 2m\n")
	b.WriteString("    timeout processing 1s\n")
	fmt.Fprintf(&b, "    use-backend %s\n", SPOEBackend)
	b.WriteString("\n")
	fmt.Fprintf(&b, "spoe-message %s\n", authzgen.Message)
	if http {
		// ArgL7 tells the agent this listener decides L7 permissions
		// per request; MessageL7 carries one request.
		fmt.Fprintf(&b, "    args %s=ssl_c_der %s=bool(1)\n", authzgen.ArgCert, authzgen.ArgL7)
		fmt.Fprintf(&b, "\nspoe-message %s\n", authzgen.MessageL7)
		fmt.Fprintf(&b, "    args %s=var(%s) %s=method %s=path %s=req.hdrs_bin\n", authzgen.ArgSource, authzgen.SessVar(authzgen.VarSource),
			authzgen.ArgMethod, authzgen.ArgPath, authzgen.ArgHeaders)
	} else if s.SourcesMap != "" {
		fmt.Fprintf(&b, "    args %s=ssl_c_der %s=var(txn.%s.name)\n", authzgen.ArgCert, authzgen.ArgNamed, VarPrefix)
	} else {
		fmt.Fprintf(&b, "    args %s=ssl_c_der\n", authzgen.ArgCert)
	}
	fmt.Fprintf(&b, "\nspoe-group %s\n", SPOEGroup)
	fmt.Fprintf(&b, "    messages %s\n", authzgen.Message)
	if http {
		fmt.Fprintf(&b, "\nspoe-group %s\n", authzgen.GroupL7)
		fmt.Fprintf(&b, "    messages %s\n", authzgen.MessageL7)
	}
	return b.String(), nil
}

// File is a file HAProxy reads: its path and its content.
type File struct{ Path, Content string }

// RenderFiles renders the configuration for s and the files it names that
// bootstrap owns: the SPOE file, the public listener's crt-list, the
// authz map at generation gen, and the instance and state maps when s
// names them. The certificates (LeafFile, RootsFile) are
// the caller's. Writing them all, before HAProxy starts or reloads, is the
// caller's too: this package does no I/O.
func RenderFiles(s Spec, gen uint64) (cfg string, files []File, err error) {
	if cfg, err = Render(s); err != nil {
		return "", nil, err
	}
	spoe, err := RenderSPOE(s)
	if err != nil {
		return "", nil, err
	}
	crtList, err := RenderCrtList(s)
	if err != nil {
		return "", nil, err
	}
	files = []File{{s.SPOEFile, spoe}, {s.CrtList, crtList}, {s.AuthzMap, RenderAuthzMap(gen)}}
	if s.InstanceMap != "" {
		files = append(files, File{s.InstanceMap, RenderInstanceMap(s)})
	}
	if s.StateMap != "" {
		files = append(files, File{s.StateMap, RenderStateMap(s)})
	}
	if s.SourcesMap != "" {
		// Empty: a new worker remembers no allow.
		files = append(files, File{s.SourcesMap, ""})
	}
	return cfg, files, nil
}

// RenderAuthzMap is the content of the authz map for generation gen.
func RenderAuthzMap(gen uint64) string { return authzgen.MapContent(gen) }
