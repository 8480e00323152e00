package spoa

import (
	"context"
	"testing"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap/zaptest"

	"github.com/haproxy-connect/haproxy-connect/intentions"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// conformanceEntries are the intentions of the conformance table, as
// service-intentions config entries (what Consul CE users write). They
// cover: exact sources; a wildcard source ("*" on api, precedence 8,
// above the wildcard destination's exact sources, 6); a wildcard
// destination ("*": batch, legacy) under and over exact ones (billing's
// legacy allow, 9, beats "*"'s legacy deny, 6); deny and allow side by
// side at equal precedence (api: web allow, db deny, both 9, each the
// first match of its own source); an L7 intention (search: web with
// Permissions, which authorize answers as a deny); and no match at all
// (ledger: only the wildcard destination's sources match, others get the
// default).
//
// Not testable on Consul CE: namespace and partition wildcards and
// sources of other namespaces or partitions (CE refuses any namespace
// but "default", and authorize refuses a source of another partition),
// and two intentions of equal precedence matching the same source (CE
// keeps one intention per source and destination name). Those are
// covered by the unit tests of package intentions against Consul's code.
var conformanceEntries = []*api.ServiceIntentionsConfigEntry{
	{Kind: api.ServiceIntentions, Name: "*", Sources: []*api.SourceIntention{
		{Name: "batch", Action: api.IntentionActionAllow},
		{Name: "legacy", Action: api.IntentionActionDeny},
	}},
	{Kind: api.ServiceIntentions, Name: "api", Sources: []*api.SourceIntention{
		{Name: "web", Action: api.IntentionActionAllow},
		{Name: "db", Action: api.IntentionActionDeny},
		{Name: "*", Action: api.IntentionActionDeny},
	}},
	{Kind: api.ServiceIntentions, Name: "billing", Sources: []*api.SourceIntention{
		{Name: "web", Action: api.IntentionActionDeny},
		{Name: "legacy", Action: api.IntentionActionAllow},
		{Name: "db", Action: api.IntentionActionAllow},
	}},
	{Kind: api.ServiceIntentions, Name: "search", Sources: []*api.SourceIntention{
		{Name: "web", Permissions: []*api.IntentionPermission{
			{Action: api.IntentionActionDeny, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/admin"}},
			{Action: api.IntentionActionAllow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/"}},
		}},
		{Name: "db", Action: api.IntentionActionAllow},
	}},
}

var (
	conformanceDestinations = []string{"api", "billing", "search", "ledger"}
	conformanceSources      = []string{"web", "db", "batch", "legacy", "stranger"}
)

// TestConformance: for every destination and source of the table, under
// each way Consul sets the default, the local decision (the intentions
// the watch fetched, decided by package intentions) equals what the
// agent's /v1/agent/connect/authorize answers: the verdict and Consul's
// reason, word for word.
func TestConformance(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts testenv.ConsulOptions
		// probe: the watch's token lacks agent:read, so the default is
		// learned from an authorize probe instead of /v1/agent/self.
		probe bool
	}{
		{"default allow (no ACLs, no default_intention_policy)", testenv.ConsulOptions{}, false},
		{"default_intention_policy deny", testenv.ConsulOptions{DefaultDeny: true}, false},
		{"ACL default deny", testenv.ConsulOptions{ACL: true}, false},
		{"ACL default deny, token without agent:read", testenv.ConsulOptions{ACL: true}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := testenv.Consul(t, tc.opts)
			if _, _, err := c.Client.ConfigEntries().Set(&api.ServiceConfigEntry{Kind: api.ServiceDefaults, Name: "search", Protocol: "http"}, nil); err != nil {
				t.Fatal(err)
			}
			var last uint64
			for _, e := range conformanceEntries {
				if _, _, err := c.Client.ConfigEntries().Set(e, nil); err != nil {
					t.Fatalf("write intentions %s: %v", e.Name, err)
				}
				got, _, err := c.Client.ConfigEntries().Get(api.ServiceIntentions, e.Name, nil)
				if err != nil {
					t.Fatal(err)
				}
				last = max(last, got.GetModifyIndex())
			}
			watchClient := c.Client
			if tc.probe {
				watchClient = sidecarToken(t, c)
				if _, err := watchClient.Agent().Self(); err == nil {
					t.Fatal("the restricted token may read /v1/agent/self: the probe would not be tested")
				}
			}
			for _, dst := range conformanceDestinations {
				a := New(dst, nil, zaptest.NewLogger(t))
				t.Cleanup(func() { a.Close() })
				ctx, cancel := context.WithCancel(context.Background())
				done := make(chan struct{})
				go func() { a.WatchIntentions(ctx, watchClient); close(done) }()
				t.Cleanup(func() { cancel(); <-done })
				// waitFor: 10 s.
				waitFor(t, func() bool { return a.Intentions() != nil && a.Stats().IntentionsIndex >= last })
				set := a.Intentions()
				for _, src := range conformanceSources {
					uri := "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/" + src
					res, err := c.Client.Agent().ConnectAuthorize(&api.AgentAuthorizeParams{Target: dst, ClientCertURI: uri, ClientCertSerial: "01"})
					if err != nil {
						t.Fatal(err)
					}
					d := set.Decide(intentions.Peer{Partition: "default", Namespace: "default", Service: src})
					if d.Allowed() != res.Authorized || d.Reason != res.Reason {
						t.Errorf("%s -> %s: local %v %q, Consul %v %q", src, dst, d.Allowed(), d.Reason, res.Authorized, res.Reason)
					} else {
						t.Logf("%s -> %s: %v (%s)", src, dst, res.Authorized, res.Reason)
					}
				}
			}
		})
	}
}

// sidecarToken is a client whose token may write every service and read
// every intention (what a sidecar's token grants) but not read the agent.
func sidecarToken(t *testing.T, c *testenv.ConsulProc) *api.Client {
	t.Helper()
	p, _, err := c.Client.ACL().PolicyCreate(&api.ACLPolicy{Name: "sidecar",
		Rules: `service_prefix "" { policy = "write" intentions = "read" }` + "\n" + `node_prefix "" { policy = "read" }`}, nil)
	if err != nil {
		t.Fatal(err)
	}
	tok, _, err := c.Client.ACL().TokenCreate(&api.ACLToken{Policies: []*api.ACLTokenPolicyLink{{ID: p.ID}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	cl, err := c.NewClient(tok.SecretID)
	if err != nil {
		t.Fatal(err)
	}
	return cl
}
