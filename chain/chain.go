// Package chain turns the discovery chain Consul compiles for an upstream
// (GET /v1/discovery-chain/<service>: its service-router, service-splitter
// and service-resolver entries) into typed, validated values: the targets
// (a service, a subset, a datacenter) with how to reach them, and the
// routes, each with the weighted targets it splits among. Every string in
// a Chain has passed package input. It does no I/O and knows nothing of
// HAProxy's syntax; the renderer and the controller decide how a Chain
// runs.
package chain

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/input"
)

// Chain is one upstream's compiled discovery chain.
type Chain struct {
	Service  string
	Protocol string // tcp, http, http2 or grpc
	// Default: Consul compiled it from no router, splitter or resolver
	// entry. Such a chain is the plain upstream the sidecar always had.
	Default bool
	// Routes in Consul's order: the first whose Match matches a request
	// takes it. The last one matches everything (Consul appends a
	// catch-all to every router; a chain that starts at a splitter or a
	// resolver is one catch-all route).
	Routes []Route
	// Targets by Name, sorted.
	Targets []Target
	// Unsupported lists, one line each, what the entries ask that the
	// sidecar does not do (see README), for a log line.
	Unsupported []string
}

// Route is one route of a service-router (or the whole chain).
type Route struct {
	Match Match
	// Splits are the targets the route's requests go to, each with its
	// share in basis points (1/100 of a percent); they sum to
	// TotalWeight. A resolver is one split of TotalWeight.
	Splits []Split
	Dest   Dest
}

// TotalWeight is the sum of a route's split weights: 100 %, in basis
// points, Consul's precision (two decimals of a percent).
const TotalWeight = 10000

// Split is a share of a route's requests.
type Split struct {
	Weight int    // basis points, 0-TotalWeight
	Target string // a Target's Name
}

// Match is what a route matches. The zero Match matches every request.
// Its parts are ANDed; a request matches a list of Methods if its method
// is any of them.
type Match struct {
	PathExact, PathPrefix, PathRegex string // at most one is set
	CaseInsensitive                  bool   // for the path match
	Headers                          []HeaderMatch
	Query                            []QueryMatch
	Methods                          []string
}

// IsZero reports whether m matches every request: nothing is set but,
// perhaps, the path prefix "/" (Consul's catch-all route has it).
func (m Match) IsZero() bool {
	return m.PathExact == "" && (m.PathPrefix == "" || m.PathPrefix == "/") && m.PathRegex == "" && len(m.Headers) == 0 && len(m.Query) == 0 && len(m.Methods) == 0
}

// Kind is how a header or query parameter is compared.
type Kind int

// Kinds of comparison.
const (
	Present Kind = iota // the header or parameter is there
	Exact
	Prefix
	Suffix
	Regex
)

func (k Kind) String() string {
	return [...]string{"present", "exact", "prefix", "suffix", "regex"}[k]
}

// HeaderMatch compares one request header.
type HeaderMatch struct {
	Name   string
	Kind   Kind
	Value  string // empty for Present
	Invert bool
}

// QueryMatch compares one query parameter (Present, Exact or Regex).
type QueryMatch struct {
	Name  string
	Kind  Kind
	Value string
}

// Dest is what a route does to the requests it takes, beyond choosing
// their target.
type Dest struct {
	// RequestTimeout bounds the wait for the response (0: the
	// default).
	RequestTimeout time.Duration
	// NumRetries, RetryOnConnectFailure and RetryOnStatusCodes say when
	// a request is sent again.
	NumRetries            int
	RetryOnConnectFailure bool
	RetryOnStatusCodes    []int // sorted
	// PrefixRewrite replaces the matched path prefix (PathPrefix or
	// PathExact) when set.
	PrefixRewrite                   string
	RequestHeaders, ResponseHeaders HeaderMods
}

// HeaderMods changes headers: Add appends a value, Set replaces every
// value, Remove drops the header. Each list is sorted by name.
type HeaderMods struct {
	Add, Set []Header
	Remove   []string
}

// IsZero reports whether h changes nothing.
func (h HeaderMods) IsZero() bool { return len(h.Add) == 0 && len(h.Set) == 0 && len(h.Remove) == 0 }

// Header is a header name and value.
type Header struct{ Name, Value string }

