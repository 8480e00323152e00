package l7

import (
	"encoding/json"
	"regexp"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
)

// mapDecide is what HAProxy's map_reg gives for a request of in's key: the
// first entry, in order, whose pattern matches the subject. PCRE's "(?!.)"
// (nothing follows) is Go's "$" without the m flag; every other construct
// Compile writes (literals, one-character classes, "[^:]*", '^') means the
// same to both. TestMapMatchesInHAProxy checks that against HAProxy.
func mapDecide(t testing.TB, c Compiled, method string, names []string, path string) (MapEntry, bool) {
	t.Helper()
	subject := Subject(c.Key, method, names, path)
	for _, e := range c.Entries {
		re, err := regexp.Compile(strings.ReplaceAll(e.Pattern, "(?!.)", "$"))
		if err != nil {
			t.Fatalf("entry %q: %v", e.Pattern, err)
		}
		if re.MatchString(subject) {
			return e, true
		}
	}
	return MapEntry{}, false
}

// agrees checks that the map's answer for one request, with headers
// named names, is the decision Decide makes, or a hand-over to the agent.
func agrees(t testing.TB, in *Intention, c Compiled, defaultAllow bool, method string, names []string, path string) (decided bool) {
	t.Helper()
	var kv []string
	for _, n := range names {
		kv = append(kv, n, "v")
	}
	h := hdrs(kv...)
	e, ok := mapDecide(t, c, method, names, path)
	if !ok {
		t.Fatalf("%s %q: no entry matches (the default entry must)", method, path)
	}
	f := strings.Split(e.Value, "/")
	if len(f) != 3 {
		t.Fatalf("value %q", e.Value)
	}
	if f[0] == ActionAgent {
		return false
	}
	p, matched := in.Decide(Request{Method: method, Path: path, Header: h})
	allow, label := defaultAllow, "default"
	if matched {
		allow, label = p.Allow, p.Label()
	}
	if got := f[0] == ActionAllow; got != allow || f[2] != label || f[1] != in.Source {
		t.Fatalf("%s %q: map says %q, Decide says allow=%v by %s of %s", method, path, e.Value, allow, label, in.Source)
	}
	return true
}

