package spoa

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/intentions"
)

// Local decisions. An Authorizer made with a nil Decider decides from the
// destination's intentions it holds (SetIntentions, which WatchIntentions
// calls with every new answer), with Consul's L4 semantics (package
// intentions), and never asks Consul on the request path. That makes a
// first decision for a source a map walk instead of a Consul call, and
// authorization fail-static: while Consul is unreachable the last
// intentions held keep deciding, for sources never seen before too. Until
// the first intentions arrive every connection is left undecided (HAProxy
// refuses and asks again).

// errNoIntentions leaves a connection undecided: the agent holds no
// intentions yet.
var errNoIntentions = errors.New("intentions not known yet")

// SetIntentions makes s the intentions local decisions are made from. If
// it decides differently from the Set held (or none was), it is published
// with an Invalidate, at the switch to the new generation (see
// invalidate): until HAProxy has that generation decisions still come from
// the old Set under the old one, as the README promises ("the agent
// decides under the new intentions only once HAProxy has the new
// generation"), and a decision under the new generation never comes from
// the old Set. It reports whether it invalidated. Calls must not overlap
// (one watch makes them).
//
// The L7 rules are built from s too (setRules), and published with it:
// L4 and L7 decisions under one generation read one snapshot. An L7
// intention whose permissions are refused is logged here.
func (a *Authorizer) SetIntentions(s *intentions.Set) bool {
	if old := a.held.Load(); old != nil && old.set.Equal(s) {
		return false
	}
	rules, errs := newSetRules(s)
	for _, err := range errs {
		a.log.Warn("L7 intention refused; its source's requests are denied", zap.Error(err))
	}
	h := &heldIntentions{set: s, rules: rules}
	if a.onL7Map != nil {
		a.onL7Map(rules.Table())
	}
	a.invalidate(func() { a.held.Store(h) })
	return true
}

// heldIntentions is what local decisions read: the intentions and their
// L7 rules, published together.
type heldIntentions struct {
	set   *intentions.Set
	rules *setRules
}

// Intentions is the Set local decisions are made from, nil before the
// first.
func (a *Authorizer) Intentions() *intentions.Set {
	if h := a.held.Load(); h != nil {
		return h.set
	}
	return nil
}

// decideLocal decides for the source id from the held intentions; its
// certificate has passed checkCert, so id is a service of this cluster.
func (a *Authorizer) decideLocal(id certs.ID) answer {
	h := a.held.Load()
	if h == nil {
		return answer{err: errNoIntentions}
	}
	a.stats.localDecisions.Add(1)
	d := h.set.Decide(intentions.Peer{Partition: id.Partition, Namespace: id.Namespace, Service: id.Service})
	v := verdict{allowed: d.Allowed(), reason: d.Reason, refused: -1, l7: d.Verdict == intentions.L7}
	if v.l7 {
		v.l7Key = h.rules.compiled[d.Intention].Key
	}
	return answer{v: v}
}

// destination is the target as the intentions name it. Consul CE has one
// partition and one namespace, "default"; the agent's authorize endpoint
// asks for them too (see WatchIntentions).
func destination(target string) intentions.Peer {
	return intentions.Peer{Partition: "default", Namespace: "default", Service: target}
}

// agentSelf is the part of /v1/agent/self (DebugConfig, the agent's
// runtime configuration) the default decision comes from. Its values are
// checked by intentions.DefaultOf.
type agentSelf struct {
	DebugConfig struct {
		DefaultIntentionPolicy string
		ACLsEnabled            bool
		ACLResolverSettings    struct{ ACLDefaultPolicy string }
	}
}

// probeSource is the source the default decision is asked for when the
// agent's configuration cannot be read: an identity no service has
// (Consul's authorize does not check the trust domain).
const probeSource = "spiffe://haproxy-connect.invalid/ns/default/dc/probe/svc/haproxy-connect-default-probe"

// probeTimeout bounds the authorize call of defaultDecision.
const probeTimeout = 5 * time.Second

// defaultDecision learns what the local agent decides when no intention
// matches. It reads the agent's configuration (/v1/agent/self, which
// needs agent:read); when the token may not (403), it asks authorize once
// for probeSource, which no intention but a wildcard one can match, and
// takes the answer only if Consul says it applied the default. A wildcard
// that matches it leaves the default unknown (an error): the previous one
// is kept.
func defaultDecision(ctx context.Context, client *api.Client, target string) (intentions.Default, error) {
	var self agentSelf
	_, err := client.Raw().Query("/v1/agent/self", &self, (&api.QueryOptions{}).WithContext(ctx))
	if err == nil {
		c := self.DebugConfig
		return intentions.DefaultOf(intentions.AgentConfig{DefaultIntentionPolicy: c.DefaultIntentionPolicy,
			ACLsEnabled: c.ACLsEnabled, ACLDefaultPolicy: c.ACLResolverSettings.ACLDefaultPolicy})
	}
	var se api.StatusError
	if !errors.As(err, &se) || se.Code != http.StatusForbidden {
		return intentions.Default{}, fmt.Errorf("agent configuration: %w", err)
	}
	type res struct {
		r   *api.AgentAuthorize
		err error
	}
	ch := make(chan res, 1)
	go func() {
		// api v1.33.0's ConnectAuthorize takes no context.
		r, err := client.Agent().ConnectAuthorize(&api.AgentAuthorizeParams{Target: target, ClientCertURI: probeSource, ClientCertSerial: "00"})
		ch <- res{r, err}
	}()
	var r res
	select {
	case r = <-ch:
	case <-ctx.Done():
		return intentions.Default{}, ctx.Err()
	case <-time.After(probeTimeout):
		return intentions.Default{}, errors.New("default decision probe: authorize timed out")
	}
	if r.err != nil {
		return intentions.Default{}, fmt.Errorf("default decision probe (agent configuration refused: %v): %w", err, r.err)
	}
	switch r.r.Reason {
	case "Default intention policy", "Default behavior configured by ACLs":
		return intentions.Default{Allow: r.r.Authorized, Reason: r.r.Reason}, nil
	}
	return intentions.Default{}, fmt.Errorf("%w: default decision probe answered %q", errDefaultUnknown, r.r.Reason)
}

// errDefaultUnknown: the probe matched an intention. The intention is a
// wildcard one of the default namespace (no service is called like the
// probe), which every source of that namespace matches as well, so on
// Consul CE the default never applies and WatchIntentions keeps the
// previous default, or a deny.
var errDefaultUnknown = errors.New("default decision unknown")

// logSkipped logs intentions New left out.
func (a *Authorizer) logSkipped(skipped []error) {
	for _, err := range skipped {
		a.log.Warn("intention ignored: Consul would not apply it to a source this agent accepts", zap.String("watch", "intentions"), zap.Error(err))
	}
}
