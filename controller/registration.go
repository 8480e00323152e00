package controller

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap/zapcore"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/input"
	"github.com/haproxy-connect/haproxy-connect/slots"
)

// ErrNoSidecar and ErrManySidecars are the two ways -sidecar-for can fail.
var (
	ErrNoSidecar    = errors.New("no connect-proxy registration for that service")
	ErrManySidecars = errors.New("more than one connect-proxy registration for that service")
)

// FindSidecar returns the ID of the one connect-proxy registered on the
// local agent for serviceID, as "consul connect proxy -sidecar-for" does:
// Kind connect-proxy and Proxy.DestinationServiceID equal to serviceID,
// compared case-insensitively.
func FindSidecar(services map[string]*api.AgentService, serviceID string) (string, error) {
	var found []string
	for id, s := range services {
		if s.Kind == api.ServiceKindConnectProxy && s.Proxy != nil && strings.EqualFold(s.Proxy.DestinationServiceID, serviceID) {
			found = append(found, id)
		}
	}
	slices.Sort(found)
	switch len(found) {
	case 0:
		return "", fmt.Errorf("%w %q", ErrNoSidecar, serviceID)
	case 1:
		return found[0], nil
	}
	return "", fmt.Errorf("%w %q: %s", ErrManySidecars, serviceID, strings.Join(found, ", "))
}

// Sidecar is the shape of the proxy taken from its registration: what the
// rendered configuration depends on, apart from endpoints and certificates.
// Two equal Sidecars render the same frontends and backends; a change means
// a reload.
type Sidecar struct {
	ProxyID   string
	Service   string // destination service name
	Public    bootstrap.Public
	Upstreams []Upstream // sorted by Name
	// Expose are Proxy.Expose.Paths, those Consul adds for Expose.Checks
	// included, sorted by listener port.
	Expose []bootstrap.ExposePath
	// Notes name what the registration asks for and this sidecar does not
	// apply (a config key, a field), each with why. They are not part of
	// the shape (Equal, Diff): the controller logs each once, when it
	// first appears (publishRegistration).
	Notes []Note
}

// Note is one part of a registration that is not applied.
type Note struct {
	// Key is the config key or registration field, as Consul spells it.
	Key string
	// Reason says why: unsupported, no meaning for HAProxy, or a value
	// refused.
	Reason string
	// Level is what it is logged at: error for a value refused, warn
	// for what is not supported, info for a key that needs nothing here.
	Level zapcore.Level
}

// Upstream is one upstream of the registration.
type Upstream struct {
	Name           string // HAProxy frontend and backend name
	Type           string // service or prepared_query
	Destination    string
	Datacenter     string
	Namespace      string
	Partition      string
	BindAddr       string
	BindPort       int
	Protocol       string
	ConnectTimeout time.Duration
	// SocketPath and SocketMode: local_bind_socket_path and
	// local_bind_socket_mode (BindAddr and BindPort are then empty).
	SocketPath, SocketMode string
	Passive                bootstrap.PassiveCheck
	Limits                 bootstrap.Limits
	// Chain fingerprints the configuration part of a routed upstream's
	// discovery chain (chain.go); empty for a plain upstream.
	Chain string
	// Target, for a discovery chain target's backend (no listener), is
	// the chain target's Name; Parent the routed upstream, Filter and
	// OnlyPassing the resolver subset's instance filter.
	Target, Parent, Filter string
	OnlyPassing            bool
}

// Equal compares two shapes.
func (s Sidecar) Equal(o Sidecar) bool {
	return s.ProxyID == o.ProxyID && s.Service == o.Service && s.Public == o.Public && slices.Equal(s.Upstreams, o.Upstreams) &&
		slices.Equal(s.Expose, o.Expose)
}

// withoutChains is s without what discovery chains add to it (their
// targets' upstreams and the routed upstreams' chain fingerprints): two
// Sidecars equal this way differ in their chains only.
func (s Sidecar) withoutChains() Sidecar {
	out := s
	out.Upstreams = nil
	for _, u := range s.Upstreams {
		if u.Target != "" {
			continue
		}
		u.Chain = ""
		out.Upstreams = append(out.Upstreams, u)
	}
	return out
}