// Target is one service, subset and datacenter that requests are sent to.
type Target struct {
	// Name is the target's stable identifier, "<service>:<subset>:<dc>"
	// (subset empty for none): HAProxy's identifier alphabet.
	Name       string
	Service    string
	Subset     string
	Datacenter string
	// Filter is the subset's filter expression, for Consul's health
	// query only; empty for all instances.
	Filter string
	// OnlyPassing: only instances whose checks all pass; otherwise
	// instances with warnings are used too.
	OnlyPassing    bool
	ConnectTimeout time.Duration // 0: the default
	Balance        Balance
	// Failover names the targets (in order of preference) that take the
	// requests when this one has no healthy endpoint.
	Failover []string
}

// Balance is how a target spreads requests over its endpoints.
type Balance struct {
	Policy Policy
	// Hash is what a Hash policy hashes on.
	HashOn   HashOn
	HashName string // header, cookie or query parameter name
}

// Policy is a load-balancing algorithm.
type Policy string

// Policies, after Consul's names: round_robin (the default),
// least_request, random, and ring_hash and maglev (both Hash: a
// consistent hash).
const (
	RoundRobin   Policy = ""
	LeastRequest Policy = "least_request"
	Random       Policy = "random"
	Hash         Policy = "hash"
)

// HashOn is the part of a request a Hash policy hashes.
type HashOn string

// What can be hashed.
const (
	HashSourceIP HashOn = "source_ip"
	HashHeader   HashOn = "header"
	HashCookie   HashOn = "cookie"
	HashQuery    HashOn = "query_parameter"
)

// Bounds of the values accepted.
const (
	MaxTimeout    = time.Hour
	MaxRetries    = 25
	MaxRoutes     = 64
	MaxSplits     = 32
	MaxTargets    = 32
	MaxMatchParts = 16
)

// retryStatuses are the response statuses HAProxy 2.6 can retry on
// ("retry-on" accepts exactly these).
var retryStatuses = []int{401, 403, 404, 408, 425, 500, 501, 502, 503, 504}

// ErrInvalid wraps every reason a chain is refused.
var ErrInvalid = errors.New("invalid discovery chain")

// Compile checks a chain as Consul serves it and returns its typed form.
// An error names the first value refused; a chain
// is used whole or not at all, so a bad entry never routes part of the
// traffic somewhere unintended.
func Compile(c *api.CompiledDiscoveryChain) (Chain, error) {
	if c == nil {
		return Chain{}, fmt.Errorf("%w: no chain", ErrInvalid)
	}
	k := compiler{in: c}
	out, err := k.compile()
	if err != nil {
		return Chain{}, fmt.Errorf("%w for %.80q: %w", ErrInvalid, c.ServiceName, err)
	}
	return out, nil
}

type compiler struct {
	in      *api.CompiledDiscoveryChain
	out     Chain
	targets map[string]*Target // by Consul target ID
	unsup   map[string]bool
}

func (k *compiler) unsupported(what string) {
	if k.unsup == nil {
		k.unsup = map[string]bool{}
	}
	k.unsup[what] = true
}

