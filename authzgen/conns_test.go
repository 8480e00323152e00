package authzgen

import (
	"fmt"
	"strings"
	"testing"
)

func TestParseConnKey(t *testing.T) {
	const sum = "6AEE2B18D72B2CF0D80AF2AFB6E5D3B907480671DF32F2F55BB89A023CD26D43"
	for _, tc := range []struct {
		key string
		src string // "" when refused
	}{
		{sum + "-127.0.0.1-48906", "127.0.0.1:48906"},
		{sum + "-::1-33708", "[::1]:33708"},
		{sum + "-::ffff:10.0.0.1-5", "10.0.0.1:5"},
		{sum + "-fe80::1%eth0-5", ""},
		{sum + "-127.0.0.1-0", ""},
		{sum + "-127.0.0.1-070", ""},
		{sum + "-127.0.0.1-65536", ""},
		{sum + "-127.0.0.1", ""},
		{strings.ToLower(sum) + "-127.0.0.1-5", ""},
		{sum[:62] + "-127.0.0.1-5", ""},
		{"ZZ" + sum[2:] + "-127.0.0.1-5", ""},
		{"", ""},
	} {
		c, err := ParseConnKey(tc.key)
		if tc.src == "" {
			if err == nil {
				t.Errorf("ParseConnKey(%q) = %+v, want an error", tc.key, c)
			}
			continue
		}
		if err != nil || c.Src.String() != tc.src || fmt.Sprintf("%X", c.Cert) != sum {
			t.Errorf("ParseConnKey(%q) = %v %X, %v; want %s", tc.key, c.Src, c.Cert, err, tc.src)
		}
	}
}