// Diff says in a few words what differs, for the reload reason.
func (s Sidecar) Diff(o Sidecar) string {
	var parts []string
	if s.Service != o.Service {
		parts = append(parts, fmt.Sprintf("service %s -> %s", s.Service, o.Service))
	}
	if s.Public != o.Public {
		parts = append(parts, "public listener changed"+fieldsChanged(publicFields(s.Public), publicFields(o.Public)))
	}
	if !slices.Equal(s.Expose, o.Expose) {
		parts = append(parts, "expose paths changed")
	}
	old := map[string]Upstream{}
	for _, u := range s.Upstreams {
		old[u.Name] = u
	}
	for _, u := range o.Upstreams {
		prev, ok := old[u.Name]
		switch {
		case !ok && u.Target != "":
			parts = append(parts, "discovery chain target "+u.Name+" added")
		case !ok:
			parts = append(parts, "upstream "+u.Name+" added")
		case prev != u && u.Target != "":
			parts = append(parts, "discovery chain target "+u.Name+" changed")
		case prev != u && prev.Chain != u.Chain && prev.Chain != "" && u.Chain != "":
			parts = append(parts, "discovery chain of "+u.Name+" changed (matches, header changes, rewrites or retries)")
		case prev != u:
			parts = append(parts, "upstream "+u.Name+" changed"+fieldsChanged(upstreamFields(prev), upstreamFields(u)))
		}
		delete(old, u.Name)
	}
	for name, u := range old {
		if u.Target != "" {
			parts = append(parts, "discovery chain target "+name+" removed")
			continue
		}
		parts = append(parts, "upstream "+name+" removed")
	}
	slices.Sort(parts)
	return strings.Join(parts, ", ")
}

// field is one named part of a shape, for Diff: the name is the key or
// field the registration sets it with.
type field struct {
	name  string
	value any
}

func publicFields(p bootstrap.Public) []field {
	return []field{
		{"address", p.BindAddr}, {"port", p.BindPort}, {"protocol", p.Protocol},
		{"local_service_address", p.LocalAddr}, {"local_service_port", p.LocalPort}, {"local_service_socket_path", p.LocalSocket},
		{"local_connect_timeout_ms", p.ConnectTimeout}, {"local_request_timeout_ms", p.RequestTimeout}, {"local_idle_timeout_ms", p.IdleTimeout},
		{"max_inbound_connections", p.MaxInbound}, {"max_connections", p.Limits.MaxConnections},
		{"max_pending_requests", p.Limits.MaxPendingRequests}, {"max_concurrent_requests", p.Limits.MaxConcurrentRequests},
	}
}

func upstreamFields(u Upstream) []field {
	return []field{
		{"type", u.Type}, {"destination", u.Destination}, {"local_bind_address", u.BindAddr}, {"local_bind_port", u.BindPort},
		{"local_bind_socket_path", u.SocketPath}, {"local_bind_socket_mode", u.SocketMode},
		{"protocol", u.Protocol}, {"connect_timeout_ms", u.ConnectTimeout}, {"passive_health_check", u.Passive}, {"limits", u.Limits},
	}
}

// fieldsChanged names the fields whose values differ, as " (a, b)".
func fieldsChanged(old, cur []field) string {
	var names []string
	for i := range old {
		if old[i].value != cur[i].value {
			names = append(names, old[i].name)
		}
	}
	if len(names) == 0 {
		return ""
	}
	return " (" + strings.Join(names, ", ") + ")"
}