func (k *compiler) compile() (Chain, error) {
	c := k.in
	var err error
	if k.out.Service, err = input.Name("chain service", c.ServiceName); err != nil {
		return Chain{}, err
	}
	switch p := strings.ToLower(c.Protocol); p {
	case "", "tcp":
		k.out.Protocol = "tcp"
	case "http", "http2", "grpc":
		k.out.Protocol = p
	default:
		return Chain{}, input.ErrorOf("chain protocol", c.Protocol, "want tcp, http, http2 or grpc")
	}
	if err := k.defaultNamespace("chain namespace", c.Namespace); err != nil {
		return Chain{}, err
	}
	if len(c.Targets) > MaxTargets {
		return Chain{}, fmt.Errorf("%d targets: at most %d", len(c.Targets), MaxTargets)
	}
	k.targets = map[string]*Target{}
	ids := make([]string, 0, len(c.Targets))
	for id := range c.Targets {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	names := map[string]string{}
	for _, id := range ids {
		t, err := k.target(c.Targets[id])
		if err != nil {
			return Chain{}, fmt.Errorf("target %.80q: %w", id, err)
		}
		if other, dup := names[t.Name]; dup {
			return Chain{}, fmt.Errorf("targets %.80q and %.80q are both %s", other, id, t.Name)
		}
		names[t.Name] = id
		k.targets[id] = &t
	}
	start, ok := c.Nodes[c.StartNode]
	if !ok || start == nil {
		return Chain{}, fmt.Errorf("start node %.80q is not in the chain", c.StartNode)
	}
	if start.Type == api.DiscoveryGraphNodeTypeRouter {
		if len(start.Routes) == 0 || len(start.Routes) > MaxRoutes {
			return Chain{}, fmt.Errorf("router with %d routes: want 1-%d", len(start.Routes), MaxRoutes)
		}
		for i, r := range start.Routes {
			if r == nil {
				return Chain{}, fmt.Errorf("route %d is empty", i)
			}
			route, err := k.route(r)
			if err != nil {
				return Chain{}, fmt.Errorf("route %d: %w", i, err)
			}
			k.out.Routes = append(k.out.Routes, route)
		}
	} else {
		splits, err := k.splits(c.StartNode, 0)
		if err != nil {
			return Chain{}, err
		}
		k.out.Routes = []Route{{Splits: splits}}
	}
	if !k.out.Routes[len(k.out.Routes)-1].Match.IsZero() {
		// Consul ends every router with a catch-all to the service's
		// resolver; one without it would leave requests unrouted.
		return Chain{}, errors.New("the last route is not a catch-all")
	}
	if k.out.Protocol == "tcp" && (len(k.out.Routes) > 1 || len(k.out.Routes[0].Splits) > 1) {
		// Consul refuses routers and splitters for tcp services; a chain
		// that has them anyway is not one Consul compiled.
		return Chain{}, errors.New("routes or splits on a tcp service")
	}
	// Failover and resolver settings were recorded on the targets as
	// nodes were walked; every target a route or a failover names must
	// exist, and only those are kept.
	used := map[string]bool{}
	for _, r := range k.out.Routes {
		for _, s := range r.Splits {
			used[s.Target] = true
		}
	}
	for _, id := range ids {
		t := k.targets[id]
		if !used[t.Name] {
			continue
		}
		for _, f := range t.Failover {
			used[f] = true
		}
	}
	for _, id := range ids {
		if t := k.targets[id]; used[t.Name] {
			k.out.Targets = append(k.out.Targets, *t)
		}
	}
	slices.SortFunc(k.out.Targets, func(a, b Target) int { return strings.Compare(a.Name, b.Name) })
	k.out.Default = c.Default
	for u := range k.unsup {
		k.out.Unsupported = append(k.out.Unsupported, u)
	}
	slices.Sort(k.out.Unsupported)
	return k.out, nil
}

// defaultNamespace refuses a namespace or partition other than the
// default: Consul CE has only that one, and this sidecar only reaches it.
func (k *compiler) defaultNamespace(field, ns string) error {
	if ns != "" && ns != "default" {
		return input.ErrorOf(field, ns, "only the default namespace and partition are supported (Consul CE)")
	}
	return nil
}

func (k *compiler) target(t *api.DiscoveryTarget) (Target, error) {
	if t == nil {
		return Target{}, errors.New("empty")
	}
	var out Target
	var err error
	if out.Service, err = input.Name("target service", t.Service); err != nil {
		return Target{}, err
	}
	if t.ServiceSubset != "" {
		if out.Subset, err = input.Name("target subset", t.ServiceSubset); err != nil {
			return Target{}, err
		}
	}
	if err := k.defaultNamespace("target namespace", t.Namespace); err != nil {
		return Target{}, err
	}
	// Always explicit: Consul writes the datacenter it evaluated the
	// chain in, and the target's endpoints are queried there.
	if out.Datacenter, err = input.Datacenter("target datacenter", t.Datacenter); err != nil {
		return Target{}, err
	}
	if t.External {
		return Target{}, errors.New("external targets (terminating gateways) are not supported")
	}
	if out.Filter, err = input.Filter("subset filter", t.Subset.Filter); err != nil {
		return Target{}, err
	}
	out.OnlyPassing = t.Subset.OnlyPassing
	if out.ConnectTimeout, err = input.Timeout("connect timeout", t.ConnectTimeout, MaxTimeout); err != nil {
		return Target{}, err
	}
	if t.MeshGateway.Mode != "" && t.MeshGateway.Mode != api.MeshGatewayModeDefault && t.MeshGateway.Mode != api.MeshGatewayModeNone {
		k.unsupported("mesh gateway mode " + string(t.MeshGateway.Mode) + ": targets are reached directly")
	}
	out.Name = out.Service + ":" + out.Subset + ":" + out.Datacenter
	return out, nil
}

// splits walks a splitter or resolver node to the targets it leads to.
// Consul flattens nested splitters, so a splitter leads to resolvers
// only; depth guards against a chain that does not.
func (k *compiler) splits(name string, depth int) ([]Split, error) {
	n, ok := k.in.Nodes[name]
	if !ok || n == nil {
		return nil, fmt.Errorf("node %.80q is not in the chain", name)
	}
	switch n.Type {
	case api.DiscoveryGraphNodeTypeResolver:
		t, err := k.resolver(n)
		if err != nil {
			return nil, fmt.Errorf("resolver %.80q: %w", name, err)
		}
		return []Split{{Weight: TotalWeight, Target: t}}, nil
	case api.DiscoveryGraphNodeTypeSplitter:
		if depth > 0 {
			return nil, fmt.Errorf("splitter %.80q inside a splitter", name)
		}
		if len(n.Splits) == 0 || len(n.Splits) > MaxSplits {
			return nil, fmt.Errorf("splitter %.80q with %d splits: want 1-%d", name, len(n.Splits), MaxSplits)
		}
		var out []Split
		sum := 0
		for i, s := range n.Splits {
			if s == nil {
				return nil, fmt.Errorf("splitter %.80q split %d is empty", name, i)
			}
			w := float64(s.Weight)
			if math.IsNaN(w) || w < 0 || w > 100 {
				return nil, fmt.Errorf("splitter %.80q split %d: weight %v out of range 0-100", name, i, s.Weight)
			}
			next, err := k.splits(s.NextNode, depth+1)
			if err != nil {
				return nil, err
			}
			bp := int(math.Round(w * 100))
			sum += bp
			out = append(out, Split{Weight: bp, Target: next[0].Target})
		}
		// float32 weights that Consul checked sum to 100 may round to a
		// few basis points off: the last split takes the difference.
		if d := TotalWeight - sum; d != 0 {
			if d < -len(out) || d > len(out) {
				return nil, fmt.Errorf("splitter %.80q weights sum to %.2f, not 100", name, float64(sum)/100)
			}
			out[len(out)-1].Weight = max(0, out[len(out)-1].Weight+d)
		}
		return out, nil
	}
	return nil, fmt.Errorf("node %.80q of type %.20q where a splitter or resolver was expected", name, n.Type)
}

// resolver records a resolver node's settings on its target and returns
// the target's Name.
func (k *compiler) resolver(n *api.DiscoveryGraphNode) (string, error) {
	r := n.Resolver
	if r == nil {
		return "", errors.New("no resolver")
	}
	t, ok := k.targets[r.Target]
	if !ok {
		return "", fmt.Errorf("target %.80q is not in the chain", r.Target)
	}
	ct, err := input.Timeout("resolver connect timeout", r.ConnectTimeout, MaxTimeout)
	if err != nil {
		return "", err
	}
	if ct > 0 {
		t.ConnectTimeout = ct
	}
	if t.Balance, err = k.balance(n.LoadBalancer); err != nil {
		return "", err
	}
	t.Failover = nil
	if f := r.Failover; f != nil {
		if f.Policy.Mode != "" && f.Policy.Mode != "sequential" {
			k.unsupported("failover policy " + f.Policy.Mode + ": failover is sequential")
		}
		for _, id := range f.Targets {
			ft, ok := k.targets[id]
			if !ok {
				return "", fmt.Errorf("failover target %.80q is not in the chain", id)
			}
			if ft.Name != t.Name && !slices.Contains(t.Failover, ft.Name) {
				t.Failover = append(t.Failover, ft.Name)
			}
		}
	}
	return t.Name, nil
}

func (k *compiler) balance(lb *api.LoadBalancer) (Balance, error) {
	if lb == nil {
		return Balance{}, nil
	}
	switch lb.Policy {
	case "", "round_robin":
		return Balance{}, nil
	case "least_request":
		if lb.LeastRequestConfig != nil && lb.LeastRequestConfig.ChoiceCount != 0 {
			k.unsupported("least_request_config.choice_count: HAProxy's leastconn compares every server")
		}
		return Balance{Policy: LeastRequest}, nil
	case "random":
		return Balance{Policy: Random}, nil
	case "ring_hash", "maglev":
	default:
		return Balance{}, input.ErrorOf("load balancer policy", lb.Policy, "want round_robin, least_request, random, ring_hash or maglev")
	}
	if lb.RingHashConfig != nil {
		k.unsupported("ring_hash_config: HAProxy sizes its consistent hash ring from the server weights")
	}
	if len(lb.HashPolicies) == 0 {
		// Envoy hashes nothing then, and picks at random.
		return Balance{Policy: Random}, nil
	}
	if len(lb.HashPolicies) > 1 {
		k.unsupported("hash_policies beyond the first: HAProxy hashes one value")
	}
	hp := lb.HashPolicies[0]
	if hp.Terminal {
		k.unsupported("hash_policies terminal: only one policy is used")
	}
	b := Balance{Policy: Hash}
	var err error
	switch {
	case hp.SourceIP:
		b.HashOn = HashSourceIP
	case hp.Field == "header":
		b.HashOn = HashHeader
		b.HashName, err = input.HeaderName("hash header", hp.FieldValue)
	case hp.Field == "cookie":
		b.HashOn = HashCookie
		b.HashName, err = input.HeaderName("hash cookie", hp.FieldValue)
		if hp.CookieConfig != nil && (hp.CookieConfig.TTL != 0 || hp.CookieConfig.Path != "" || hp.CookieConfig.Session) {
			k.unsupported("hash cookie_config: HAProxy hashes a cookie the client sends, it does not generate one")
		}
	case hp.Field == "query_parameter":
		b.HashOn = HashQuery
		b.HashName, err = input.QueryParam("hash query parameter", hp.FieldValue)
	default:
		return Balance{}, input.ErrorOf("hash policy field", hp.Field, "want header, cookie, query_parameter or source_ip")
	}
	if err != nil {
		return Balance{}, err
	}
	return b, nil
}

func (k *compiler) route(r *api.DiscoveryRoute) (Route, error) {
	var out Route
	if def := r.Definition; def != nil {
		if def.Match != nil && def.Match.HTTP != nil {
			m, err := match(def.Match.HTTP)
			if err != nil {
				return Route{}, err
			}
			out.Match = m
		}
		if def.Destination != nil {
			d, err := k.dest(def.Destination, out.Match)
			if err != nil {
				return Route{}, err
			}
			out.Dest = d
		}
	}
	splits, err := k.splits(r.NextNode, 0)
	if err != nil {
		return Route{}, err
	}
	out.Splits = splits
	return out, nil
}

func match(h *api.ServiceRouteHTTPMatch) (Match, error) {
	var m Match
	var err error
	paths := 0
	if h.PathExact != "" {
		paths++
		if m.PathExact, err = input.URLPath("route path_exact", h.PathExact); err != nil {
			return Match{}, err
		}
	}
	if h.PathPrefix != "" {
		paths++
		if m.PathPrefix, err = input.URLPath("route path_prefix", h.PathPrefix); err != nil {
			return Match{}, err
		}
	}
	if h.PathRegex != "" {
		paths++
		if m.PathRegex, err = input.Regex("route path_regex", h.PathRegex); err != nil {
			return Match{}, err
		}
	}
	if paths > 1 {
		return Match{}, errors.New("more than one of path_exact, path_prefix and path_regex")
	}

	m.CaseInsensitive = h.CaseInsensitive
	if len(h.Header)+len(h.QueryParam)+len(h.Methods) > MaxMatchParts {
		return Match{}, fmt.Errorf("more than %d header, query parameter and method matches", MaxMatchParts)
	}
	for _, hm := range h.Header {
		x := HeaderMatch{Invert: hm.Invert}
		if x.Name, err = input.HeaderName("route header name", hm.Name); err != nil {
			return Match{}, err
		}
		set := 0
		for _, c := range []struct {
			kind  Kind
			value string
		}{{Exact, hm.Exact}, {Prefix, hm.Prefix}, {Suffix, hm.Suffix}, {Regex, hm.Regex}} {
			if c.value == "" {
				continue
			}
			set++
			x.Kind = c.kind
			if c.kind == Regex {
				x.Value, err = input.Regex("route header regex", c.value)
			} else {
				x.Value, err = input.HeaderValue("route header value", c.value)
			}
			if err != nil {
				return Match{}, err
			}
		}
		if hm.Present {
			set++
			x.Kind = Present
		}
		if set != 1 {
			return Match{}, fmt.Errorf("header %s: want exactly one of present, exact, prefix, suffix and regex", x.Name)
		}
		m.Headers = append(m.Headers, x)
	}
	for _, qm := range h.QueryParam {
		var x QueryMatch
		if x.Name, err = input.QueryParam("route query parameter", qm.Name); err != nil {
			return Match{}, err
		}
		set := 0
		if qm.Present {
			set++
			x.Kind = Present
		}
		if qm.Exact != "" {
			set++
			x.Kind = Exact
			if x.Value, err = input.HeaderValue("route query parameter value", qm.Exact); err != nil {
				return Match{}, err
			}
		}
		if qm.Regex != "" {
			set++
			x.Kind = Regex
			if x.Value, err = input.Regex("route query parameter regex", qm.Regex); err != nil {
				return Match{}, err
			}
		}
		if set != 1 {
			return Match{}, fmt.Errorf("query parameter %s: want exactly one of present, exact and regex", x.Name)
		}
		m.Query = append(m.Query, x)
	}
	for _, meth := range h.Methods {
		mm, err := input.Method("route method", meth)
		if err != nil {
			return Match{}, err
		}
		if !slices.Contains(m.Methods, mm) {
			m.Methods = append(m.Methods, mm)
		}
	}
	slices.Sort(m.Methods)
	return m, nil
}

func (k *compiler) dest(d *api.ServiceRouteDestination, m Match) (Dest, error) {
	var out Dest
	var err error
	if out.RequestTimeout, err = input.Timeout("route request_timeout", d.RequestTimeout, MaxTimeout); err != nil {
		return Dest{}, err
	}
	if d.IdleTimeout != 0 {
		k.unsupported("route idle_timeout: HAProxy 2.6 has no per-request idle timeout")
	}
	n, err := input.Count("route num_retries", int(min(d.NumRetries, math.MaxInt32)), MaxRetries)
	if err != nil {
		return Dest{}, err
	}
	out.NumRetries = n
	out.RetryOnConnectFailure = d.RetryOnConnectFailure
	for _, code := range d.RetryOnStatusCodes {
		c := int(min(code, 1000))
		if !slices.Contains(retryStatuses, c) {
			return Dest{}, input.ErrorOf("route retry_on_status_codes", fmt.Sprint(code), "HAProxy 2.6 retries on 401, 403, 404, 408, 425, 500, 501, 502, 503 and 504 only")
		}
		if !slices.Contains(out.RetryOnStatusCodes, c) {
			out.RetryOnStatusCodes = append(out.RetryOnStatusCodes, c)
		}
	}
	slices.Sort(out.RetryOnStatusCodes)
	if len(d.RetryOn) > 0 {
		k.unsupported("route retry_on: Envoy's retry conditions; use retry_on_connect_failure and retry_on_status_codes")
	}
	if d.PrefixRewrite != "" {
		if m.PathPrefix == "" && m.PathExact == "" {
			return Dest{}, errors.New("prefix_rewrite without path_prefix or path_exact")
		}
		if out.PrefixRewrite, err = input.URLPath("route prefix_rewrite", d.PrefixRewrite); err != nil {
			return Dest{}, err
		}
		if strings.Contains(out.PrefixRewrite, "%") {
			return Dest{}, input.ErrorOf("route prefix_rewrite", d.PrefixRewrite, "'%' is not supported")
		}
	}
	if out.RequestHeaders, err = mods("request", d.RequestHeaders); err != nil {
		return Dest{}, err
	}
	if out.ResponseHeaders, err = mods("response", d.ResponseHeaders); err != nil {
		return Dest{}, err
	}
	// Service, ServiceSubset, Namespace and Partition are how Consul
	// chose NextNode; they are not read again here.
	return out, nil
}

func mods(what string, h *api.HTTPHeaderModifiers) (HeaderMods, error) {
	var out HeaderMods
	if h == nil {
		return out, nil
	}
	if len(h.Add)+len(h.Set)+len(h.Remove) > MaxMatchParts {
		return HeaderMods{}, fmt.Errorf("%s headers: more than %d changes", what, MaxMatchParts)
	}
	pairs := func(m map[string]string, kind string) ([]Header, error) {
		var hs []Header
		for name, v := range m {
			n, err := input.HeaderName(what+" header "+kind+" name", name)
			if err != nil {
				return nil, err
			}
			if v, err = input.HeaderValue(what+" header "+kind+" value", v); err != nil {
				return nil, err
			}
			hs = append(hs, Header{n, v})
		}
		slices.SortFunc(hs, func(a, b Header) int { return strings.Compare(a.Name, b.Name) })
		return hs, nil
	}
	var err error
	if out.Add, err = pairs(h.Add, "add"); err != nil {
		return HeaderMods{}, err
	}
	if out.Set, err = pairs(h.Set, "set"); err != nil {
		return HeaderMods{}, err
	}
	for _, name := range h.Remove {
		n, err := input.HeaderName(what+" header remove", name)
		if err != nil {
			return HeaderMods{}, err
		}
		out.Remove = append(out.Remove, n)
	}
	slices.Sort(out.Remove)
	out.Remove = slices.Compact(out.Remove)
	return out, nil
}
