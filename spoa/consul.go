package spoa

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/intentions"
	"github.com/haproxy-connect/haproxy-connect/watch"
)

// watchWait is how long one blocking query may wait for a change.
const watchWait = 5 * time.Minute

// WatchIntentions keeps the intentions that match the destination, and
// the default decision, current until ctx ends (then it returns nil): an
// Authorizer without a Decider decides from them (SetIntentions), and a
// change invalidates the decision cache. It is a blocking-query loop
// (watch.Loop) on /v1/connect/intentions/match: a new index is fetched
// and published at once (a new deny must refuse new connections within
// 1 s); an index that goes backwards resets to 0; errors back off from
// 100 ms to 10 s with jitter, reset after a success, and the intentions
// last held keep deciding meanwhile (fail-static: new sources included).
// Query starts are at least 100 ms apart, which bounds the loop if Consul
// misbehaves (index 0) and delays only the second of two changes in a
// burst.
//
// The query is ?cached and names the destination as
// "default/default/<target>": on Consul CE that is the very agent-cache
// entry the authorize endpoint reads (agent/agent_endpoint.go
// AgentConnectAuthorize asks cachetype.IntentionMatch for partition and
// namespace "default"; agent/intentions_endpoint.go IntentionMatch parses
// "partition/namespace/name"), so local decisions follow the intentions
// at the same time as the agent's own would. This needs the agent's
// http_config.use_cache (default true). Namespaces and partitions other
// than "default" are not supported.
//
// With each answer the default decision is read again (defaultDecision):
// it changes only when the agent restarts with another
// default_intention_policy or ACL default policy, which breaks the
// blocking query, so the next answer carries it. The client must not
// have an HTTP timeout shorter than 5 minutes.
func (a *Authorizer) WatchIntentions(ctx context.Context, client *api.Client) error {
	name := watchName(a.target)
	match := &api.IntentionMatch{By: api.IntentionMatchDestination, Names: []string{name}}
	dest := destination(a.target)
	type held struct {
		set     *intentions.Set
		skipped []error
		index   uint64
	}
	o := watch.Options{Name: "intentions", Log: a.log, Spacing: a.watchMinInterval,
		FailMessage: "intention watch failed; deciding from the intentions last held"}
	watch.Loop(ctx, o, func(ctx context.Context, cur watch.Cursor) (held, watch.Cursor, error) {
		q := (&api.QueryOptions{WaitIndex: cur.Index, WaitTime: watchWait, UseCache: true}).WithContext(ctx)
		m, meta, err := client.Connect().IntentionMatch(match, q)
		if err != nil {
			return held{}, cur, err
		}
		// Consul's answer is hostile input: exactly the name asked.
		list, ok := m[name]
		if len(m) != 1 || !ok {
			return held{}, cur, fmt.Errorf("intentions match answered %d names, not just %q", len(m), name)
		}
		def, err := defaultDecision(ctx, client, a.target)
		if errors.Is(err, errDefaultUnknown) {
			a.log.Warn("default intention decision unknown; keeping the previous one", zap.String("watch", "intentions"), zap.Error(err))
			def = intentions.Default{Reason: "default intention decision unknown: deny"}
			if old := a.Intentions(); old != nil {
				def = old.Default()
			}
		} else if err != nil {
			return held{}, cur, err
		}
		set, skipped := intentions.New(dest, list, def)
		return held{set, skipped, meta.LastIndex}, watch.Cursor{Index: meta.LastIndex}, nil
	}, func(h held) {
		a.logSkipped(h.skipped)
		changed := a.SetIntentions(h.set)
		a.watchIndex.Store(h.index)
		if changed {
			a.log.Info("intentions changed, decision cache dropped", zap.String("watch", "intentions"), zap.Uint64("index", h.index),
				zap.Int("intentions", h.set.Len()), zap.Bool("default_allow", h.set.Default().Allow), zap.String("default", h.set.Default().Reason))
		}
	})
	return nil
}

