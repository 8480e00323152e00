package spoa

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"
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

const (
	watchWait       = 5 * time.Minute
	watchBackoffMin = 100 * time.Millisecond
	watchBackoffMax = 10 * time.Second
)

// WatchIntentions invalidates the decision cache whenever the intentions
// that match the destination change, until ctx ends (then it returns nil).
// It is a blocking-query loop on /v1/connect/intentions/match: a new index
// invalidates at once (a new deny must refuse new connections within 1 s);
// an index that goes backwards resets to 0 and invalidates; errors back off
// from 100 ms to 10 s with jitter, reset after a success, and cached
// decisions keep being served meanwhile. Query starts are at least 100 ms
// apart, which bounds the loop if Consul misbehaves (index 0) and delays
// only the second of two changes in a burst.
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
	log := a.log.With(zap.String("watch", "intentions"))
	var (
		idx     uint64
		backoff time.Duration
		started time.Time
	)
	for {
		if !sleep(ctx, a.watchMinInterval-time.Since(started)) {
			return nil
		}
		started = time.Now()
		q := (&api.QueryOptions{WaitIndex: idx, WaitTime: watchWait, UseCache: true}).WithContext(ctx)
		_, meta, err := client.Connect().IntentionMatch(match, q)
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			backoff = min(max(2*backoff, watchBackoffMin), watchBackoffMax)
			wait := backoff/2 + rand.N(backoff/2+1)
			log.Warn("intention watch failed; serving cached decisions", zap.Error(err), zap.Duration("retry_in", wait))
			if !sleep(ctx, wait) {
				return nil
			}
			continue
		}
		backoff = 0
		next := meta.LastIndex
		switch {
		case next == idx:
			continue // the wait expired without a change
		case next < idx:
			log.Info("intention index went backwards, resetting", zap.Uint64("index", idx), zap.Uint64("new_index", next))
			next = 0
		}
		a.Invalidate()
		a.watchIndex.Store(next)
		log.Info("intentions changed, decision cache dropped", zap.Uint64("index", next))
		idx = next
	}
}

// watchName names the destination as the agent's authorize endpoint does
// on Consul CE (see WatchIntentions).
func watchName(target string) string { return "default/default/" + target }

// sleep waits d (nothing if d <= 0) and reports whether ctx is still live.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// WatchRoots keeps the trust domain and CA roots that client certificates
// are checked against (SetRoots) current, until ctx ends (then it returns
// nil). It is a blocking-query loop on /v1/agent/connect/ca/roots, the
// endpoint the controller reads for HAProxy's ca-file, with the same
// index rules and backoff as WatchIntentions. An answer that fails to
// parse is logged and the previous roots stay. The client must not have an
// HTTP timeout shorter than 5 minutes.
func (a *Authorizer) WatchRoots(ctx context.Context, client *api.Client) error {
	log := a.log.With(zap.String("watch", "ca-roots"))
	var (
		idx     uint64
		backoff time.Duration
		started time.Time
	)
	fail := func(msg string, err error) bool {
		backoff = min(max(2*backoff, watchBackoffMin), watchBackoffMax)
		wait := backoff/2 + rand.N(backoff/2+1)
		log.Warn(msg, zap.Error(err), zap.Duration("retry_in", wait))
		return sleep(ctx, wait)
	}
	for {
		if !sleep(ctx, a.watchMinInterval-time.Since(started)) {
			return nil
		}
		started = time.Now()
		var list caRoots
		meta, err := client.Raw().Query("/v1/agent/connect/ca/roots", &list, (&api.QueryOptions{WaitIndex: idx, WaitTime: watchWait}).WithContext(ctx))
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			if !fail("CA roots watch failed; checking against the last roots", err) {
				return nil
			}
			continue
		}
		next := meta.LastIndex
		switch {
		case next == idx:
			backoff = 0
			continue
		case next < idx:
			log.Info("CA roots index went backwards, resetting", zap.Uint64("index", idx), zap.Uint64("new_index", next))
			next = 0
		}
		if err := a.setRootsFrom(&list); err != nil {
			// Consul's answer is hostile input too: keep the last good
			// roots, and ask again after a backoff rather than at once.
			if !fail("CA roots rejected; checking against the last roots", err) {
				return nil
			}
			continue
		}
		backoff = 0
		idx = next
	}
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

// setRootsFrom parses Consul's roots answer and calls SetRoots.
func (a *Authorizer) setRootsFrom(list *caRoots) error {
	var roots, inters []*x509.Certificate
	for _, r := range list.Roots {
		c, err := parsePEMCert(r.RootCert)
		if err != nil {
			return fmt.Errorf("CA root %s: %w", r.ID, err)
		}
		roots = append(roots, c)
		for _, p := range r.IntermediateCerts {
			c, err := parsePEMCert(p)
			if err != nil {
				return fmt.Errorf("intermediate of CA root %s: %w", r.ID, err)
			}
			inters = append(inters, c)
		}
	}
	return a.SetRoots(list.TrustDomain, roots, inters)
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
