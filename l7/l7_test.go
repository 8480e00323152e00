package l7

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
)

func hdrs(kv ...string) func(string) ([]string, bool) {
	m := map[string][]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = append(m[kv[i]], kv[i+1])
	}
	return func(n string) ([]string, bool) { v, ok := m[n]; return v, ok }
}

func perm(action api.IntentionAction, h *api.IntentionHTTPPermission) *api.IntentionPermission {
	return &api.IntentionPermission{Action: action, HTTP: h}
}

func TestDecide(t *testing.T) {
	// The issue's intention: deny /admin, deny X-Debug present, allow the rest.
	issue := []*api.IntentionPermission{
		perm(api.IntentionActionDeny, &api.IntentionHTTPPermission{PathPrefix: "/admin"}),
		perm(api.IntentionActionDeny, &api.IntentionHTTPPermission{Header: []api.IntentionHTTPHeaderPermission{{Name: "X-Debug", Present: true}}}),
		perm(api.IntentionActionAllow, &api.IntentionHTTPPermission{PathPrefix: "/"}),
	}
	onlyGet := []*api.IntentionPermission{
		perm(api.IntentionActionAllow, &api.IntentionHTTPPermission{PathExact: "/x", Methods: []string{"GET", "HEAD"}}),
		perm(api.IntentionActionDeny, &api.IntentionHTTPPermission{PathRegex: "/api/v[0-9]+/.*"}),
	}
	headers := func(h api.IntentionHTTPHeaderPermission) []*api.IntentionPermission {
		return []*api.IntentionPermission{perm(api.IntentionActionAllow, &api.IntentionHTTPPermission{Header: []api.IntentionHTTPHeaderPermission{h}})}
	}
	tests := []struct {
		name    string
		perms   []*api.IntentionPermission
		req     Request
		matched bool
		allow   bool
		index   int
	}{
		{"admin denied", issue, Request{"GET", "/admin/x", hdrs()}, true, false, 0},
		{"admin exact denied", issue, Request{"GET", "/admin", hdrs()}, true, false, 0},
		{"prefix is bytes not segments", issue, Request{"GET", "/administrator", hdrs()}, true, false, 0},
		{"header denied", issue, Request{"GET", "/ok", hdrs("x-debug", "")}, true, false, 1},
		{"rest allowed", issue, Request{"GET", "/ok", hdrs("x-other", "1")}, true, true, 2},
		{"first match wins", issue, Request{"GET", "/admin", hdrs("x-debug", "1")}, true, false, 0},
		{"method allowed", onlyGet, Request{"HEAD", "/x", nil}, true, true, 0},
		{"method not listed falls through", onlyGet, Request{"POST", "/x", nil}, false, false, 0},
		{"exact path only", onlyGet, Request{"GET", "/x/", nil}, false, false, 0},
		{"regex whole path", onlyGet, Request{"GET", "/api/v2/users", nil}, true, false, 1},
		{"regex anchored", onlyGet, Request{"GET", "/x/api/v2/users", nil}, false, false, 0},
		{"exact header", headers(api.IntentionHTTPHeaderPermission{Name: "X-Env", Exact: "prod"}), Request{"GET", "/", hdrs("x-env", "prod")}, true, true, 0},
		{"exact header case", headers(api.IntentionHTTPHeaderPermission{Name: "X-Env", Exact: "prod"}), Request{"GET", "/", hdrs("x-env", "PROD")}, false, false, 0},
		{"exact header ignore case", headers(api.IntentionHTTPHeaderPermission{Name: "X-Env", Exact: "prod", IgnoreCase: true}), Request{"GET", "/", hdrs("x-env", "PROD")}, true, true, 0},
		{"repeated header joined", headers(api.IntentionHTTPHeaderPermission{Name: "X-Env", Exact: "a,b"}), Request{"GET", "/", hdrs("x-env", "a", "x-env", "b")}, true, true, 0},
		{"prefix header", headers(api.IntentionHTTPHeaderPermission{Name: "X-Env", Prefix: "pr"}), Request{"GET", "/", hdrs("x-env", "prod")}, true, true, 0},
		{"suffix header", headers(api.IntentionHTTPHeaderPermission{Name: "X-Env", Suffix: "od"}), Request{"GET", "/", hdrs("x-env", "prod")}, true, true, 0},
		{"contains header", headers(api.IntentionHTTPHeaderPermission{Name: "X-Env", Contains: "ro"}), Request{"GET", "/", hdrs("x-env", "prod")}, true, true, 0},
		{"regex header", headers(api.IntentionHTTPHeaderPermission{Name: "X-Env", Regex: "p.*d"}), Request{"GET", "/", hdrs("x-env", "prod")}, true, true, 0},
		{"inverted exact present", headers(api.IntentionHTTPHeaderPermission{Name: "X-Env", Exact: "prod", Invert: true}), Request{"GET", "/", hdrs("x-env", "dev")}, true, true, 0},
		{"inverted exact absent: no match (Envoy)", headers(api.IntentionHTTPHeaderPermission{Name: "X-Env", Exact: "prod", Invert: true}), Request{"GET", "/", hdrs()}, false, false, 0},
		{"inverted present absent matches", headers(api.IntentionHTTPHeaderPermission{Name: "X-Env", Present: true, Invert: true}), Request{"GET", "/", hdrs()}, true, true, 0},
		{"inverted present present: no match", headers(api.IntentionHTTPHeaderPermission{Name: "X-Env", Present: true, Invert: true}), Request{"GET", "/", hdrs("x-env", "")}, false, false, 0},
		{"nil HTTP matches all", []*api.IntentionPermission{perm(api.IntentionActionDeny, nil)}, Request{"PUT", "/anything", nil}, true, false, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in, err := Parse("web", tt.perms)
			if err != nil {
				t.Fatal(err)
			}
			p, matched := in.Decide(tt.req)
			if matched != tt.matched {
				t.Fatalf("matched = %v, want %v", matched, tt.matched)
			}
			if matched && (p.Allow != tt.allow || p.Index != tt.index) {
				t.Fatalf("got %s, want index %d allow %v", p.Label(), tt.index, tt.allow)
			}
		})
	}
}

