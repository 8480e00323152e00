package bootstrap

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/haproxy-connect/haproxy-connect/input"
)

// The slot-to-instance map and the state map: what HAProxy itself holds of
// the sidecar's state beyond its configuration, so that "haproxy-connect
// status" (and a controller adopting a running HAProxy) can read it from
// the master socket alone.
//
// The instance map (Spec.InstanceMap) has one entry per slot of every
// upstream backend: key "<backend>/<slot>" (InstanceKey), value FreeSlot
// or "<instance ID>@<addr>:<port>" (InstanceValue). The controller keeps
// it current at run time ("set map", "add map" for a slot added with "add
// server") in the batch that moves the slot. An upstream frontend's access
// log looks the serving slot up in it, so a log line names the Consul
// instance that served it, not only a slot name that changes hands.
//
// The state map (Spec.StateMap) holds StateReasonKey, the reason of the
// reload (or start) that loaded the configuration, and StateConfigIDKey,
// Spec.ConfigID, when set. It changes only with the configuration.

// Keys of the state map, and the value of a free slot in the instance map.
const (
	StateReasonKey   = "reload_reason"
	StateConfigIDKey = "config_id"
	FreeSlot         = "-"
	// UnknownInstance stands for an instance ID that is not one word of
	// HAProxy's identifier alphabet (input.InstanceID): Consul takes IDs of
	// almost any bytes, and none of them reaches HAProxy.
	UnknownInstance = "?"
	// maxReason bounds the reason's encoded length in the state map.
	maxReason = 480
)

// InstanceKey is the instance map key of a slot.
func InstanceKey(backend, slot string) string { return backend + "/" + slot }

// InstanceValue is the instance map value of a slot serving the Consul
// instance id at addr:port, which the caller has validated (a slot table's
// endpoint). An id that input.InstanceID refuses is UnknownInstance.
func InstanceValue(id, addr string, port int) string {
	if _, err := input.InstanceID("instance ID", id); err != nil {
		id = UnknownInstance
	}
	return id + "@" + netip.AddrPortFrom(netip.MustParseAddr(addr), uint16(port)).String()
}

// ParseInstanceValue reads an instance map value back: free for FreeSlot,
// else the instance ID (UnknownInstance, or one input.InstanceID accepts)
// and the address it serves. Anything else is an error: the value was not
// written by this package.
func ParseInstanceValue(v string) (id string, addr netip.AddrPort, free bool, err error) {
	if v == FreeSlot {
		return "", netip.AddrPort{}, true, nil
	}
	id, ap, ok := strings.Cut(v, "@")
	if !ok {
		return "", netip.AddrPort{}, false, fmt.Errorf("instance map value %q: no '@'", v)
	}
	if id != UnknownInstance {
		if _, err := input.InstanceID("instance ID", id); err != nil {
			return "", netip.AddrPort{}, false, fmt.Errorf("instance map value: %w", err)
		}
	}
	a, err := input.AddrPort("instance address", ap)
	if err != nil {
		return "", netip.AddrPort{}, false, fmt.Errorf("instance map value: %w", err)
	}
	return id, a, false, nil
}

// RenderInstanceMap is the content of the instance map for s: every slot
// of every upstream, in backend then slot order. A used slot's instance
// comes from its upstream's Instances.
func RenderInstanceMap(s Spec) string {
	ups := slices.Clone(s.Upstreams)
	slices.SortFunc(ups, func(a, b Upstream) int { return strings.Compare(a.Name, b.Name) })
	var b strings.Builder
	for _, u := range ups {
		for _, sl := range u.Slots.Slots {
			v := FreeSlot
			if sl.Used {
				v = InstanceValue(u.Instances[sl.Key()], sl.Addr, sl.Port)
			}
			fmt.Fprintf(&b, "%s %s\n", InstanceKey(u.Name, sl.Name), v)
		}
	}
	return b.String()
}

// RenderStateMap is the content of the state map for s.
func RenderStateMap(s Spec) string {
	out := StateReasonKey + " " + EncodeToken(s.Reason) + "\n"
	if s.ConfigID != "" {
		out += StateConfigIDKey + " " + s.ConfigID + "\n"
	}
	return out
}

// tokenSafe reports whether b stands for itself in EncodeToken.
func tokenSafe(b byte) bool {
	return 'a' <= b && b <= 'z' || 'A' <= b && b <= 'Z' || '0' <= b && b <= '9' || strings.IndexByte(".:/@[]?-", b) >= 0
}

// EncodeToken writes any text as one map value word (what "set map" and a
// map file line carry as one word, see runtime.ValidMapEntry): a space is
// '_', a byte of [A-Za-z0-9.:/@[]?-] stands for itself, any other byte is
// '~' and two hex digits. Text longer than fits about 480 encoded bytes
// is cut, ending in "...". The empty text is "-" (a map value cannot be
// empty), so "-" itself is "~2D".
func EncodeToken(s string) string {
	if s == "-" {
		return "~2D"
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if b.Len() > maxReason {
			b.WriteString("...")
			break
		}
		switch c := s[i]; {
		case c == ' ':
			b.WriteByte('_')
		case tokenSafe(c):
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, "~%02X", c)
		}
	}
	if b.Len() == 0 {
		return "-"
	}
	return b.String()
}

// DecodeToken reverses EncodeToken.
func DecodeToken(v string) (string, error) {
	if v == "-" {
		return "", nil
	}
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		switch c := v[i]; {
		case c == '_':
			b.WriteByte(' ')
		case c == '~':
			var x byte
			if i+2 >= len(v) || !unhex(v[i+1:i+3], &x) {
				return "", fmt.Errorf("encoded text %q: bad escape at byte %d", v, i)
			}
			b.WriteByte(x)
			i += 2
		case tokenSafe(c):
			b.WriteByte(c)
		default:
			return "", fmt.Errorf("encoded text %q: byte %#x", v, c)
		}
	}
	return b.String(), nil
}

func unhex(s string, out *byte) bool {
	var v byte
	for i := 0; i < 2; i++ {
		c := s[i]
		switch {
		case '0' <= c && c <= '9':
			v = v<<4 | (c - '0')
		case 'A' <= c && c <= 'F':
			v = v<<4 | (c - 'A' + 10)
		default:
			return false
		}
	}
	*out = v
	return true
}
