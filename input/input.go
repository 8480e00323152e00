// Package input is the one place that turns strings served by Consul, the
// network or an operator into typed, validated values: IP literals, ports,
// names, datacenters, HAProxy identifiers, paths, weights and endpoints.
// It depends on nothing else in the project.
package input

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
)

// ErrInvalid is wrapped by every rejection.
var ErrInvalid = errors.New("invalid input")

// Error is a rejected value: the field it was read for, the value as
// received, and why it was refused.
type Error struct {
	Field  string // what the value was for: "address", "port", "upstream destination", ...
	Value  string // as received
	Reason string
}

// maxQuoted bounds how much of a rejected value an error message repeats: a
// hostile value can be megabytes.
const maxQuoted = 80

// Error quotes the value (%q), so a newline or a control byte in it cannot
// start a new line in a log.
func (e *Error) Error() string {
	v := e.Value
	if len(v) > maxQuoted {
		v = v[:maxQuoted] + "..."
	}
	return fmt.Sprintf("invalid %s %q: %s", e.Field, v, e.Reason)
}

// Unwrap makes errors.Is(err, ErrInvalid) hold.
func (e *Error) Unwrap() error { return ErrInvalid }

// FieldOf is the field a rejection names, or "" for another error.
func FieldOf(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Field
	}
	return ""
}

func reject(field, value, reason string) error {
	return &Error{Field: field, Value: value, Reason: reason}
}

// MaxWeight is HAProxy's largest server weight. Consul allows weights up to
// 65535; larger ones are clamped to this (see NewEndpoint).
const MaxWeight = 256

// Addr parses an IP literal. It accepts only the form netip.Addr.String
// gives back, so the text that reaches HAProxy is the text that was checked.
// That refuses, beyond what is not an IP at all: an IPv6 zone, which
// netip.ParseAddr accepts made of any bytes ("fe80::1%x\n@1 reload" parses,
// and String gives it back unchanged); IPv4-mapped IPv6 addresses
// ("::ffff:1.2.3.4": register the IPv4 address); leading zeros, upper case
// and uncompressed IPv6; and surrounding space. HAProxy 2.6's "set server
// addr" resolves no names, so a host name is refused too.
func Addr(field, s string) (netip.Addr, error) {
	if s == "" {
		return netip.Addr{}, reject(field, s, "empty")
	}
	a, err := netip.ParseAddr(s)
	switch {
	case err != nil:
		return netip.Addr{}, reject(field, s, "not an IP literal")
	case a.Zone() != "":
		return netip.Addr{}, reject(field, s, "has an IPv6 zone")
	case a.Is4In6():
		return netip.Addr{}, reject(field, s, "IPv4-mapped IPv6 address (use the IPv4 address)")
	case a.String() != s:
		return netip.Addr{}, reject(field, s, "not in canonical form (want "+a.String()+")")
	}
	return a, nil
}

// Port checks a TCP port: 1-65535. HAProxy wraps a larger one silently
// (70000 becomes 4464), so the range is checked here.
func Port(field string, p int) (uint16, error) {
	if p < 1 || p > 65535 {
		return 0, reject(field, strconv.Itoa(p), "port out of range 1-65535")
	}
	return uint16(p), nil
}

// AddrPort parses "addr:port" ("[v6]:port") with both parts as Addr and
// Port check them, and the whole in canonical form.
func AddrPort(field, s string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}, reject(field, s, "not an IP literal and port")
	}
	if _, err := Addr(field, ap.Addr().String()); err != nil {
		return netip.AddrPort{}, err
	}
	if _, err := Port(field, int(ap.Port())); err != nil {
		return netip.AddrPort{}, err
	}
	if ap.String() != s {
		return netip.AddrPort{}, reject(field, s, "not in canonical form (want "+ap.String()+")")
	}
	return ap, nil
}