// ParseRegistration reads a connect-proxy registration. Upstreams that are
// invalid are left out and reported in rejected, so one bad upstream does
// not take the others down; an invalid public listener is an error.
func ParseRegistration(svc *api.AgentService) (sc Sidecar, rejected []error, err error) {
	if svc == nil || svc.Kind != api.ServiceKindConnectProxy || svc.Proxy == nil {
		return Sidecar{}, nil, errors.New("registration is not a connect-proxy")
	}
	p := svc.Proxy
	sc.ProxyID, sc.Service = svc.ID, p.DestinationServiceName
	if _, err := bootstrap.UpstreamName(sc.Service, ""); err != nil {
		return Sidecar{}, nil, fmt.Errorf("destination service: %w", err)
	}
	pub := bootstrap.Public{BindAddr: svc.Address, BindPort: svc.Port, LocalAddr: p.LocalServiceAddress, LocalPort: p.LocalServicePort,
		LocalSocket: p.LocalServiceSocketPath}
	if pub.BindAddr == "" {
		pub.BindAddr = "0.0.0.0"
	}
	if pub.LocalAddr == "" {
		pub.LocalAddr = "127.0.0.1"
	}
	cfg := p.Config
	if v, ok, err := configString(cfg, "bind_address"); err != nil {
		return Sidecar{}, nil, err
	} else if ok {
		pub.BindAddr = v
	}
	if v, ok, err := configInt(cfg, "bind_port", 1, 65535); err != nil {
		return Sidecar{}, nil, err
	} else if ok {
		pub.BindPort = v
	}
	if pub.Protocol, _, err = configString(cfg, "protocol"); err != nil {
		return Sidecar{}, nil, err
	}
	pub.Protocol = strings.ToLower(pub.Protocol)
	if v, ok, err := configInt(cfg, "local_connect_timeout_ms", 1, 3_600_000); err != nil {
		return Sidecar{}, nil, err
	} else if ok {
		pub.ConnectTimeout = time.Duration(v) * time.Millisecond
	}
	if pub.LocalSocket != "" {
		// Checked here, where the field has its registration name; the
		// address and port are then unused (ValidatePublic skips them).
		if _, err := input.Path("local_service_socket_path", pub.LocalSocket); err != nil {
			return Sidecar{}, nil, err
		}
	}
	passive := parseInbound(cfg, &pub, &sc.Notes)
	// The same checks Render makes, so that a bad public listener keeps the
	// applied configuration with this reason instead of failing the render
	// of every later reload.
	if err := bootstrap.ValidatePublic(pub); err != nil {
		return Sidecar{}, nil, err
	}
	sc.Public = pub
	noteRegistration(p, &sc.Notes)

	seen := map[string]bool{}
	binds := map[string]string{bindKey(pub.BindAddr, pub.BindPort): "the public listener"}
	for i, u := range p.Upstreams {
		up, err := parseUpstream(u, passive, p.MeshGateway.Mode, &sc.Notes)
		if err != nil {
			rejected = append(rejected, fmt.Errorf("upstream %d (%s): %w", i, u.DestinationName, err))
			continue
		}
		if seen[up.Name] {
			rejected = append(rejected, fmt.Errorf("upstream %d (%s): another upstream already uses the name %s", i, u.DestinationName, up.Name))
			continue
		}
		bind := bindKey(up.BindAddr, up.BindPort)
		if up.SocketPath != "" {
			bind = "unix@" + up.SocketPath
		}
		if other, ok := binds[bind]; ok {
			rejected = append(rejected, fmt.Errorf("upstream %d (%s): %s is already bound by %s", i, u.DestinationName, bind, other))
			continue
		}
		seen[up.Name] = true
		binds[bind] = "upstream " + up.Name
		sc.Upstreams = append(sc.Upstreams, up)
	}
	slices.SortFunc(sc.Upstreams, func(a, b Upstream) int { return strings.Compare(a.Name, b.Name) })
	sc.Expose = parseExpose(p.Expose, pub, binds, &sc.Notes)
	return sc, rejected, nil
}

