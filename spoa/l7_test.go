package spoa

import (
	"bytes"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/authzgen"
	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/intentions"
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

// newRules are the L7 rules of the destination web's intentions, made of
// sources (as a service-intentions entry lists them) in the default
// tenancy.
func newRules(t *testing.T, defaultAllow bool, sources ...*api.SourceIntention) *setRules {
	t.Helper()
	var served []*api.Intention
	for _, src := range sources {
		served = append(served, &api.Intention{SourceNS: "default", SourceName: src.Name, DestinationNS: "default", DestinationName: "web",
			Action: src.Action, Permissions: src.Permissions})
	}
	set, skipped := intentions.New(destination("web"), served, intentions.Default{Allow: defaultAllow, Reason: "Default intention policy"})
	if len(skipped) != 0 {
		t.Fatal(skipped)
	}
	r, errs := newSetRules(set)
	if len(errs) != 0 {
		t.Fatal(errs)
	}
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
		{"same name, other namespace: not under the intention", "spiffe://" + testTD + "/ns/other/dc/dc1/svc/client", "GET", "/", hdrsBin(), false, l7Actions(false, "-", permL4)},
		{"source no longer L7: its L4 verdict", "spiffe://" + testTD + "/ns/default/dc/dc1/svc/batch", "GET", "/", hdrsBin(), true, l7Actions(true, "-", permL4)},
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

// TestSetRulesLookup: which intention governs a source's requests comes
// from the held Set, in Consul's precedence, with tenancy and peers.
func TestSetRulesLookup(t *testing.T) {
	l7perms := []*api.IntentionPermission{{Action: api.IntentionActionDeny, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/admin"}}}
	in := func(srcNS, src, dst string, action api.IntentionAction, perms []*api.IntentionPermission) *api.Intention {
		return &api.Intention{SourceNS: srcNS, SourceName: src, DestinationNS: "default", DestinationName: dst, Action: action, Permissions: perms}
	}
	served := []*api.Intention{
		in("default", "web", "api", "", l7perms),
		in("default", "batch", "api", api.IntentionActionAllow, nil),
		in("default", "bad", "api", "", []*api.IntentionPermission{{Action: api.IntentionActionDeny, HTTP: &api.IntentionHTTPPermission{PathRegex: "("}}}),
		{SourcePeer: "other", SourceNS: "default", SourceName: "peered", DestinationNS: "default", DestinationName: "api", Permissions: l7perms},
		in("default", "batch", "*", "", l7perms), // lower precedence than api<-batch (L4)
		in("default", "*", "*", "", l7perms),
	}
	set, skipped := intentions.New(intentions.Peer{Partition: "default", Namespace: "default", Service: "api"}, served, intentions.Default{})
	if len(skipped) != 0 {
		t.Fatal(skipped)
	}
	r, errs := newSetRules(set)
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "bad") {
		t.Fatalf("errors = %v, want one for source bad", errs)
	}
	tests := []struct {
		ns, source string
		l7, err    bool
	}{
		{"default", "web", true, false},
		{"default", "batch", false, false},  // L4 at higher precedence
		{"default", "bad", false, true},     // refused: denied, not let through to *
		{"default", "unknown", true, false}, // * -> * is L7
		{"default", "peered", true, false},  // the peer's source does not match locals; * -> * does
		{"other", "web", false, false},      // another namespace matches no intention here
	}
	for _, tt := range tests {
		t.Run(tt.ns+"/"+tt.source, func(t *testing.T) {
			l := r.Lookup(certs.ID{Partition: "default", Namespace: tt.ns, Datacenter: "dc1", Service: tt.source})
			if (l.Intention != nil) != tt.l7 || (l.Err != nil) != tt.err {
				t.Fatalf("Lookup = %+v, want l7 %v err %v", l, tt.l7, tt.err)
			}
		})
	}
}

// TestL7ConnectionFromTheDecidingIntentions: a local verdict made by an L7
// intention makes the connection L7 even when the intentions held have
// moved on since (here to an L4 allow): the rules are not asked again, so
// an intentions change under way cannot turn it into a plain deny (a 403).
func TestL7ConnectionFromTheDecidingIntentions(t *testing.T) {
	a := New("web", nil, nil)
	defer a.Close()
	set, _ := intentions.New(destination("web"), []*api.Intention{{SourceNS: "default", SourceName: "client",
		DestinationNS: "default", DestinationName: "web", Action: api.IntentionActionAllow}}, intentions.Default{})
	a.SetIntentions(set)
	for _, tt := range []struct {
		name      string
		d         decision
		allow, l7 bool
	}{
		{"decided by an L7 intention", decision{source: clientID, l7Intention: true}, true, true},
		{"decided by an L4 deny", decision{source: clientID}, false, false},
	} {
		d := tt.d
		a.l7Connection(&d, true)
		if d.allowed != tt.allow || d.l7 != tt.l7 {
			t.Errorf("%s: allowed %v l7 %v, want %v %v", tt.name, d.allowed, d.l7, tt.allow, tt.l7)
		}
	}
}
