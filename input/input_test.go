package input

import (
	"errors"
	"strings"
	"testing"
)

func TestAddr(t *testing.T) {
	tests := []struct {
		in     string
		reason string // "" for accepted
	}{
		{"127.0.0.1", ""},
		{"10.0.0.7", ""},
		{"0.0.0.0", ""},
		{"::", ""},
		{"::1", ""},
		{"fd00::7", ""},
		{"", "empty"},
		{"localhost", "not an IP literal"},
		{"10.0.0.1 ", "not an IP literal"},
		{" 10.0.0.1", "not an IP literal"},
		{"10.0.0.1\n", "not an IP literal"},
		{"010.0.0.1", "not an IP literal"},
		{"10.0.0.1;", "not an IP literal"},
		{"fe80::1%lo", "has an IPv6 zone"},
		{"fe80::1%x\n@1 set server local_app/app addr 127.0.0.9 port 9", "has an IPv6 zone"},
		{"fe80::1%x;@1 reload", "has an IPv6 zone"},
		{"fe80::1%a b", "has an IPv6 zone"},
		{"fe80::1%lo]:80\nprogram", "has an IPv6 zone"},
		{"::ffff:1.2.3.4", "IPv4-mapped"},
		{"::FFFF:1.2.3.4", "IPv4-mapped"},
		{"FD00::7", "not in canonical form (want fd00::7)"},
		{"fd00:0:0:0:0:0:0:7", "not in canonical form (want fd00::7)"},
		{"fd00::0007", "not in canonical form (want fd00::7)"},
		{"1.2.3.4:80", "not an IP literal"},
		{"[::1]", "not an IP literal"},
		{"１.2.3.4", "not an IP literal"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			a, err := Addr("address", tt.in)
			if tt.reason == "" {
				if err != nil || a.String() != tt.in {
					t.Fatalf("Addr(%q) = %v, %v; want it accepted as is", tt.in, a, err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Addr(%q) accepted, want %q", tt.in, tt.reason)
			}
			if !errors.Is(err, ErrInvalid) || FieldOf(err) != "address" || !strings.Contains(err.Error(), tt.reason) {
				t.Fatalf("Addr(%q) error %q (field %q), want ErrInvalid naming address and %q", tt.in, err, FieldOf(err), tt.reason)
			}
			if strings.ContainsAny(err.Error(), "\n\r") {
				t.Fatalf("error %q spans lines", err)
			}
		})
	}
}

func TestAddrPort(t *testing.T) {
	for in, ok := range map[string]bool{
		"127.0.0.1:21999": true, "[::1]:80": true,
		"127.0.0.1:0": false, "[fe80::1%lo]:80": false, "[::ffff:1.2.3.4]:80": false,
		"127.0.0.1:080": false, "127.0.0.1": false, "[FD00::1]:80": false,
	} {
		_, err := AddrPort("spoe agent", in)
		if (err == nil) != ok {
			t.Errorf("AddrPort(%q) error %v, want ok=%v", in, err, ok)
		}
	}
}

func TestNamesAndNumbers(t *testing.T) {
	tests := []struct {
		name string
		f    func(string) error
		ok   []string
		bad  []string
	}{
		{"name", func(s string) error { _, err := Name("service", s); return err },
			[]string{"web", "api-v2", "a", "x.y_z", strings.Repeat("x", 63)},
			[]string{"", "a b", "a;b", "a\nb", "-x", "_x", "a/b", "a:b", "a{b}", "wéb", strings.Repeat("x", 64)}},
		{"datacenter", func(s string) error { _, err := Datacenter("datacenter", s); return err },
			[]string{"dc1", "eu-west_2", "DC2"},
			[]string{"", "dc.1", "dc 1", "dc\n1", strings.Repeat("d", 64)}},
		{"ident", func(s string) error { _, err := Ident("backend", s); return err },
			[]string{"up_web", "qup_q_dc2", "s12", "a:b", strings.Repeat("x", 160)},
			[]string{"", "up web", "up/web", "a#b", "a;b", "a\nb", "a\"b", strings.Repeat("x", 161)}},
		{"dns name", func(s string) error { _, err := DNSName("trust domain", s); return err },
			[]string{"t.consul", "11111111-2222-3333-4444-555555555555.consul", "web.default.dc1.internal.td.consul", strings.Repeat("a.", 126) + "b", strings.Repeat("l", 63) + ".consul"},
			[]string{"", "consul", "*", "*.consul", "!web.consul", "Web.consul", "web.consul [verify none]", "web.consul\n/etc/x.pem",
				"-a.consul", "a-.consul", "a..consul", "a.consul.", "a_b.consul", "a.b:80", strings.Repeat("a.", 127) + "b", strings.Repeat("l", 64) + ".consul", "consul." + strings.Repeat("l", 64)}},
		{"path", func(s string) error { _, err := Path("file", s); return err },
			[]string{"/tmp/x/leaf.pem", "/a+b/c-d_e.f"},
			[]string{"", "leaf.pem", "/a b", "/a;b", "/a\nb", "/a'b", "/" + strings.Repeat("x", 256)}},
	}
	for _, tt := range tests {
		for _, s := range tt.ok {
			if err := tt.f(s); err != nil {
				t.Errorf("%s %q refused: %v", tt.name, s, err)
			}
		}
		for _, s := range tt.bad {
			err := tt.f(s)
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("%s %q: error %v, want ErrInvalid", tt.name, s, err)
			}
		}
	}
	for p, ok := range map[int]bool{0: false, 1: true, 65535: true, 65536: false, 70000: false, -1: false} {
		if _, err := Port("port", p); (err == nil) != ok {
			t.Errorf("Port(%d) error %v, want ok=%v", p, err, ok)
		}
	}
	for w, ok := range map[int]bool{-1: false, 0: true, 256: true, 257: false} {
		if _, err := Weight("weight", w); (err == nil) != ok {
			t.Errorf("Weight(%d) error %v, want ok=%v", w, err, ok)
		}
	}
}