// The regular expressions of this package bound the alphabet and the
// structure; lengths are checked beside them (within). A bounded repetition
// such as {1,255} compiles to that many copies of its character class,
// held for the life of the process.
var (
	// nameRE is a Consul service (or prepared query) name as the sidecar
	// accepts it: letters, digits, '-', '_' and '.', starting with a letter
	// or digit, at most 63 bytes (a DNS label, which is what Consul
	// recommends for service names).
	nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)
	// datacenterRE is Consul's own rule for datacenter names (agent config
	// builder: ^[a-z0-9_-]+$), in either case, at most 63 bytes.
	datacenterRE = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)
	// identRE is HAProxy's identifier alphabet for proxy and server names
	// (src/tools.c invalid_char: letters, digits, '-', '_', '.', ':'), at
	// most maxIdent bytes.
	identRE = regexp.MustCompile(`^[A-Za-z0-9_.:-]+$`)
	// pathRE limits the file names handed to HAProxy: absolute, no spaces,
	// nothing the CLI or the configuration parser would split on; at most
	// 256 bytes.
	pathRE = regexp.MustCompile(`^/[A-Za-z0-9_./+-]+$`)
	// dnsNameRE is a DNS name of at least two lower-case labels, as
	// Consul's trust domains and SNI names are; labels of at most 63
	// bytes.
	dnsNameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$`)
)

// maxIdent holds the longest name this project derives: "qup_" + a 63-byte
// name + "_" + a 63-byte datacenter.
const maxIdent = 160

// within reports whether s is min to max bytes long and matches re.
func within(re *regexp.Regexp, s string, min, max int) bool {
	return len(s) >= min && len(s) <= max && re.MatchString(s)
}

// labelsWithin reports whether every dot-separated label of s is at most
// max bytes long.
func labelsWithin(s string, max int) bool {
	for l := range strings.SplitSeq(s, ".") {
		if len(l) > max {
			return false
		}
	}
	return true
}

// Name checks a service, upstream destination or prepared query name.
func Name(field, s string) (string, error) {
	if !within(nameRE, s, 1, 63) {
		return "", reject(field, s, "want 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit")
	}
	return s, nil
}

// Datacenter checks a datacenter name.
func Datacenter(field, s string) (string, error) {
	if !within(datacenterRE, s, 1, 63) {
		return "", reject(field, s, "want 1-63 letters, digits, '-' or '_'")
	}
	return s, nil
}

// Ident checks an HAProxy proxy or server name.
func Ident(field, s string) (string, error) {
	if !within(identRE, s, 1, maxIdent) {
		return "", reject(field, s, "want 1-160 letters, digits, '-', '_', '.' or ':'")
	}
	return s, nil
}

// DNSName checks a DNS name of lower-case labels, at most 253 bytes: a
// trust domain, or a TLS server name for a crt-list filter (nothing HAProxy
// would read as an option, a negation or a wildcard).
func DNSName(field, s string) (string, error) {
	if !within(dnsNameRE, s, 1, 253) || !labelsWithin(s, 63) {
		return "", reject(field, s, "want a DNS name of two or more lower-case labels of letters, digits and '-'")
	}
	return s, nil
}

// Path checks an absolute file path handed to HAProxy.
func Path(field, s string) (string, error) {
	if !within(pathRE, s, 2, 256) {
		return "", reject(field, s, "want an absolute path of letters, digits and _ . / + -")
	}
	return s, nil
}

// Weight checks an HAProxy server weight: 0-MaxWeight.
func Weight(field string, w int) (int, error) {
	if w < 0 || w > MaxWeight {
		return 0, reject(field, strconv.Itoa(w), "weight out of range 0-"+strconv.Itoa(MaxWeight))
	}
	return w, nil
}

// Endpoint is one instance of an upstream that HAProxy may connect to. Only
// NewEndpoint builds one, so a value of this type has been checked.
type Endpoint struct {
	id     string
	addr   netip.Addr
	port   uint16
	weight int
}

// Field names NewEndpoint's errors use (and the controller's
// invalid-instance counter is labelled with).
const (
	FieldAddress = "address"
	FieldPort    = "port"
	FieldWeight  = "weight"
)

// NewEndpoint checks an instance as Consul serves it: id is its service ID
// (only logged, never sent to HAProxy, so not checked), addr an IP literal
// (see Addr) that is neither unspecified nor multicast, port 1-65535, and
// weight Consul's passing weight: 0 means none was given and is 1, and
// weights above MaxWeight are clamped to it (Consul allows up to 65535).
func NewEndpoint(id, addr string, port, weight int) (Endpoint, error) {
	a, err := Addr(FieldAddress, addr)
	if err != nil {
		return Endpoint{}, err
	}
	if a.IsUnspecified() || a.IsMulticast() {
		return Endpoint{}, reject(FieldAddress, addr, "not a unicast address")
	}
	p, err := Port(FieldPort, port)
	if err != nil {
		return Endpoint{}, err
	}
	if weight < 0 || weight > 65535 {
		return Endpoint{}, reject(FieldWeight, strconv.Itoa(weight), "weight out of Consul's range 1-65535")
	}
	return Endpoint{id: id, addr: a, port: p, weight: min(max(weight, 1), MaxWeight)}, nil
}

// ID is the instance's Consul service ID.
func (e Endpoint) ID() string { return e.id }

// Addr is the instance's address.
func (e Endpoint) Addr() netip.Addr { return e.addr }

// Port is the instance's port.
func (e Endpoint) Port() uint16 { return e.port }

// AddrPort is where HAProxy connects.
func (e Endpoint) AddrPort() netip.AddrPort { return netip.AddrPortFrom(e.addr, e.port) }

// Weight is the HAProxy weight, 1-MaxWeight.
func (e Endpoint) Weight() int { return e.weight }

// instanceIDRE is a Consul service instance ID as the sidecar repeats it
// to HAProxy (the slot-to-instance map, see package bootstrap): HAProxy's
// identifier alphabet, at most 128 bytes. Consul takes IDs of almost any
// bytes; one outside this is not written anywhere HAProxy reads.
var instanceIDRE = regexp.MustCompile(`^[A-Za-z0-9_.:-]+$`)

// InstanceID checks a Consul service instance ID that is to reach HAProxy
// as one word of a map value.
func InstanceID(field, s string) (string, error) {
	if !within(instanceIDRE, s, 1, 128) {
		return "", reject(field, s, "want 1-128 letters, digits, '-', '_', '.' or ':'")
	}
	return s, nil
}

var (
	// exposePathRE is an HTTP path as an expose listener matches it
	// exactly (rendered unquoted): absolute, at most 255 bytes, of a
	// conservative subset of RFC 3986's path characters. Nothing
	// HAProxy's configuration parser reads specially passes: no space,
	// quote, backslash, '#' (a comment), brace or newline.
	exposePathRE = regexp.MustCompile(`^/[A-Za-z0-9_./~%+=:@,!$*-]*$`)
	// socketModeRE is a unix socket's permission bits in octal, as Consul
	// documents local_bind_socket_mode ("0700"), with or without the
	// leading zero.
	socketModeRE = regexp.MustCompile(`^0?[0-7]{3}$`)
)

// ExposePath checks an expose path (stricter than URLPath: it is matched
// unquoted).
func ExposePath(field, s string) (string, error) {
	if !within(exposePathRE, s, 1, 255) {
		return "", reject(field, s, "want an absolute HTTP path of at most 255 letters, digits and _ . / ~ % + = : @ , ! $ * -")
	}
	return s, nil
}

// SocketMode checks a unix socket's octal permission bits and returns them
// with four digits ("700" gives "0700").
func SocketMode(field, s string) (string, error) {
	if !socketModeRE.MatchString(s) {
		return "", reject(field, s, "want octal permission bits such as 0600")
	}
	if len(s) == 3 {
		s = "0" + s
	}
	return s, nil
}

// ErrorOf is a rejection of value for field, for checks made outside this
// package (an enumeration, a combination of fields).
func ErrorOf(field, value, reason string) error { return reject(field, value, reason) }
