package spoa

import (
	"bytes"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/authzgen"
	"github.com/haproxy-connect/haproxy-connect/spoa/internal/spopwire"
)

// hdrsBin encodes name/value pairs as HAProxy's req.hdrs_bin.
func hdrsBin(kv ...string) []byte {
	var b []byte
	for _, s := range append(kv, "", "") {
		b = putString(b, s)
	}
	return b
}

// l7Message encodes a NOTIFY payload holding one authorize_l7 message.
func l7Message(source, method, path string, hdrs []byte) []byte {
	b := putString(nil, authzgen.MessageL7)
	b = append(b, 4)
	b = putTypedString(putString(b, authzgen.ArgSource), source)
	b = putTypedString(putString(b, authzgen.ArgMethod), method)
	b = putTypedString(putString(b, authzgen.ArgPath), path)
	b = putString(append(putString(b, authzgen.ArgHeaders), typeBinary), string(hdrs))
	return b
}

func newRules(t *testing.T, defaultAllow bool, sources ...*api.SourceIntention) *IntentionEntries {
	t.Helper()
	r := NewIntentionEntries("web")
	if errs := r.Set([]*api.ServiceIntentionsConfigEntry{{Kind: api.ServiceIntentions, Name: "web", Sources: sources}}); len(errs) != 0 {
		t.Fatal(errs)
	}
	r.defaultAllow.Store(defaultAllow)
	return r
}

func TestHandleL7Message(t *testing.T) {
	issue := &api.SourceIntention{Name: "client", Permissions: []*api.IntentionPermission{
		{Action: api.IntentionActionDeny, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/admin"}},
		{Action: api.IntentionActionDeny, HTTP: &api.IntentionHTTPPermission{Header: []api.IntentionHTTPHeaderPermission{{Name: "X-Debug", Present: true}}}},
		{Action: api.IntentionActionAllow, HTTP: &api.IntentionHTTPPermission{Methods: []string{"GET"}}},
	}}
	tests := []struct {
		name, source, method, path string
		hdrs                       []byte
		defaultAllow               bool
		want                       []setVar // nil: no verdict
	}{
		{"path denied", clientID, "GET", "/admin/x", hdrsBin(), false, l7Actions(false, "client", "0:deny")},
		{"header denied", clientID, "GET", "/", hdrsBin("host", "a", "x-debug", "1"), false, l7Actions(false, "client", "1:deny")},
		{"allowed", clientID, "GET", "/", hdrsBin("host", "a"), false, l7Actions(true, "client", "2:allow")},
		{"no match, default deny", clientID, "POST", "/", hdrsBin(), false, l7Actions(false, "client", permDefault)},
		{"no match, default allow", clientID, "POST", "/", hdrsBin(), true, l7Actions(true, "client", permDefault)},
		{"not a service id", "spiffe://x/agent/client/dc/dc1/id/a", "GET", "/", hdrsBin(), true, l7Actions(false, "-", permRefused)},
		{"other namespace", "spiffe://" + testTD + "/ns/other/dc/dc1/svc/client", "GET", "/", hdrsBin(), true, l7Actions(false, "-", permRefused)},
		{"source no longer L7", "spiffe://" + testTD + "/ns/default/dc/dc1/svc/batch", "GET", "/", hdrsBin(), true, nil},
		{"truncated headers", clientID, "GET", "/", hdrsBin("host")[:3], true, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newTest(t, &fakeDecider{}, WithL7Rules(newRules(t, tt.defaultAllow, issue)))
			got := a.handle(l7Message(tt.source, tt.method, tt.path, tt.hdrs))
			if want := appendTxnActions(nil, tt.want); !bytes.Equal(got, want) {
				t.Fatalf("ack actions %q, want %q", got, want)
			}
		})
	}
}

func TestParseHdrsBin(t *testing.T) {
	h, err := parseHdrsBin(hdrsBin("Host", "a", "x-env", "1", "x-env", "2"))
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := h("x-env"); !ok || strings.Join(v, ",") != "1,2" {
		t.Fatalf("x-env = %v %v", v, ok)
	}
	if v, ok := h("host"); !ok || v[0] != "a" {
		t.Fatalf("host = %v %v", v, ok)
	}
	if _, ok := h("absent"); ok {
		t.Fatal("absent header present")
	}
	var many []string
	for range maxRequestHeaders + 1 {
		many = append(many, "x", "y")
	}
	for name, b := range map[string][]byte{
		"truncated":   hdrsBin("host", "a")[:4],
		"no end":      putString(putString(nil, "host"), "a"),
		"length lies": spopwire.PutVarint(nil, 1000),
		"too many":    hdrsBin(many...),
	} {
		if _, err := parseHdrsBin(b); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestL7Connection(t *testing.T) {
	rules := newRules(t, false,
		&api.SourceIntention{Name: "client", Permissions: []*api.IntentionPermission{{Action: api.IntentionActionAllow}}},
		&api.SourceIntention{Name: "batch", Action: api.IntentionActionDeny})
	batchID := "spiffe://" + testTD + "/ns/default/dc/dc1/svc/batch"
	tests := []struct {
		name           string
		d              decision
		http           bool
		wantAllow, wL7 bool
	}{
		{"L7 source on http", decision{source: clientID}, true, true, true},
		{"L7 source on tcp stays denied", decision{source: clientID}, false, false, false},
		{"L4 deny stays", decision{source: batchID}, true, false, false},
		{"allow untouched", decision{source: batchID, allowed: true}, true, true, false},
		{"undecided untouched", decision{source: clientID, undecided: true}, true, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newTest(t, &fakeDecider{}, WithL7Rules(rules))
			d := tt.d
			a.l7Connection(&d, tt.http)
			if d.allowed != tt.wantAllow || d.l7 != tt.wL7 {
				t.Fatalf("allowed %v l7 %v, want %v %v", d.allowed, d.l7, tt.wantAllow, tt.wL7)
			}
		})
	}
}

func TestDefaultFromDebugConfig(t *testing.T) {
	tests := []struct {
		name  string
		dc    map[string]any
		allow bool
		err   bool
	}{
		{"policy allow", map[string]any{"DefaultIntentionPolicy": "allow", "ACLsEnabled": true}, true, false},
		{"policy deny", map[string]any{"DefaultIntentionPolicy": "deny", "ACLsEnabled": false}, false, false},
		{"policy hostile", map[string]any{"DefaultIntentionPolicy": "maybe"}, false, true},
		{"ACLs off", map[string]any{"DefaultIntentionPolicy": "", "ACLsEnabled": false}, true, false},
		{"ACL default deny", map[string]any{"ACLsEnabled": true, "ACLResolverSettings": map[string]any{"ACLDefaultPolicy": "deny"}}, false, false},
		{"ACL default allow", map[string]any{"ACLsEnabled": true, "ACLResolverSettings": map[string]any{"ACLDefaultPolicy": "allow"}}, true, false},
		{"ACL default missing", map[string]any{"ACLsEnabled": true}, false, true},
		{"nothing", nil, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			allow, err := defaultFromDebugConfig(tt.dc)
			if allow != tt.allow || (err != nil) != tt.err {
				t.Fatalf("= %v, %v; want %v, error %v", allow, err, tt.allow, tt.err)
			}
		})
	}
}