func TestInstanceID(t *testing.T) {
	for _, ok := range []string{"web-sidecar-proxy", "_nomad-task-8e8f0c4e-group-api-api-9001-sidecar-proxy", "a", "id:1.2", strings.Repeat("x", 128)} {
		if got, err := InstanceID("instance ID", ok); err != nil || got != ok {
			t.Errorf("InstanceID(%q) = %q, %v; want it accepted", ok, got, err)
		}
	}
	for _, bad := range []string{"", "a b", "a\nb", "a;b", "a@b", "a/b", "a#b", "wéb", strings.Repeat("x", 129)} {
		if _, err := InstanceID("instance ID", bad); !errors.Is(err, ErrInvalid) || FieldOf(err) != "instance ID" {
			t.Errorf("InstanceID(%q): %v, want ErrInvalid naming the field", bad, err)
		}
	}
}

func TestNewEndpoint(t *testing.T) {
	tests := []struct {
		name         string
		addr         string
		port, weight int
		field        string // "" for accepted
		wantWeight   int
	}{
		{"v4", "10.0.0.1", 21000, 3, "", 3},
		{"v6", "fd00::1", 1, 0, "", 1},
		{"clamped", "10.0.0.1", 21000, 1000, "", MaxWeight},
		{"zone", "fe80::1%x\n@1 set server local_app/app addr 127.0.0.9 port 9", 21000, 1, FieldAddress, 0},
		{"semicolon", "10.0.0.1;@1 reload", 21000, 1, FieldAddress, 0},
		{"space", "10.0.0.1 port 9", 21000, 1, FieldAddress, 0},
		{"unspecified", "0.0.0.0", 21000, 1, FieldAddress, 0},
		{"multicast", "ff02::1", 21000, 1, FieldAddress, 0},
		{"port 0", "10.0.0.1", 0, 1, FieldPort, 0},
		{"port 70000", "10.0.0.1", 70000, 1, FieldPort, 0},
		{"weight negative", "10.0.0.1", 1, -1, FieldWeight, 0},
		{"weight huge", "10.0.0.1", 1, 65536, FieldWeight, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, err := NewEndpoint("inst-1", tt.addr, tt.port, tt.weight)
			if tt.field != "" {
				if FieldOf(err) != tt.field || !errors.Is(err, ErrInvalid) {
					t.Fatalf("error %v (field %q), want one naming %s", err, FieldOf(err), tt.field)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if e.ID() != "inst-1" || e.Addr().String() != tt.addr || int(e.Port()) != tt.port || e.Weight() != tt.wantWeight {
				t.Fatalf("got %s %s %d %d", e.ID(), e.Addr(), e.Port(), e.Weight())
			}
		})
	}
}

// FuzzAddr: whatever Addr accepts is the canonical text of an address with
// no zone, made only of hex digits, dots and colons.
func FuzzAddr(f *testing.F) {
	for _, s := range []string{"127.0.0.1", "::1", "fe80::1%x\n@1 set server local_app/app addr 127.0.0.9 port 9",
		"fe80::1%lo]:80\nprogram pwn\n command /bin/true", "::ffff:1.2.3.4", "1.2.3.4;", "fe80::1%'\"\\", "fe80::1%é", "01.2.3.4"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, err := Addr("address", s)
		if err != nil {
			if !errors.Is(err, ErrInvalid) || strings.ContainsAny(err.Error(), "\n\r") {
				t.Fatalf("error %q", err)
			}
			return
		}
		if a.String() != s || a.Zone() != "" || strings.Trim(s, "0123456789abcdef.:") != "" {
			t.Fatalf("accepted %q (%s)", s, a)
		}
	})
}