func parseUpstream(u api.Upstream, passive bootstrap.PassiveCheck, proxyGateway api.MeshGatewayMode, notes *[]Note) (Upstream, error) {
	up := Upstream{
		Type:        string(u.DestinationType),
		Destination: u.DestinationName,
		Datacenter:  u.Datacenter,
		Namespace:   u.DestinationNamespace,
		Partition:   u.DestinationPartition,
		BindAddr:    u.LocalBindAddress,
		BindPort:    u.LocalBindPort,
	}
	if up.Type == "" {
		up.Type = string(api.UpstreamDestTypeService)
	}
	if up.Type != string(api.UpstreamDestTypeService) && up.Type != string(api.UpstreamDestTypePreparedQuery) {
		return Upstream{}, fmt.Errorf("destination type %q is not service or prepared_query", up.Type)
	}
	if u.LocalBindSocketPath != "" {
		if up.BindAddr != "" || up.BindPort != 0 {
			return Upstream{}, fmt.Errorf("local_bind_socket_path %q and local_bind_address/port: set one or the other", u.LocalBindSocketPath)
		}
		if _, err := input.Path("local_bind_socket_path", u.LocalBindSocketPath); err != nil {
			return Upstream{}, err
		}
		up.SocketPath = u.LocalBindSocketPath
		if u.LocalBindSocketMode != "" {
			mode, err := input.SocketMode("local_bind_socket_mode", u.LocalBindSocketMode)
			if err != nil {
				return Upstream{}, err
			}
			up.SocketMode = mode
		}
	} else if up.BindAddr == "" {
		up.BindAddr = "127.0.0.1"
	}
	// Consul sends a cross-datacenter upstream through a mesh gateway when
	// the mode is local or remote: reaching its endpoints directly instead
	// would bypass what the operator asked for, so it is refused. An
	// upstream that names a Datacenter counts as one (the local one is not
	// known here). For an upstream in this datacenter the mode changes
	// nothing.
	gw := u.MeshGateway.Mode
	if gw == "" || gw == api.MeshGatewayModeDefault {
		gw = proxyGateway
	}
	if gw != "" && gw != api.MeshGatewayModeNone && gw != api.MeshGatewayModeDefault && (u.Datacenter != "" || u.DestinationPeer != "") {
		return Upstream{}, fmt.Errorf("mesh gateway mode %q: mesh gateways are not supported yet", gw)
	}
	if m := u.MeshGateway.Mode; m != "" && m != api.MeshGatewayModeNone && m != api.MeshGatewayModeDefault {
		*notes = append(*notes, Note{Key: "upstream " + u.DestinationName + " MeshGateway.Mode",
			Reason: fmt.Sprintf("%q is not supported; for an upstream in this datacenter it changes nothing, and it is reached directly", m), Level: zapcore.WarnLevel})
	}
	if u.DestinationPeer != "" {
		return Upstream{}, fmt.Errorf("destination peer %q: cluster peering is not supported", u.DestinationPeer)
	}
	var err error
	if up.Name, err = bootstrap.UpstreamName(u.DestinationName, u.Datacenter); err != nil {
		return Upstream{}, err
	}
	if up.Type == string(api.UpstreamDestTypePreparedQuery) {
		up.Name = "q" + up.Name // up_x for a service, qup_x for a query of the same name
	}
	if up.Protocol, _, err = configString(u.Config, "protocol"); err != nil {
		return Upstream{}, err
	}
	up.Protocol = strings.ToLower(up.Protocol)
	if v, ok, err := configInt(u.Config, "connect_timeout_ms", 1, 3_600_000); err != nil {
		return Upstream{}, err
	} else if ok {
		up.ConnectTimeout = time.Duration(v) * time.Millisecond
	}
	for _, ns := range []string{up.Namespace, up.Partition} {
		if ns != "" && ns != "default" {
			return Upstream{}, fmt.Errorf("namespace/partition %q: only the default namespace and partition are supported (Consul CE)", ns)
		}
	}
	up.Passive = passive
	if pc, ok, err := parsePassive(u.Config, "upstream "+up.Name+" config ", notes); err != nil {
		return Upstream{}, fmt.Errorf("config passive_health_check: %w", err)
	} else if ok {
		up.Passive = pc
	}
	if up.Limits, err = parseLimits(u.Config, "upstream "+up.Name+" config ", notes); err != nil {
		return Upstream{}, fmt.Errorf("config limits: %w", err)
	}
	noteUnknown(u.Config, "upstream "+up.Name+" config ", upstreamKeys, notes)
	// The same checks Render makes, so a bad upstream is dropped here with
	// its reason rather than failing the whole configuration later.
	probe := bootstrap.Upstream{Name: up.Name, Destination: up.Destination, BindAddr: up.BindAddr, BindPort: up.BindPort,
		Protocol: up.Protocol, ConnectTimeout: up.ConnectTimeout, SocketPath: up.SocketPath, SocketMode: up.SocketMode, Passive: up.Passive, Limits: up.Limits}
	probe.Slots.Backend, probe.Slots.Prefix = up.Name, bootstrap.SlotPrefix
	probe.Slots.Slots = make([]slots.Slot, 1)
	if err := bootstrap.ValidateUpstream(probe); err != nil {
		return Upstream{}, err
	}
	return up, nil
}

func configString(cfg map[string]any, key string) (string, bool, error) {
	v, ok := cfg[key]
	if !ok || v == nil {
		return "", false, nil
	}
	s, ok := v.(string)
	if !ok {
		return "", false, fmt.Errorf("config %s: want a string, got %T", key, v)
	}
	return s, true, nil
}

// configInt reads an integer from an opaque Config map, where JSON gives
// float64 and HCL or the CLI may give strings.
func configInt(cfg map[string]any, key string, lo, hi int) (int, bool, error) {
	v, ok := cfg[key]
	if !ok || v == nil {
		return 0, false, nil
	}
	var n float64
	switch x := v.(type) {
	case float64:
		n = x
	case int:
		n = float64(x)
	case json.Number:
		f, err := x.Float64()
		if err != nil {
			return 0, false, fmt.Errorf("config %s: %q is not a number", key, x)
		}
		n = f
	case string:
		f, err := strconv.ParseFloat(strings.TrimSpace(x), 64)
		if err != nil {
			return 0, false, fmt.Errorf("config %s: %q is not a number", key, x)
		}
		n = f
	default:
		return 0, false, fmt.Errorf("config %s: want a number, got %T", key, v)
	}
	if n != math.Trunc(n) || n < float64(lo) || n > float64(hi) {
		return 0, false, fmt.Errorf("config %s: %v is not an integer in %d-%d", key, v, lo, hi)
	}
	return int(n), true, nil
}

func bindKey(addr string, port int) string { return net.JoinHostPort(addr, strconv.Itoa(port)) }
