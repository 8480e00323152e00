// Package l7 is the model of Consul's L7 intentions: the Permissions of a
// service-intentions source, validated as hostile input, and the per-request
// decision with Consul's semantics (first matching permission wins; none
// matching falls to the default intention policy), and the same decisions
// compiled into entries of HAProxy's L7 map (haproxy.go). It is pure: no
// I/O, no HAProxy process, no Consul client; the SPOE agent feeds it
// requests, the controller sends the entries.
package l7

import (
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/input"
)

// ErrInvalid is wrapped by every rejection of a permission.
var ErrInvalid = errors.New("invalid L7 intention")

// Bounds on what Consul may hand us. Consul has no such limits, but an
// intention past them is surely not meant for a sidecar, and an unbounded
// one is a cost per request.
const (
	MaxPermissions = 64
	MaxHeaders     = 32
	MaxMethods     = 16
	MaxValue       = 1024 // bytes of a path, header value or regex
	MaxHeaderName  = 256
)

// Permission is one validated entry of an intention's Permissions.
type Permission struct {
	Allow bool
	// Index is the permission's position in the intention (0-based), for
	// the access log.
	Index int

	pathExact, pathPrefix string
	pathRegex             *regexp.Regexp
	methods               []string
	headers               []headerMatch
}

// Intention is the L7 intention of one source: its name as Consul lists it
// (a service name or "*") and its permissions in order.
type Intention struct {
	Source      string
	Permissions []Permission
}

type matchKind int

const (
	matchPresent matchKind = iota
	matchExact
	matchPrefix
	matchSuffix
	matchContains
	matchRegex
)

type headerMatch struct {
	name       string // lower case
	kind       matchKind
	value      string
	re         *regexp.Regexp
	invert     bool
	ignoreCase bool
}

// Request is what a permission is matched against. Path is the URL path
// without the query string (Envoy's url_path, which Consul's RBAC filter
// matches on). Header returns the values of a header (name in lower case)
// and whether it is present.
type Request struct {
	Method string
	Path   string
	Header func(name string) (values []string, ok bool)
}

// Decide returns the decision for r: the first matching permission's
// action and that permission, or matched false when none matches (the
// caller then applies the default intention policy, as Consul's RBAC does:
// a source's L7 intention hides its lower-precedence ones).
func (in *Intention) Decide(r Request) (p Permission, matched bool) {
	for _, p := range in.Permissions {
		if p.matches(r) {
			return p, true
		}
	}
	return Permission{}, false
}

// Label names a permission in the access log: "<index>:<allow|deny>". It
// carries no value from Consul, so it needs no escaping.
func (p Permission) Label() string {
	a := "deny"
	if p.Allow {
		a = "allow"
	}
	return fmt.Sprintf("%d:%s", p.Index, a)
}

// HeaderNames returns the header names (lower case) the intention reads.
func (in *Intention) HeaderNames() []string {
	var out []string
	for _, p := range in.Permissions {
		for _, h := range p.headers {
			if !slices.Contains(out, h.name) {
				out = append(out, h.name)
			}
		}
	}
	return out
}

func (p Permission) matches(r Request) bool {
	switch {
	case p.pathExact != "":
		if r.Path != p.pathExact {
			return false
		}
	case p.pathPrefix != "":
		if !strings.HasPrefix(r.Path, p.pathPrefix) {
			return false
		}
	case p.pathRegex != nil:
		if !p.pathRegex.MatchString(r.Path) {
			return false
		}
	}
	for _, h := range p.headers {
		var vals []string
		ok := false
		if r.Header != nil {
			vals, ok = r.Header(h.name)
		}
		if !h.matches(vals, ok) {
			return false
		}
	}
	if len(p.methods) > 0 && !slices.Contains(p.methods, r.Method) {
		return false
	}
	return true
}

// matches follows Envoy's HeaderUtility::matchHeaders (Consul's RBAC filter
// renders each header permission as an Envoy HeaderMatcher): a header sent
// several times is matched as its values joined by ","; an absent header
// matches only an inverted Present; Invert negates the match of a present
// header.
func (h headerMatch) matches(vals []string, ok bool) bool {
	if !ok {
		return h.kind == matchPresent && h.invert
	}
	v := strings.Join(vals, ",")
	var m bool
	switch h.kind {
	case matchPresent:
		m = true
	case matchRegex:
		m = h.re.MatchString(v)
	default:
		want := h.value
		if h.ignoreCase {
			v, want = strings.ToLower(v), strings.ToLower(want)
		}
		switch h.kind {
		case matchExact:
			m = v == want
		case matchPrefix:
			m = strings.HasPrefix(v, want)
		case matchSuffix:
			m = strings.HasSuffix(v, want)
		case matchContains:
			m = strings.Contains(v, want)
		}
	}
	return m != h.invert
}

// Parse validates a source's permissions as Consul hands them. Every value
// is hostile: sizes are bounded, paths and header values must be printable
// ASCII (paths starting with "/"), methods and header names HTTP tokens,
// and regexes compile as Go's RE2 (Envoy's safe_regex is RE2 too, matched
// against the whole value, as here). An error names the permission and
// the field; the caller refuses the source's requests.
func Parse(source string, perms []*api.IntentionPermission) (*Intention, error) {
	if source != "*" {
		if _, err := input.Name("intention source", source); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
		}
	}
	if len(perms) == 0 {
		return nil, fmt.Errorf("%w: source %s has no permissions", ErrInvalid, source)
	}
	if len(perms) > MaxPermissions {
		return nil, fmt.Errorf("%w: source %s has %d permissions (at most %d)", ErrInvalid, source, len(perms), MaxPermissions)
	}
	in := &Intention{Source: source}
	for i, ap := range perms {
		p, err := parsePermission(i, ap)
		if err != nil {
			return nil, fmt.Errorf("%w: source %s permission %d: %w", ErrInvalid, source, i, err)
		}
		in.Permissions = append(in.Permissions, p)
	}
	return in, nil
}

