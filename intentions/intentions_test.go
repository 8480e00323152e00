package intentions

import (
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
)

func ixn(id, srcNS, src, dstNS, dst string, action api.IntentionAction) *api.Intention {
	return &api.Intention{ID: id, SourceNS: srcNS, SourceName: src, DestinationNS: dstNS, DestinationName: dst, Action: action}
}

var api_ = Peer{Partition: "default", Namespace: "default", Service: "api"}

func TestDecide(t *testing.T) {
	allow, deny := api.IntentionActionAllow, api.IntentionActionDeny
	l7 := &api.Intention{ID: "l7", SourceNS: "default", SourceName: "l7src", DestinationNS: "default", DestinationName: "api",
		Permissions: []*api.IntentionPermission{{Action: allow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/"}}}}
	set := []*api.Intention{
		ixn("star-star", "*", "*", "*", "*", allow),                 // precedence 1
		ixn("web-api", "default", "web", "default", "api", allow),   // 9
		ixn("db-api", "default", "db", "default", "api", deny),      // 9
		ixn("any-api", "default", "*", "default", "api", deny),      // 8
		ixn("batch-any", "default", "batch", "default", "*", allow), // 6: below any-api
		ixn("odd-action", "default", "odd", "default", "api", "maybe"),
		ixn("other-ns", "team", "web", "default", "api", allow),
		{ID: "peer", SourcePeer: "p1", SourceNS: "default", SourceName: "web", DestinationNS: "default", DestinationName: "api", Action: deny},
		{ID: "ap", SourcePartition: "other", SourceNS: "default", SourceName: "web", DestinationNS: "default", DestinationName: "api", Action: deny},
		l7,
	}
	for _, tc := range []struct {
		name   string
		served []*api.Intention
		def    Default
		src    Peer
		want   Verdict
		id     string // "" for the default
	}{
		{"exact allow", set, Default{}, Peer{"", "default", "web"}, Allow, "web-api"},
		{"exact deny", set, Default{Allow: true}, Peer{"default", "default", "db"}, Deny, "db-api"},
		{"wildcard source over wildcard destination", set, Default{Allow: true}, Peer{"", "default", "batch"}, Deny, "any-api"},
		{"unknown action denies", set, Default{Allow: true}, Peer{"", "default", "odd"}, Deny, "odd-action"},
		{"L7 intention", set, Default{Allow: true}, Peer{"", "default", "l7src"}, L7, "l7"},
		{"other namespace falls to */*", set[:1], Default{}, Peer{"", "team", "x"}, Allow, "star-star"},
		{"namespace exact", set, Default{}, Peer{"", "team", "web"}, Allow, "other-ns"},
		{"other partition matches only its own", set[8:9], Default{Allow: true}, Peer{"other", "default", "web"}, Deny, "ap"},
		{"default partition ignores other partition", set[8:9], Default{Allow: true}, Peer{"", "default", "web"}, Allow, ""},
		{"peer intention never matches a local source", set[7:8], Default{}, Peer{"", "default", "web"}, Deny, ""},
		{"no match default allow", nil, Default{Allow: true}, Peer{"", "default", "x"}, Allow, ""},
		{"no match default deny", nil, Default{}, Peer{"", "default", "x"}, Deny, ""},
		{"wildcard destination only", []*api.Intention{ixn("b", "default", "batch", "default", "*", allow)}, Default{}, Peer{"", "default", "batch"}, Allow, "b"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, skipped := New(api_, tc.served, tc.def)
			if len(skipped) != 0 {
				t.Fatalf("skipped: %v", skipped)
			}
			d := s.Decide(tc.src)
			id := ""
			if d.Intention != nil {
				id = d.Intention.ID
			}
			if d.Verdict != tc.want || id != tc.id {
				t.Fatalf("Decide(%+v) = %v by %q (%s), want %v by %q", tc.src, d.Verdict, id, d.Reason, tc.want, tc.id)
			}
			if d.Allowed() != (tc.want == Allow) {
				t.Fatalf("Allowed() = %v for %v", d.Allowed(), d.Verdict)
			}
		})
	}
}

// TestOrder: precedence as Consul computes it, whatever the answer's
// order or Precedence field, ties broken by the source names.
func TestOrder(t *testing.T) {
	in := []*api.Intention{
		ixn("1", "*", "*", "*", "*", "allow"), ixn("9b", "default", "web", "default", "api", "allow"),
		ixn("6", "default", "batch", "default", "*", "allow"), ixn("8", "default", "*", "default", "api", "allow"),
		ixn("9a", "default", "db", "default", "api", "allow"), ixn("7", "*", "*", "default", "api", "allow"),
		ixn("3", "default", "x", "*", "*", "allow"), ixn("5", "default", "*", "default", "*", "allow"),
	}
	in[0].Precedence = 100 // hostile: ignored
	s, _ := New(api_, in, Default{})
	var got []string
	for _, x := range s.list {
		got = append(got, x.ID)
	}
	if want := "9a 9b 8 7 6 5 3 1"; strings.Join(got, " ") != want {
		t.Fatalf("order %q, want %q", strings.Join(got, " "), want)
	}
}

func TestSkipped(t *testing.T) {
	s, skipped := New(api_, []*api.Intention{
		nil,
		ixn("other-dest", "default", "web", "default", "billing", "allow"),
		ixn("bad-name", "default", "web\n@1 reload", "default", "api", "allow"),
		ixn("bad-ns", "default;x", "web", "default", "api", "allow"),
		ixn("ok", "default", "web", "default", "api", "deny"),
	}, Default{Allow: true})
	if len(skipped) != 4 || s.Len() != 1 {
		t.Fatalf("kept %d, skipped %v", s.Len(), skipped)
	}
	if d := s.Decide(Peer{"", "default", "web"}); d.Verdict != Deny {
		t.Fatalf("got %v", d.Verdict)
	}
}

func TestDefaultOf(t *testing.T) {
	for _, tc := range []struct {
		c       AgentConfig
		allow   bool
		wantErr bool
	}{
		{AgentConfig{}, true, false},
		{AgentConfig{DefaultIntentionPolicy: "deny"}, false, false},
		{AgentConfig{DefaultIntentionPolicy: "allow", ACLsEnabled: true, ACLDefaultPolicy: "deny"}, true, false},
		{AgentConfig{ACLsEnabled: true, ACLDefaultPolicy: "deny"}, false, false},
		{AgentConfig{ACLsEnabled: true, ACLDefaultPolicy: "allow"}, true, false},
		{AgentConfig{ACLsEnabled: false, ACLDefaultPolicy: "deny"}, true, false},
		{AgentConfig{DefaultIntentionPolicy: "maybe"}, false, true},
		{AgentConfig{ACLsEnabled: true, ACLDefaultPolicy: ""}, false, true},
	} {
		d, err := DefaultOf(tc.c)
		if (err != nil) != tc.wantErr || (err == nil && d.Allow != tc.allow) {
			t.Errorf("DefaultOf(%+v) = %+v, %v", tc.c, d, err)
		}
	}
}

func TestEqual(t *testing.T) {
	a, _ := New(api_, []*api.Intention{ixn("x", "default", "web", "default", "api", "allow")}, Default{})
	b, _ := New(api_, []*api.Intention{ixn("x", "default", "web", "default", "api", "allow")}, Default{})
	c, _ := New(api_, []*api.Intention{ixn("x", "default", "web", "default", "api", "deny")}, Default{})
	d, _ := New(api_, []*api.Intention{ixn("x", "default", "web", "default", "api", "allow")}, Default{Allow: true})
	if !a.Equal(b) || a.Equal(c) || a.Equal(d) || a.Equal(nil) {
		t.Fatal("Equal wrong")
	}
}

// TestServedOrderIgnored: whatever order Consul serves the intentions in
// (and whatever Precedence it claims), every source gets the same
// decision, from the same intention.
func TestServedOrderIgnored(t *testing.T) {
	served := []*api.Intention{
		ixn("1", "*", "*", "*", "*", "deny"), ixn("2", "default", "web", "default", "api", "allow"),
		ixn("3", "default", "*", "default", "api", "deny"), ixn("4", "default", "batch", "default", "*", "allow"),
		ixn("5", "default", "web", "default", "*", "deny"), ixn("6", "*", "*", "default", "api", "allow"),
		ixn("7", "default", "*", "default", "*", "allow"), ixn("8", "default", "db", "*", "*", "allow"),
	}
	sources := []Peer{{"", "default", "web"}, {"", "default", "batch"}, {"", "default", "db"}, {"", "other", "x"}, {"", "default", "x"}}
	decide := func(in []*api.Intention) string {
		s, _ := New(api_, in, Default{Allow: true, Reason: "d"})
		var out []string
		for _, p := range sources {
			d := s.Decide(p)
			id := "default"
			if d.Intention != nil {
				id = d.Intention.ID
			}
			out = append(out, d.Verdict.String()+":"+id)
		}
		return strings.Join(out, " ")
	}
	want := decide(served)
	if want != "allow:2 deny:3 deny:3 allow:6 deny:3" {
		t.Fatalf("decisions %q", want)
	}
	r := []*api.Intention{}
	for i := len(served) - 1; i >= 0; i-- {
		c := *served[i]
		c.Precedence = i // lies
		r = append(r, &c)
	}
	for k := range len(r) {
		rot := append(append([]*api.Intention{}, r[k:]...), r[:k]...)
		if got := decide(rot); got != want {
			t.Errorf("rotation %d: %q, want %q", k, got, want)
		}
	}
}
