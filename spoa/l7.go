package spoa

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/authzgen"
	"github.com/haproxy-connect/haproxy-connect/l7"
	"github.com/haproxy-connect/haproxy-connect/watch"
)

// L7 permissions, per request. Consul's L4 authorize answers deny for a
// source whose governing intention has Permissions ("Matched L7
// intention"): it cannot decide per request. On an HTTP listener (the
// authorize message carries authzgen.ArgL7), the agent turns that deny
// into a connection-level allow marked L7 (authzgen.VarL7), and HAProxy
// then sends authzgen.MessageL7 for every request of the connection: the
// source, method, path and headers. The agent decides it with the l7 model
// (first matching permission, else the default intention policy) and
// answers txn.<prefix>.l7allowed, .intention and .perm, which the access
// log shows. Sources whose intention is L4 keep their connection-level
// verdict and pay nothing per request.
//
// On a TCP listener an L7 intention stays a deny, logged as such: Consul
// refuses L7 permissions for a service that is not http, and a TCP stream
// has no requests to decide.

// L7Rules is where the agent reads the L7 intentions of its destination.
// IntentionEntries (below) reads Consul's service-intentions config
// entries; a holder of the destination's whole intentions can serve it
// as well (l7.Parse turns an intention's Permissions into the model).
type L7Rules interface {
	// Lookup returns the L7 intention that governs the source service
	// name, if that intention is L7.
	Lookup(source string) l7.Lookup
	// DefaultAllow is the default intention policy, applied when no
	// permission of an L7 intention matches a request.
	DefaultAllow() bool
}

// WithL7Rules enables L7 permissions with rules r. Without it, an L7
// intention stays Consul's connection-level deny.
func WithL7Rules(r L7Rules) Option { return func(a *Authorizer) { a.l7 = r } }

// maxRequestHeaders bounds the headers of one request the agent reads.
const maxRequestHeaders = 256

// serviceRE takes the service name out of a local service SPIFFE ID (the
// default partition and namespace: L7 sources of another one never match,
// see l7.Build).
var serviceRE = regexp.MustCompile(`^spiffe://[^/]+(?:/ap/default)?/ns/default/dc/[^/]+/svc/([^/]+)$`)

func serviceName(uri string) (string, bool) {
	m := serviceRE.FindStringSubmatch(uri)
	if m == nil {
		return "", false
	}
	return m[1], true
}

// l7Connection is the L7 hook of a connection decision: a deny from the
// Decider for a source whose governing intention is L7 becomes an allow
// decided per request, on an HTTP listener.
func (a *Authorizer) l7Connection(d *decision, httpListener bool) {
	if a.l7 == nil || d.allowed || d.undecided || d.err != nil {
		return
	}
	name, ok := serviceName(d.source)
	if !ok {
		return
	}
	lk := a.l7.Lookup(name)
	if lk.Intention == nil && lk.Err == nil {
		return
	}
	if !httpListener {
		a.log.Warn("L7 intention on a TCP listener refused: permissions need an HTTP listener (service protocol http, http2 or grpc)",
			zap.String("source", d.source), zap.String("reason", d.reason))
		return
	}
	d.allowed, d.l7 = true, true
	d.reason = "L7 intention: each request is decided by its permissions"
}

// l7Request is one decoded MessageL7.
type l7Request struct {
	source string
	req    l7.Request
	err    error
}

// readL7 finds MessageL7 in a NOTIFY payload.
func readL7(b []byte) (seen bool, r l7Request) {
	r.err = errors.New("message has no source")
	for len(b) > 0 {
		name, rest, err := getString(b)
		if err != nil || len(rest) == 0 {
			return seen, l7Request{err: fmt.Errorf("decode spoe message: %w", errTruncated)}
		}
		n := int(rest[0])
		b = rest[1:]
		mine := name == authzgen.MessageL7
		seen = seen || mine
		for range n {
			var arg string
			var v value
			if arg, b, err = getString(b); err == nil {
				v, b, err = getValue(b)
			}
			if err != nil {
				return seen, l7Request{err: fmt.Errorf("decode spoe message %q: %w", name, err)}
			}
			if !mine {
				continue
			}
			str := v.typ == typeString || v.typ == typeBinary
			switch arg {
			case authzgen.ArgSource:
				if str {
					r.source, r.err = string(v.bytes), nil
				}
			case authzgen.ArgMethod:
				if str {
					r.req.Method = string(v.bytes)
				}
			case authzgen.ArgPath:
				if str {
					r.req.Path = string(v.bytes)
				}
			case authzgen.ArgHeaders:
				if !str {
					return seen, l7Request{err: fmt.Errorf("argument %q has type %s", arg, typeName(v.typ))}
				}
				h, err := parseHdrsBin(v.bytes)
				if err != nil {
					return seen, l7Request{err: err}
				}
				r.req.Header = h
			}
		}
	}
	return seen, r
}

