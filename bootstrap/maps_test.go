package bootstrap

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/haproxy-connect/haproxy-connect/runtime"
)

func TestInstanceValue(t *testing.T) {
	tests := []struct {
		id, addr string
		port     int
		want     string
	}{
		{"web-1-sidecar-proxy", "10.0.0.1", 21000, "web-1-sidecar-proxy@10.0.0.1:21000"},
		{"_nomad-task-8e8f-group-web-web-9090-sidecar-proxy", "fd00::7", 1, "_nomad-task-8e8f-group-web-web-9090-sidecar-proxy@[fd00::7]:1"},
		{"web 1", "10.0.0.1", 80, "?@10.0.0.1:80"},
		{"w;@1 reload", "10.0.0.1", 80, "?@10.0.0.1:80"},
		{"", "10.0.0.1", 80, "?@10.0.0.1:80"},
		{strings.Repeat("x", 129), "10.0.0.1", 80, "?@10.0.0.1:80"},
	}
	for _, tt := range tests {
		got := InstanceValue(tt.id, tt.addr, tt.port)
		if got != tt.want {
			t.Errorf("InstanceValue(%q) = %q, want %q", tt.id, got, tt.want)
		}
		if !runtime.ValidMapEntry(InstanceKey("up_web", "s1"), got) {
			t.Errorf("%q is not a map value set map can send", got)
		}
		id, ap, free, err := ParseInstanceValue(got)
		if err != nil || free || ap.String() != netip.AddrPortFrom(netip.MustParseAddr(tt.addr), uint16(tt.port)).String() || !strings.HasPrefix(got, id+"@") {
			t.Errorf("ParseInstanceValue(%q) = %q, %v, %v, %v", got, id, ap, free, err)
		}
	}
	if _, _, free, err := ParseInstanceValue(FreeSlot); !free || err != nil {
		t.Errorf("ParseInstanceValue(%q) = free %v, %v", FreeSlot, free, err)
	}
	for _, bad := range []string{"", "web", "web@", "web@10.0.0.1", "a b@10.0.0.1:1", "web@010.0.0.1:1", "web@[fe80::1%x]:1", "@10.0.0.1:1"} {
		if _, _, _, err := ParseInstanceValue(bad); err == nil {
			t.Errorf("ParseInstanceValue(%q) accepted", bad)
		}
	}
}

func TestEncodeToken(t *testing.T) {
	tests := []struct{ in, want string }{
		{"start", "start"},
		{"registration: upstream up_db added; CA roots changed", "registration:_upstream_up~5Fdb_added~3B_CA_roots_changed"},
		{"", "-"},
		{"-", "~2D"},
		{"a\nb#c%d~e", "a~0Ab~23c~25d~7Ee"},
		{"wé", "w~C3~A9"},
	}
	for _, tt := range tests {
		got := EncodeToken(tt.in)
		if got != tt.want {
			t.Errorf("EncodeToken(%q) = %q, want %q", tt.in, got, tt.want)
		}
		if back, err := DecodeToken(got); err != nil || back != tt.in {
			t.Errorf("DecodeToken(%q) = %q, %v; want %q", got, back, err, tt.in)
		}
	}
	long := EncodeToken(strings.Repeat(";", 1000))
	if !strings.HasSuffix(long, "...") || len(long) > 512 || !runtime.ValidMapEntry(StateReasonKey, long) {
		t.Errorf("a long reason encodes to %d bytes %q...", len(long), long[:20])
	}
	for _, bad := range []string{"a b", "~4", "~4g", "~", "a#b", "a%20b"} {
		if _, err := DecodeToken(bad); err == nil {
			t.Errorf("DecodeToken(%q) accepted", bad)
		}
	}
}

// FuzzToken: any text encodes to one map value word that decodes back to
// it (to its first part, with "...", when it is cut); DecodeToken and
// ParseInstanceValue never panic on what a map could hold.
func FuzzToken(f *testing.F) {
	for _, s := range []string{"start", "registration: a; b", "", "-", "~41", "a_b", "w@[fd00::7]:1", "\x00\n;#"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		enc := EncodeToken(s)
		if !runtime.ValidMapEntry(StateReasonKey, enc) {
			t.Fatalf("EncodeToken(%q) = %q, not one map value word", s, enc)
		}
		back, err := DecodeToken(enc)
		if err != nil {
			t.Fatalf("DecodeToken(EncodeToken(%q)): %v", s, err)
		}
		if back != s && !(strings.HasSuffix(enc, "...") && strings.HasPrefix(s, strings.TrimSuffix(back, "..."))) {
			t.Fatalf("round trip of %q gave %q", s, back)
		}
		_, _ = DecodeToken(s)
		if id, ap, free, err := ParseInstanceValue(s); err == nil && !free {
			if !strings.HasPrefix(s, id+"@") || !ap.IsValid() {
				t.Fatalf("ParseInstanceValue(%q) = %q, %v", s, id, ap)
			}
		}
	})
}