// watchName names the destination as the agent's authorize endpoint does
// on Consul CE (see WatchIntentions).
func watchName(target string) string { return "default/default/" + target }

// WatchRoots keeps the trust domain and CA roots that client certificates
// are checked against (SetRoots) current, until ctx ends (then it returns
// nil). It is a blocking-query loop (watch.Loop) on
// /v1/agent/connect/ca/roots, the endpoint the controller reads for
// HAProxy's ca-file, with the same index rules and backoff as
// WatchIntentions. An answer that fails to parse is logged and retried
// after a backoff, and the previous roots stay. The client must not have
// an HTTP timeout shorter than 5 minutes.
func (a *Authorizer) WatchRoots(ctx context.Context, client *api.Client) error {
	o := watch.Options{Name: "ca-roots", Log: a.log, Spacing: a.watchMinInterval,
		FailMessage: "CA roots watch failed; checking against the last roots"}
	watch.Loop(ctx, o, func(ctx context.Context, cur watch.Cursor) (parsedRoots, watch.Cursor, error) {
		var list caRoots
		meta, err := client.Raw().Query("/v1/agent/connect/ca/roots", &list, (&api.QueryOptions{WaitIndex: cur.Index, WaitTime: watchWait}).WithContext(ctx))
		if err != nil {
			return parsedRoots{}, cur, err
		}
		// Consul's answer is hostile input too: a bad one keeps the last
		// good roots, and is asked for again after a backoff rather than
		// at once.
		p, err := parseRoots(&list)
		if err != nil {
			return parsedRoots{}, cur, fmt.Errorf("CA roots rejected: %w", err)
		}
		return p, watch.Cursor{Index: meta.LastIndex}, nil
	}, func(p parsedRoots) {
		if err := a.SetRoots(p.trustDomain, p.roots, p.inters); err != nil {
			a.log.Warn("CA roots rejected; checking against the last roots", zap.String("watch", "ca-roots"), zap.Error(err))
		}
	})
	return nil
}

// caRoots is the part of Consul's /v1/agent/connect/ca/roots answer the
// agent uses. api.CARoot (v1.33.0) has no IntermediateCerts: a leaf signed
// by an intermediate (another provider, a secondary datacenter) verifies
// only with them, and HAProxy hands the agent the leaf alone.
type caRoots struct {
	TrustDomain string
	Roots       []struct {
		ID                string
		RootCert          string
		IntermediateCerts []string
	}
}

// parsedRoots is Consul's roots answer, parsed.
type parsedRoots struct {
	trustDomain   string
	roots, inters []*x509.Certificate
}

// parseRoots parses Consul's roots answer and checks it as SetRoots does.
func parseRoots(list *caRoots) (parsedRoots, error) {
	p := parsedRoots{trustDomain: list.TrustDomain}
	for _, r := range list.Roots {
		c, err := parsePEMCert(r.RootCert)
		if err != nil {
			return parsedRoots{}, fmt.Errorf("CA root %s: %w", r.ID, err)
		}
		p.roots = append(p.roots, c)
		for _, pm := range r.IntermediateCerts {
			c, err := parsePEMCert(pm)
			if err != nil {
				return parsedRoots{}, fmt.Errorf("intermediate of CA root %s: %w", r.ID, err)
			}
			p.inters = append(p.inters, c)
		}
	}
	if _, err := newTrust(p.trustDomain, p.roots, p.inters); err != nil {
		return parsedRoots{}, err
	}
	return p, nil
}

// parsePEMCert parses a PEM string holding exactly one certificate.
func parsePEMCert(s string) (*x509.Certificate, error) {
	b, rest := pem.Decode([]byte(s))
	if b == nil || b.Type != "CERTIFICATE" {
		return nil, errors.New("no PEM certificate")
	}
	if len(strings.TrimSpace(string(rest))) != 0 {
		return nil, errors.New("more than one PEM block")
	}
	return x509.ParseCertificate(b.Bytes)
}