// parseHdrsBin decodes HAProxy's req.hdrs_bin: pairs of <varint length,
// bytes> (name, value), ended by two empty strings. Names are lower-cased
// (HTX stores them so already).
func parseHdrsBin(b []byte) (func(string) ([]string, bool), error) {
	h := map[string][]string{}
	for n := 0; ; n++ {
		if n > maxRequestHeaders {
			return nil, fmt.Errorf("request has more than %d headers", maxRequestHeaders)
		}
		name, rest, err := getBytes(b)
		if err != nil {
			return nil, fmt.Errorf("decode request headers: %w", err)
		}
		val, rest, err := getBytes(rest)
		if err != nil {
			return nil, fmt.Errorf("decode request headers: %w", err)
		}
		b = rest
		if len(name) == 0 {
			break
		}
		k := strings.ToLower(string(name))
		h[k] = append(h[k], string(val))
	}
	return func(n string) ([]string, bool) { v, ok := h[n]; return v, ok }, nil
}

// Labels of l7 decisions that no permission made, for the access log.
const (
	permDefault = "default" // no permission matched: the default policy
	permRefused = "refused" // the intention's permissions were refused
)

// decideL7 decides one request: its txn-scope actions. No verdict (HAProxy
// answers 503) when the request cannot be read or the source is no longer
// L7 (the generation bump that follows re-authorizes the connection).
func (a *Authorizer) decideL7(r l7Request) []setVar {
	if r.err != nil || a.l7 == nil {
		a.stats.undecided.Add(1)
		a.log.Warn("L7 request not decided; refused", zap.String("source", r.source), zap.Error(errOr(r.err, "no L7 rules")))
		return nil
	}
	name, ok := serviceName(r.source)
	if !ok {
		a.stats.l7Denied.Add(1)
		return l7Actions(false, "-", permRefused)
	}
	lk := a.l7.Lookup(name)
	switch {
	case lk.Err != nil:
		a.stats.l7Denied.Add(1)
		a.log.Debug("L7 request denied: the intention's permissions were refused", zap.String("source", r.source), zap.Error(lk.Err))
		return l7Actions(false, name, permRefused)
	case lk.Intention == nil:
		a.stats.undecided.Add(1)
		a.log.Info("L7 request from a source no longer under an L7 intention; refused, the connection is authorized again", zap.String("source", r.source))
		return nil
	}
	p, matched := lk.Intention.Decide(r.req)
	allowed, label := a.l7.DefaultAllow(), permDefault
	if matched {
		allowed, label = p.Allow, p.Label()
	}
	if allowed {
		a.stats.l7Allowed.Add(1)
	} else {
		a.stats.l7Denied.Add(1)
	}
	if ce := a.log.Check(zap.DebugLevel, "L7 request decision"); ce != nil {
		ce.Write(zap.String("source", r.source), zap.String("intention", lk.Intention.Source), zap.String("permission", label),
			zap.Bool("allowed", allowed), zap.String("method", r.req.Method), zap.String("path", r.req.Path))
	}
	return l7Actions(allowed, lk.Intention.Source, label)
}

func errOr(err error, msg string) error {
	if err != nil {
		return err
	}
	return errors.New(msg)
}

// l7Actions are the per-request verdict (transaction scope: appendTxnActions).
func l7Actions(allowed bool, intention, perm string) []setVar {
	return []setVar{
		{authzgen.VarL7Allowed, allowed},
		{authzgen.VarIntention, intention},
		{authzgen.VarPerm, perm},
	}
}

// IntentionEntries is an L7Rules read from Consul: the service-intentions
// config entries of the destination and of "*" (Watch), and the default
// intention policy (ReadDefault). Safe for concurrent use.
type IntentionEntries struct {
	dest         string
	table        atomic.Pointer[l7.Table]
	defaultAllow atomic.Bool
	// defaultRead: ReadDefault succeeded once (Watch tries it while an
	// L7 intention exists and it has not).
	defaultRead atomic.Bool
}

// NewIntentionEntries returns rules for destination dest, empty (no L7
// intention) and with a default deny until Watch and ReadDefault fill them.
func NewIntentionEntries(dest string) *IntentionEntries {
	return &IntentionEntries{dest: dest}
}

// Lookup implements L7Rules.
func (e *IntentionEntries) Lookup(source string) l7.Lookup { return e.table.Load().Lookup(source) }

// DefaultAllow implements L7Rules.
func (e *IntentionEntries) DefaultAllow() bool { return e.defaultAllow.Load() }