func parsePermission(i int, ap *api.IntentionPermission) (Permission, error) {
	p := Permission{Index: i}
	if ap == nil {
		return p, errors.New("null permission")
	}
	switch ap.Action {
	case api.IntentionActionAllow:
		p.Allow = true
	case api.IntentionActionDeny:
	default:
		return p, fmt.Errorf("action %q (want allow or deny)", trunc(string(ap.Action)))
	}
	if ap.JWT != nil {
		// A JWT requirement is a condition this sidecar cannot check:
		// refusing the intention is the only way not to allow more
		// than it says.
		return p, errors.New("JWT requirements are not supported")
	}
	h := ap.HTTP
	if h == nil {
		return p, nil // matches every request
	}
	paths := 0
	for _, s := range []string{h.PathExact, h.PathPrefix, h.PathRegex} {
		if s != "" {
			paths++
		}
	}
	if paths > 1 {
		return p, errors.New("more than one of PathExact, PathPrefix, PathRegex")
	}
	var err error
	switch {
	case h.PathExact != "":
		p.pathExact, err = checkPath("PathExact", h.PathExact)
	case h.PathPrefix != "":
		p.pathPrefix, err = checkPath("PathPrefix", h.PathPrefix)
	case h.PathRegex != "":
		p.pathRegex, err = compile("PathRegex", h.PathRegex)
	}
	if err != nil {
		return p, err
	}
	if len(h.Methods) > MaxMethods {
		return p, fmt.Errorf("%d methods (at most %d)", len(h.Methods), MaxMethods)
	}
	for _, m := range h.Methods {
		if !isToken(m) || len(m) > 32 {
			return p, fmt.Errorf("method %q is not an HTTP token", trunc(m))
		}
		p.methods = append(p.methods, m)
	}
	if len(h.Header) > MaxHeaders {
		return p, fmt.Errorf("%d header matches (at most %d)", len(h.Header), MaxHeaders)
	}
	for j, ah := range h.Header {
		hm, err := parseHeader(ah)
		if err != nil {
			return p, fmt.Errorf("header %d: %w", j, err)
		}
		p.headers = append(p.headers, hm)
	}
	return p, nil
}

func parseHeader(ah api.IntentionHTTPHeaderPermission) (headerMatch, error) {
	hm := headerMatch{name: strings.ToLower(ah.Name), invert: ah.Invert, ignoreCase: ah.IgnoreCase}
	if !isToken(ah.Name) || len(ah.Name) > MaxHeaderName {
		return hm, fmt.Errorf("name %q is not an HTTP header name", trunc(ah.Name))
	}
	n := 0
	if ah.Present {
		n++
		hm.kind = matchPresent
	}
	for _, c := range []struct {
		kind matchKind
		v    string
	}{{matchExact, ah.Exact}, {matchPrefix, ah.Prefix}, {matchSuffix, ah.Suffix}, {matchContains, ah.Contains}, {matchRegex, ah.Regex}} {
		if c.v != "" {
			n++
			hm.kind, hm.value = c.kind, c.v
		}
	}
	if n != 1 {
		return hm, fmt.Errorf("header %s has %d of Present, Exact, Prefix, Suffix, Contains, Regex (want exactly one)", hm.name, n)
	}
	if hm.kind == matchRegex {
		re, err := compile("Regex", hm.value)
		if err != nil {
			return hm, err
		}
		hm.re = re
		return hm, nil
	}
	if hm.kind != matchPresent {
		if len(hm.value) > MaxValue || !printable(hm.value) {
			return hm, fmt.Errorf("header %s value %q is not printable ASCII of at most %d bytes", hm.name, trunc(hm.value), MaxValue)
		}
	}
	return hm, nil
}

func checkPath(field, s string) (string, error) {
	if len(s) > MaxValue || !strings.HasPrefix(s, "/") || !printable(s) || strings.ContainsRune(s, ' ') {
		return "", fmt.Errorf("%s %q is not a path (printable ASCII from \"/\", at most %d bytes)", field, trunc(s), MaxValue)
	}
	return s, nil
}

// compile compiles an RE2 regex matched against the whole value, as
// Envoy's safe_regex is.
func compile(field, s string) (*regexp.Regexp, error) {
	if len(s) > MaxValue {
		return nil, fmt.Errorf("%s is longer than %d bytes", field, MaxValue)
	}
	re, err := regexp.Compile(`^(?:` + s + `)$`)
	if err != nil {
		return nil, fmt.Errorf("%s %q: %w", field, trunc(s), err)
	}
	return re, nil
}

func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// isToken reports whether s is an HTTP token (RFC 9110 tchar+).
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}

func trunc(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// Lookup is the L7 answer for one source.
type Lookup struct {
	// Intention is the source's L7 intention; nil when the intention that
	// governs the source is L4 (or there is none): Consul's L4 decision
	// stands then.
	Intention *Intention
	// Err is set when the governing intention has permissions that were
	// refused (see Parse): every request of the source is denied.
	Err error
	// Key names the intention's entries in HAProxy's L7 map (Compile);
	// empty when it has none, and the agent decides each request.
	Key string
}