func TestCompile(t *testing.T) {
	deny, allow := api.IntentionActionDeny, api.IntentionActionAllow
	type req struct {
		method, path string
		want         string // the entry's value; "" when the agent decides
		names        []string
	}
	tests := []struct {
		name         string
		perms        []*api.IntentionPermission
		defaultAllow bool
		reqs         []req
	}{
		{"prefix then allow the rest", []*api.IntentionPermission{
			perm(deny, &api.IntentionHTTPPermission{PathPrefix: "/admin"}),
			perm(allow, &api.IntentionHTTPPermission{PathPrefix: "/"}),
		}, false, []req{
			{"GET", "/admin", "D/api/0:deny", nil},
			{"GET", "/admin/x", "D/api/0:deny", nil},
			{"GET", "/administrator", "D/api/0:deny", nil},
			{"GET", "/Admin", "A/api/1:allow", nil},
			{"GET", "/", "A/api/1:allow", nil},
			{"GET", "", "D/api/default", nil}, // no path ("OPTIONS *")
		}},
		{"exact and metacharacters", []*api.IntentionPermission{
			perm(allow, &api.IntentionHTTPPermission{PathExact: "/v1/a.b(c)+*"}),
		}, false, []req{
			{"GET", "/v1/a.b(c)+*", "A/api/0:allow", nil},
			{"GET", "/v1/aXb(c)+*", "D/api/default", nil},
			{"GET", "/v1/a.b(c)+*/", "D/api/default", nil},
			{"GET", "/v1/a.b(c)+*\n", "D/api/default", nil},
			{"GET", "/v1/a.bccc", "D/api/default", nil},
		}},
		{"methods", []*api.IntentionPermission{
			perm(deny, &api.IntentionHTTPPermission{PathPrefix: "/w", Methods: []string{"POST", "DELETE"}}),
			perm(allow, &api.IntentionHTTPPermission{Methods: []string{"GET"}}),
		}, true, []req{
			{"POST", "/w/1", "D/api/0:deny", nil},
			{"DELETE", "/w", "D/api/0:deny", nil},
			{"GET", "/w", "A/api/1:allow", nil},
			{"PUT", "/w", "A/api/default", nil},
			{"POSTX", "/w", "A/api/default", nil},
			{"post", "/w", "A/api/default", nil},
		}},
		{"one header present", []*api.IntentionPermission{
			perm(deny, &api.IntentionHTTPPermission{PathPrefix: "/admin"}),
			perm(deny, &api.IntentionHTTPPermission{Header: []api.IntentionHTTPHeaderPermission{{Name: "X-Debug.1", Present: true}}}),
			perm(allow, &api.IntentionHTTPPermission{PathPrefix: "/"}),
		}, false, []req{
			{"GET", "/admin", "D/api/0:deny", []string{"x-debug.1"}},
			{"GET", "/", "D/api/1:deny", []string{"host", "x-debug.1", "accept"}},
			{"GET", "/", "D/api/1:deny", []string{"x-debug.1"}},
			{"GET", "/", "D/api/1:deny", []string{"x-debug.1", "x-debug.1"}},
			{"GET", "/", "A/api/2:allow", []string{"x-debug", "x-debug.10", "x-debugx1"}},
			{"GET", "/", "A/api/2:allow", nil},
			{"GET", "/:/x-debug.1/:", "A/api/2:allow", []string{"host"}},
		}},
		{"other header matches and regex go to the agent where they may match", []*api.IntentionPermission{
			perm(deny, &api.IntentionHTTPPermission{PathPrefix: "/h", Header: []api.IntentionHTTPHeaderPermission{{Name: "X-Debug", Exact: "1"}}}),
			perm(deny, &api.IntentionHTTPPermission{PathPrefix: "/i", Header: []api.IntentionHTTPHeaderPermission{{Name: "X-Debug", Present: true, Invert: true}}}),
			perm(deny, &api.IntentionHTTPPermission{PathPrefix: "/j", Header: []api.IntentionHTTPHeaderPermission{{Name: "A", Present: true}, {Name: "B", Present: true}}}),
			perm(allow, &api.IntentionHTTPPermission{PathRegex: "/r/[0-9]+"}),
			perm(deny, &api.IntentionHTTPPermission{PathPrefix: "/r"}),
		}, false, []req{
			{"GET", "/h", "", nil},
			{"GET", "/i", "", nil},
			{"GET", "/j", "", []string{"a"}},
			{"GET", "/x", "", nil}, // the regex permission may match any path
		}},
		{"a path the map cannot hold", []*api.IntentionPermission{
			perm(allow, &api.IntentionHTTPPermission{PathPrefix: "/a%20b", Methods: []string{"GET"}}),
			perm(deny, &api.IntentionHTTPPermission{PathPrefix: "/"}),
		}, false, []req{
			{"GET", "/a%20b", "", nil},
			{"GET", "/x", "", nil},
			{"PUT", "/a%20b", "D/api/1:deny", nil},
		}},
		{"a method the map cannot hold", []*api.IntentionPermission{
			perm(deny, &api.IntentionHTTPPermission{PathPrefix: "/x"}),
			perm(allow, &api.IntentionHTTPPermission{Methods: []string{"get"}}),
			perm(deny, &api.IntentionHTTPPermission{PathPrefix: "/"}),
		}, false, []req{
			{"GET", "/x", "D/api/0:deny", nil},
			{"GET", "/y", "", nil},
			{"get", "/y", "", nil},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in, err := Parse("api", tc.perms)
			if err != nil {
				t.Fatal(err)
			}
			c := in.Compile(tc.defaultAllow)
			if len(c.Key) != KeyLen {
				t.Fatalf("key %q", c.Key)
			}
			for _, r := range tc.reqs {
				e, ok := mapDecide(t, c, r.method, r.names, r.path)
				got := e.Value
				if ok && strings.HasPrefix(got, ActionAgent+"/") {
					got = ""
				}
				if !ok || got != r.want {
					t.Errorf("%s %q: entry %q (matched %v), want %q\nentries: %v", r.method, r.path, e.Value, ok, r.want, c.Entries)
				}
				agrees(t, in, c, tc.defaultAllow, r.method, r.names, r.path)
			}
		})
	}
}

