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

	"github.com/haproxy-connect/haproxy-connect/watch"
)

// ConsulDecider asks the local Consul agent
// (POST /v1/agent/connect/authorize), which evaluates intentions from its
// own cache and applies default_intention_policy when none matches.
type ConsulDecider struct {
	Client *api.Client
}

// Authorize implements Decider. api v1.33.0's ConnectAuthorize takes no
// context, so ctx is only checked before the call; the Authorizer stops
// waiting at its timeout, and the HTTP client's own timeout (if any) ends
// the request.
func (d ConsulDecider) Authorize(ctx context.Context, target, clientCertURI, clientCertSerial string) (bool, string, error) {
	if err := ctx.Err(); err != nil {
		return false, "", err
	}
	res, err := d.Client.Agent().ConnectAuthorize(&api.AgentAuthorizeParams{
		Target:           target,
		ClientCertURI:    clientCertURI,
		ClientCertSerial: clientCertSerial,
	})
	if err != nil {
		return false, "", fmt.Errorf("consul authorize %s to %s: %w", clientCertURI, target, err)
	}
	return res.Authorized, res.Reason, nil
}

// watchWait is how long one blocking query may wait for a change.
const watchWait = 5 * time.Minute

// WatchIntentions invalidates the decision cache whenever the intentions
// that match the destination change, until ctx ends (then it returns nil).
// It is a blocking-query loop (watch.Loop) on /v1/connect/intentions/match:
// a new index invalidates at once (a new deny must refuse new connections
// within 1 s); an index that goes backwards resets to 0 and invalidates;
// errors back off from 100 ms to 10 s with jitter, reset after a success,
// and cached decisions keep being served meanwhile. Query starts are at
// least 100 ms apart, which bounds the loop if Consul misbehaves (index 0)
// and delays only the second of two changes in a burst.
//
// The query is ?cached and names the destination as
// "default/default/<target>": on Consul CE that is the very agent-cache
// entry the authorize endpoint reads (agent/agent_endpoint.go
// AgentConnectAuthorize asks cachetype.IntentionMatch for partition and
// namespace "default"; agent/intentions_endpoint.go IntentionMatch parses
// "partition/namespace/name"). So when this query returns a new index,
// authorize already answers from the new intentions; a query to the
// servers could return first, and the next connection would cache the old
// answer until the next change. This needs the agent's http_config.use_cache
// (default true). Namespaces and partitions are not supported.
//
// Not visible here: a change of the agent's default_intention_policy or
// of ACL defaults (agent configuration, applied by restarting the agent,
// which also restarts us through the sidecar), and L7 permissions on a
// matching intention (Consul answers deny to L4 authorize either way).
// The client must not have an HTTP timeout shorter than 5 minutes.
func (a *Authorizer) WatchIntentions(ctx context.Context, client *api.Client) error {
	match := &api.IntentionMatch{
		By:    api.IntentionMatchDestination,
		Names: []string{watchName(a.target)},
	}
	o := watch.Options{Name: "intentions", Log: a.log, Spacing: a.watchMinInterval,
		FailMessage: "intention watch failed; serving cached decisions"}
	watch.Loop(ctx, o, func(ctx context.Context, cur watch.Cursor) (uint64, watch.Cursor, error) {
		q := (&api.QueryOptions{WaitIndex: cur.Index, WaitTime: watchWait, UseCache: true}).WithContext(ctx)
		_, meta, err := client.Connect().IntentionMatch(match, q)
		if err != nil {
			return 0, cur, err
		}
		return meta.LastIndex, watch.Cursor{Index: meta.LastIndex}, nil
	}, func(index uint64) {
		a.Invalidate()
		a.watchIndex.Store(index)
		a.log.Info("intentions changed, decision cache dropped", zap.String("watch", "intentions"), zap.Uint64("index", index))
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