// Set replaces the rules with those of entries; the refused permissions
// come back for the log.
func (e *IntentionEntries) Set(entries []*api.ServiceIntentionsConfigEntry) []error {
	t, errs := l7.Build(e.dest, entries)
	e.table.Store(t)
	return errs
}

// ReadDefault reads the agent's default intention policy as Consul's
// authorize applies it (agent/agent_endpoint.go AgentConnectAuthorize):
// default_intention_policy if set, else the ACL default policy (allow when
// ACLs are off). It needs agent:read; on failure the default stays deny.
func (e *IntentionEntries) ReadDefault(client *api.Client) error {
	self, err := client.Agent().Self()
	if err != nil {
		return fmt.Errorf("read the default intention policy from /v1/agent/self: %w", err)
	}
	dc, _ := self["DebugConfig"]
	allow, err := defaultFromDebugConfig(dc)
	if err != nil {
		return err
	}
	e.defaultAllow.Store(allow)
	e.defaultRead.Store(true)
	return nil
}

func defaultFromDebugConfig(dc map[string]any) (bool, error) {
	if p, _ := dc["DefaultIntentionPolicy"].(string); p != "" {
		switch p {
		case "allow":
			return true, nil
		case "deny":
			return false, nil
		}
		return false, fmt.Errorf("default_intention_policy %q is neither allow nor deny", trunc80(p))
	}
	enabled, ok := dc["ACLsEnabled"].(bool)
	if !ok {
		return false, errors.New("/v1/agent/self has no DebugConfig.ACLsEnabled")
	}
	if !enabled {
		return true, nil
	}
	rs, _ := dc["ACLResolverSettings"].(map[string]any)
	switch p, _ := rs["ACLDefaultPolicy"].(string); p {
	case "allow":
		return true, nil
	case "deny":
		return false, nil
	default:
		return false, fmt.Errorf("ACL default policy %q is neither allow nor deny", trunc80(p))
	}
}

func trunc80(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// Watch keeps the rules current from /v1/config/service-intentions (all
// entries of the kind, one blocking query; the destination's and "*"'s are
// kept), until ctx ends. The default policy is read (ReadDefault) once an
// L7 intention appears, not before: it needs agent:read, which a sidecar's
// minimal token lacks and needs for nothing else; without it, requests no
// permission matches are denied. changed runs after each new table is in place
// (the Authorizer's Invalidate: connections re-authorize on their next
// request, so one whose source turned from L7 to L4 or back gets the
// right kind of verdict).
func (e *IntentionEntries) Watch(ctx context.Context, client *api.Client, log *zap.Logger, changed func()) {
	if log == nil {
		log = zap.NewNop()
	}
	o := watch.Options{Name: "l7-intentions", Log: log, Spacing: 100 * time.Millisecond,
		FailMessage: "L7 intentions watch failed; deciding from the last rules"}
	var last string
	loaded := false
	watch.Loop(ctx, o, func(ctx context.Context, cur watch.Cursor) ([]*api.ServiceIntentionsConfigEntry, watch.Cursor, error) {
		q := (&api.QueryOptions{WaitIndex: cur.Index, WaitTime: watchWait}).WithContext(ctx)
		list, meta, err := client.ConfigEntries().List(api.ServiceIntentions, q)
		if err != nil {
			return nil, cur, err
		}
		var out []*api.ServiceIntentionsConfigEntry
		for _, ce := range list {
			if x, ok := ce.(*api.ServiceIntentionsConfigEntry); ok && (x.Name == e.dest || x.Name == "*") {
				out = append(out, x)
			}
		}
		return out, watch.Cursor{Index: meta.LastIndex}, nil
	}, func(entries []*api.ServiceIntentionsConfigEntry) {
		// The index is the kind's: a change to another destination's
		// entry moves it too, and is no change here.
		var key strings.Builder
		for _, x := range entries {
			fmt.Fprintf(&key, "%s@%d,", x.Name, x.ModifyIndex)
		}
		if key.String() == last && loaded {
			return
		}
		last, loaded = key.String(), true
		for _, err := range e.Set(entries) {
			log.Warn("L7 intention refused; its source's requests are denied", zap.String("watch", "l7-intentions"), zap.Error(err))
		}
		if e.table.Load().HasL7() && !e.defaultRead.Load() {
			if err := e.ReadDefault(client); err != nil {
				log.Warn("default intention policy unknown; an L7 request no permission matches is denied", zap.String("watch", "l7-intentions"), zap.Error(err))
			}
		}
		log.Info("L7 intentions loaded", zap.String("watch", "l7-intentions"), zap.Int("entries", len(entries)))
		if changed != nil {
			changed()
		}
	})
}
