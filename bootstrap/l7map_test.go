package bootstrap

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/l7"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// TestL7MapInHAProxy runs the public listener's L7 map lines, as Render
// writes them, in a real HAProxy, with entries added and removed through
// the runtime API as the controller sends them, and checks that for every
// request HAProxy's answer (the first entry matching) is the one Compile
// means: the entry the Go model of the map picks, which FuzzCompile
// checks against l7's Decide. So PCRE reads the patterns as the model
// does, the subject is built as Compile expects, and "add map" keeps the
// order.
func TestL7MapInHAProxy(t *testing.T) {
	deny, allow := api.IntentionActionDeny, api.IntentionActionAllow
	intentions := map[string][]*api.IntentionPermission{
		"api": {
			{Action: deny, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/admin"}},
			{Action: allow, HTTP: &api.IntentionHTTPPermission{PathExact: "/v1/a.b(c)+*", Methods: []string{"GET", "HEAD"}}},
			{Action: deny, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/v1/a"}},
			{Action: allow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/h", Header: []api.IntentionHTTPHeaderPermission{{Name: "X-A", Present: true}}}},
			{Action: allow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/"}},
		},
		"web": {
			{Action: allow, HTTP: &api.IntentionHTTPPermission{Methods: []string{"GET"}}},
			{Action: allow, HTTP: &api.IntentionHTTPPermission{PathRegex: "/r/[0-9]+"}},
		},
		"*": {
			{Action: deny, HTTP: &api.IntentionHTTPPermission{PathExact: "/x:GET:/y", Methods: []string{"DELETE"}}},
		},
	}
	var compiled []l7.Compiled
	for src, ps := range intentions {
		in, err := l7.Parse(src, ps)
		if err != nil {
			t.Fatal(err)
		}
		compiled = append(compiled, in.Compile(src == "web"))
	}

	spec := baseSpec()
	spec.Public.Protocol = "http"
	cfg, err := Render(spec)
	if err != nil {
		t.Fatal(err)
	}
	// The lines that build the subject and look it up, as rendered.
	var lines []string
	for _, l := range strings.Split(cfg, "\n") {
		if strings.Contains(l, "set-var(txn.hc.method)") || strings.Contains(l, "set-var(txn.hc.path)") ||
			strings.Contains(l, "set-var(txn.hc.names)") || strings.Contains(l, "set-var(txn.hc.l7rule)") {
			lines = append(lines, l)
		}
	}
	if len(lines) != 4 {
		t.Fatalf("rendered L7 map lines: %q", lines)
	}
	dir := testenv.ShortTempDir(t)
	mapFile := dir + "/l7.map"
	testenv.WriteFile(t, dir, "l7.map", "")
	port := testenv.FreePort(t)
	h := testenv.HAProxy(t, fmt.Sprintf(`global
    log stdout format raw local0 info
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend f
    bind 127.0.0.1:%d
    http-request set-var(sess.hc.l7) bool(1)
    http-request set-var(sess.hc.l7rules) req.hdr(x-key)
%s
    http-request return status 200 hdr x-rule "%%[var(txn.hc.l7rule)]"
`, port, strings.ReplaceAll(strings.Join(lines, "\n"), goldenState+"/l7.map", mapFile)))
	rt := runtime.New(h.MasterSock, zap.NewNop())
	exec := func(cmds ...runtime.Command) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		rs, err := rt.Exec(ctx, cmds...)
		if err == nil {
			err = rs.Err()
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range compiled {
		var cmds []runtime.Command
		for _, e := range c.Entries {
			cmd, err := runtime.AddL7Entry(mapFile, e.Pattern, e.Value)
			if err != nil {
				t.Fatalf("entry %q %q: %v", e.Pattern, e.Value, err)
			}
			cmds = append(cmds, cmd)
		}
		exec(cmds...)
	}

	ask := func(key, method, target string, extra []string) string {
		t.Helper()
		conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		var hdrs strings.Builder
		for _, h := range extra {
			fmt.Fprintf(&hdrs, "%s: 1\r\n", h)
		}
		fmt.Fprintf(conn, "%s %s HTTP/1.1\r\nHost: x\r\nX-Key: %s\r\n%sConnection: close\r\n\r\n", method, target, key, hdrs.String())
		// The answer is a header (a HEAD response has no body), left out
		// when empty.
		r := bufio.NewReader(conn)
		if l, _ := r.ReadString('\n'); !strings.HasPrefix(l, "HTTP/1.1 200") {
			t.Fatalf("%s %s: %q", method, target, l)
		}
		for {
			l, err := r.ReadString('\n')
			if v, ok := strings.CutPrefix(l, "x-rule: "); ok {
				if v = strings.TrimSpace(v); v == "-" {
					v = "" // log-format's empty sample
				}
				return v
			}
			if l == "\r\n" {
				return ""
			}
			if err != nil {
				t.Fatalf("%s %s: %v", method, target, err)
			}
		}
	}
	requests := []struct {
		method, target, path string
		hdrs                 []string
	}{
		{"GET", "/", "/", nil},
		{"GET", "/admin", "/admin", nil},
		{"POST", "/administrator?x=1", "/administrator", nil},
		{"GET", "/v1/a.b(c)+*", "/v1/a.b(c)+*", nil},
		{"HEAD", "/v1/a.b(c)+*", "/v1/a.b(c)+*", nil},
		{"GET", "/v1/a.b(c)+*?q", "/v1/a.b(c)+*", nil},
		{"GET", "/v1/a.b(c)+*x", "/v1/a.b(c)+*x", nil},
		{"GET", "/v1/aXb(c)+*", "/v1/aXb(c)+*", nil},
		{"GET", "/v1/a.bcc", "/v1/a.bcc", nil},
		{"PUT", "/v1/a.b(c)+*", "/v1/a.b(c)+*", nil},
		{"GET", "/h/1", "/h/1", nil},
		{"GET", "/r/12", "/r/12", nil},
		{"POST", "/r/12", "/r/12", nil},
		{"DELETE", "/x:GET:/y", "/x:GET:/y", nil},
		{"DELETE", "/x:GET:/yz", "/x:GET:/yz", nil},
		{"GET", "/x:GET:/y", "/x:GET:/y", nil},
		{"GET", "/%2e%2e/admin", "/%2e%2e/admin", nil},
		{"GET", "http://x/admin/1", "/admin/1", nil},
		{"OPTIONS", "*", "", nil},
		{"M-SEARCH", "/admin", "/admin", nil},
		{"GET", "/h/1", "/h/1", []string{"X-A"}},
		{"GET", "/h/1", "/h/1", []string{"x-a", "X-A", "X-B"}},
		{"GET", "/h/1", "/h/1", []string{"X-AB", "X-"}},
		{"GET", "/x", "/x", []string{"X-Debug"}},
	}
	for _, c := range compiled {
		for _, r := range requests {
			want := ""
			// HAProxy's header names, lower case, in order.
			names := []string{"host", "x-key"}
			for _, h := range r.hdrs {
				names = append(names, strings.ToLower(h))
			}
			names = append(names, "connection")
			if e, ok := modelMatch(t, c, r.method, names, r.path); ok {
				want = e.Value
			}
			if got := ask(c.Key, r.method, r.target, r.hdrs); got != want {
				t.Errorf("key %s: %s %s: HAProxy says %q, the model %q", c.Key, r.method, r.target, got, want)
			}
		}
	}

	// Removed last entry first, an intention's entries leave a prefix of
	// themselves at every step; removed, its requests match nothing.
	gone := compiled[0]
	for i := len(gone.Entries) - 1; i >= 0; i-- {
		cmd, err := runtime.DelL7Entry(mapFile, gone.Entries[i].Pattern)
		if err != nil {
			t.Fatal(err)
		}
		exec(cmd)
	}
	for _, r := range requests {
		if got := ask(gone.Key, r.method, r.target, r.hdrs); got != "" {
			t.Errorf("removed key %s: %s %s: HAProxy says %q", gone.Key, r.method, r.target, got)
		}
	}
	if got, want := ask(compiled[1].Key, "GET", "/admin", nil), func() string {
		e, _ := modelMatch(t, compiled[1], "GET", []string{"host", "x-key", "connection"}, "/admin")
		return e.Value
	}(); got != want {
		t.Errorf("after another key's removal: %q, want %q", got, want)
	}
}

// modelMatch is the first entry of c whose pattern matches the request's
// subject, read as Go regexps ("(?!.)", nothing follows, is Go's "$").
func modelMatch(t *testing.T, c l7.Compiled, method string, names []string, path string) (l7.MapEntry, bool) {
	t.Helper()
	subject := l7.Subject(c.Key, method, names, path)
	for _, e := range c.Entries {
		re, err := regexp.Compile(strings.ReplaceAll(e.Pattern, "(?!.)", "$"))
		if err != nil {
			t.Fatal(err)
		}
		if re.MatchString(subject) {
			return e, true
		}
	}
	return l7.MapEntry{}, false
}
