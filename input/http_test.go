package input

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestHTTPValues(t *testing.T) {
	tests := []struct {
		name string
		f    func(string) (string, error)
		ok   []string
		bad  []string
	}{
		{"header name", func(s string) (string, error) { return HeaderName("h", s) },
			[]string{"x-user", "X_Y.z", "a"},
			[]string{"", "x user", "x\n", "x:y", "x),src(", "x'", strings.Repeat("a", 65)}},
		{"method", func(s string) (string, error) { return Method("m", s) },
			[]string{"GET", "PATCH"}, []string{"get", "", "GET ", "G\nE"}},
		{"url path", func(s string) (string, error) { return URLPath("p", s) },
			[]string{"/", "/admin", "/a/b?c=d&e=%20", "/~x:y@z"},
			[]string{"", "admin", "/a b", "/a'b", `/a"b`, `/a\b`, "/a\nb", "/\x7f", "/é", "/" + strings.Repeat("a", 1024)}},
		{"header value", func(s string) (string, error) { return HeaderValue("v", s) },
			[]string{"admin", "max-age=60, public", "a#b$c"},
			[]string{"", "a'b", `a"b`, `a\b`, "50%", "%[env(HOME)]", "a\nb", "a\rb", "a\tb", strings.Repeat("a", 257)}},
		{"regex", func(s string) (string, error) { return Regex("r", s) },
			[]string{"/v2/.*", `^/api/\d+$`, "a b"},
			[]string{"", "(", "a'b", `a"b`, "a\nb", strings.Repeat("a", 257)}},
		{"filter", func(s string) (string, error) { return Filter("f", s) },
			[]string{"", `Service.Meta.version == "2"`, "Service.Tags contains v1"},
			[]string{"a\nb", "a\x00", strings.Repeat("a", 513)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, s := range tt.ok {
				if got, err := tt.f(s); err != nil || got != s {
					t.Errorf("%q refused: %v", s, err)
				}
			}
			for _, s := range tt.bad {
				_, err := tt.f(s)
				if !errors.Is(err, ErrInvalid) {
					t.Errorf("%.40q accepted", s)
				} else if strings.ContainsAny(err.Error(), "\n\r") {
					t.Errorf("error %q spans lines", err)
				}
			}
		})
	}
}

func TestTimeoutAndCount(t *testing.T) {
	for _, tt := range []struct {
		d, want time.Duration
		ok      bool
	}{
		{0, 0, true}, {time.Millisecond, time.Millisecond, true}, {1500 * time.Microsecond, time.Millisecond, true},
		{time.Hour, time.Hour, true}, {time.Hour + 1, 0, false}, {-1, 0, false}, {time.Microsecond, 0, false},
	} {
		got, err := Timeout("t", tt.d, time.Hour)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("Timeout(%v) = %v, %v", tt.d, got, err)
		}
	}
	if _, err := Count("n", 26, 25); err == nil {
		t.Error("Count(26, 25) accepted")
	}
	if n, err := Count("n", 25, 25); err != nil || n != 25 {
		t.Errorf("Count(25, 25) = %v, %v", n, err)
	}
}