func TestCompileKey(t *testing.T) {
	a := []*api.IntentionPermission{perm(api.IntentionActionDeny, &api.IntentionHTTPPermission{PathPrefix: "/admin"})}
	b := []*api.IntentionPermission{perm(api.IntentionActionDeny, &api.IntentionHTTPPermission{PathExact: "/admin"})}
	key := func(src string, ps []*api.IntentionPermission, def bool) string {
		in, err := Parse(src, ps)
		if err != nil {
			t.Fatal(err)
		}
		return in.Compile(def).Key
	}
	if k1, k2 := key("api", a, false), key("api", a, false); k1 != k2 {
		t.Error("equal intentions, different keys")
	}
	for name, other := range map[string]string{
		"another path match": key("api", b, false),
		"another default":    key("api", a, true),
		"another source":     key("web", a, false),
	} {
		if other == key("api", a, false) {
			t.Errorf("%s: same key", name)
		}
	}
}

// FuzzCompile: for any permissions Parse accepts and any request, the
// entries Compile writes are words of the runtime API's L7 grammar, and
// the map either decides the request as Decide does or hands it to the
// agent.
func FuzzCompile(f *testing.F) {
	f.Add(`[{"Action":"deny","HTTP":{"PathPrefix":"/admin"}},{"Action":"allow"}]`, "GET", "/admin/x", "x-debug", false)
	f.Add(`[{"Action":"allow","HTTP":{"PathExact":"/a.b(c)+*","Methods":["GET","HEAD"]}}]`, "HEAD", "/a.b(c)+*", "x-debug", true)
	f.Add(`[{"Action":"allow","HTTP":{"PathExact":"/a"}}]`, "GET", "/a\n", "x-debug", false)
	f.Add(`[{"Action":"deny","HTTP":{"PathPrefix":"/a;b#c'd\"e$f|g&h%i"}},{"Action":"allow"}]`, "GET", "/a;b#c'd\"e$f|g&h%i", "x-debug", false)
	f.Add(`[{"Action":"deny","HTTP":{"PathPrefix":"/x","Methods":["GET|POST"]}}]`, "GET|POST", "/x", "x-debug", true)
	f.Add(`[{"Action":"deny","HTTP":{"PathPrefix":"/x","Header":[{"Name":"A","Exact":"b"}]}}]`, "GET", "/x", "x-debug", true)
	f.Add(`[{"Action":"allow","HTTP":{"PathRegex":"/a(b|c)*"}}]`, "GET", "/abc", "x-debug", false)
	f.Add(`[{"Action":"deny","HTTP":{"PathPrefix":"/[^:]*"}}]`, "GET", "/[^:]*", "x-debug", false)
	f.Add(`[{"Action":"deny","HTTP":{"PathPrefix":"/a:GET:/b"}}]`, "GET", "/a:GET:/b", "x-debug", false)
	f.Add(`[{"Action":"deny","HTTP":{"Header":[{"Name":"X-Debug","Present":true}]}},{"Action":"allow"}]`, "GET", "/", "X-Debug", false)
	f.Add(`[{"Action":"deny","HTTP":{"Header":[{"Name":"X-Debug","Present":true}]}},{"Action":"allow"}]`, "GET", "/", "x-debug/x", false)
	f.Add(`[{"Action":"deny","HTTP":{"Header":[{"Name":"a.b","Present":true}]}},{"Action":"allow"}]`, "GET", "/", "axb", true)
	l7Pattern := regexp.MustCompile(`^\^[0-9a-f]{16}:[A-Za-z0-9/._~!()*+,=:@\[\]^?-]*$`)
	l7Value := regexp.MustCompile(`^[ADS]/([A-Za-z0-9_.-]{1,128}|\*|-)/[a-z0-9:-]{1,32}$`)
	f.Fuzz(func(t *testing.T, perms, method, path, name string, defaultAllow bool) {
		var ps []*api.IntentionPermission
		if json.Unmarshal([]byte(perms), &ps) != nil {
			return
		}
		in, err := Parse("api", ps)
		if err != nil {
			return
		}
		c := in.Compile(defaultAllow)
		for _, e := range c.Entries {
			if !l7Pattern.MatchString(e.Pattern) || !l7Value.MatchString(e.Value) || len(e.Pattern) > 1500 {
				t.Fatalf("entry %q %q is outside the runtime grammar", e.Pattern, e.Value)
			}
			if !strings.HasPrefix(e.Pattern, "^"+c.Key+":") {
				t.Fatalf("entry %q is not anchored on key %s", e.Pattern, c.Key)
			}
		}
		if !isToken(method) {
			return // HAProxy's parser refuses such a method
		}
		var names []string
		if name = strings.ToLower(name); isToken(name) {
			names = []string{"host", name}
		}
		agrees(t, in, c, defaultAllow, method, names, path)
	})
}