func TestParseRefuses(t *testing.T) {
	long := "/" + strings.Repeat("a", MaxValue)
	tests := []struct {
		name   string
		source string
		p      *api.IntentionPermission
		want   string
	}{
		{"bad action", "web", &api.IntentionPermission{Action: "maybe"}, "action"},
		{"bad regex", "web", perm(api.IntentionActionDeny, &api.IntentionHTTPPermission{PathRegex: "(?<=x)"}), "PathRegex"},
		{"two paths", "web", perm(api.IntentionActionDeny, &api.IntentionHTTPPermission{PathExact: "/a", PathPrefix: "/b"}), "more than one"},
		{"relative path", "web", perm(api.IntentionActionDeny, &api.IntentionHTTPPermission{PathPrefix: "admin"}), "not a path"},
		{"newline in path", "web", perm(api.IntentionActionDeny, &api.IntentionHTTPPermission{PathPrefix: "/a\nb"}), "not a path"},
		{"long path", "web", perm(api.IntentionActionDeny, &api.IntentionHTTPPermission{PathExact: long}), "not a path"},
		{"bad method", "web", perm(api.IntentionActionDeny, &api.IntentionHTTPPermission{Methods: []string{"GET POST"}}), "method"},
		{"bad header name", "web", perm(api.IntentionActionDeny, &api.IntentionHTTPPermission{Header: []api.IntentionHTTPHeaderPermission{{Name: "x y", Present: true}}}), "header name"},
		{"no header match", "web", perm(api.IntentionActionDeny, &api.IntentionHTTPPermission{Header: []api.IntentionHTTPHeaderPermission{{Name: "x"}}}), "exactly one"},
		{"two header matches", "web", perm(api.IntentionActionDeny, &api.IntentionHTTPPermission{Header: []api.IntentionHTTPHeaderPermission{{Name: "x", Exact: "a", Prefix: "b"}}}), "exactly one"},
		{"control byte in value", "web", perm(api.IntentionActionDeny, &api.IntentionHTTPPermission{Header: []api.IntentionHTTPHeaderPermission{{Name: "x", Exact: "a\x00"}}}), "printable"},
		{"jwt", "web", &api.IntentionPermission{Action: api.IntentionActionAllow, JWT: &api.IntentionJWTRequirement{}}, "JWT"},
		{"bad source", "we b", perm(api.IntentionActionDeny, nil), "intention source"},
		{"null permission", "web", nil, "null"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse(tt.source, []*api.IntentionPermission{tt.p})
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want ErrInvalid mentioning %q", err, tt.want)
			}
		})
	}
	many := make([]*api.IntentionPermission, MaxPermissions+1)
	for i := range many {
		many[i] = perm(api.IntentionActionDeny, nil)
	}
	if _, err := Parse("web", many); !errors.Is(err, ErrInvalid) {
		t.Fatalf("%d permissions accepted", len(many))
	}
}

// FuzzParseDecide feeds arbitrary permissions (as Consul's JSON) and
// requests: Parse either refuses or returns an intention whose decisions
// never panic and name a permission of it.
func FuzzParseDecide(f *testing.F) {
	f.Add(`[{"Action":"deny","HTTP":{"PathPrefix":"/admin"}},{"Action":"allow"}]`, "GET", "/admin", "x-debug", "1")
	f.Add(`[{"Action":"deny","HTTP":{"Header":[{"Name":"X-Debug","Present":true,"Invert":true}]}}]`, "POST", "/", "x-debug", "")
	f.Add(`[{"Action":"allow","HTTP":{"PathRegex":"/a(b|c)*","Methods":["GET"]}}]`, "GET", "/abcb", "", "")
	f.Fuzz(func(t *testing.T, perms, method, path, hname, hval string) {
		var ps []*api.IntentionPermission
		if json.Unmarshal([]byte(perms), &ps) != nil {
			return
		}
		in, err := Parse("web", ps)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error without ErrInvalid: %v", err)
			}
			return
		}
		p, ok := in.Decide(Request{Method: method, Path: path, Header: hdrs(hname, hval)})
		if ok && (p.Index < 0 || p.Index >= len(in.Permissions)) {
			t.Fatalf("matched permission %d of %d", p.Index, len(in.Permissions))
		}
		in.HeaderNames()
	})
}