// FuzzDNSName: a name DNSName accepts is lower-case labels of letters,
// digits and inner hyphens joined by single dots, so it can stand as a
// crt-list filter (no option, negation, wildcard or line break) and as a
// trust domain.
func FuzzDNSName(f *testing.F) {
	for _, s := range []string{"web.default.dc1.internal.td.consul", "*", "*.consul", "!web.consul",
		"web.consul [verify none]", "web.consul\n/etc/other.pem", "Web.consul", "wéb.consul", "a..b", "td.consul:8443", "a.b;c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if _, err := DNSName("name", s); err != nil {
			if !errors.Is(err, ErrInvalid) || strings.ContainsAny(err.Error(), "\n\r") {
				t.Fatalf("error %q", err)
			}
			return
		}
		labels := strings.Split(s, ".")
		if len(s) > 253 || len(labels) < 2 {
			t.Fatalf("accepted %q", s)
		}
		for _, l := range labels {
			if l == "" || len(l) > 63 || strings.Trim(l, "abcdefghijklmnopqrstuvwxyz0123456789-") != "" || l[0] == '-' || l[len(l)-1] == '-' {
				t.Fatalf("accepted %q (label %q)", s, l)
			}
		}
	})
}

func TestExposePath(t *testing.T) {
	for _, ok := range []string{"/", "/health", "/v1/status/ready", "/grpc.health.v1.Health/Check", "/a~b%20c", "/" + strings.Repeat("p", 254)} {
		if got, err := ExposePath("expose path", ok); err != nil || got != ok {
			t.Errorf("ExposePath(%q) = %q, %v; want it accepted", ok, got, err)
		}
	}
	for _, bad := range []string{"", "health", "/a b", "/a\nb", "/a#b", "/a}b", `/a"b`, `/a\b`, "/a'b", "/é", "/" + strings.Repeat("p", 255)} {
		if _, err := ExposePath("expose path", bad); !errors.Is(err, ErrInvalid) || FieldOf(err) != "expose path" {
			t.Errorf("ExposePath(%q): %v, want ErrInvalid naming the field", bad, err)
		}
	}
}

func TestSocketMode(t *testing.T) {
	for in, want := range map[string]string{"0600": "0600", "700": "0700", "0777": "0777"} {
		if got, err := SocketMode("socket mode", in); err != nil || got != want {
			t.Errorf("SocketMode(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "0800", "rw", "00600", "0600 x", "0600\nglobal", "-1"} {
		if _, err := SocketMode("socket mode", bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("SocketMode(%q) accepted", bad)
		}
	}
}
