package spoa

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/authzgen"
	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/intentions"
	"github.com/haproxy-connect/haproxy-connect/l7"
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
// An Authorizer deciding locally reads them from the intentions it holds
// (setRules, built with each Set): the L4 and L7 decisions then come from
// one snapshot, under one generation, and follow Consul's precedence for
// both. WithL7Rules gives other rules (tests with a Decider).
type L7Rules interface {
	// Lookup returns the L7 intention that governs the source, if that
	// intention is L7.
	Lookup(source certs.ID) l7.Lookup
	// DefaultAllow is the default intention policy, applied when no
	// permission of an L7 intention matches a request.
	DefaultAllow() bool
	// L4 is the connection-level verdict for a source whose governing
	// intention is not L7, and that intention's source name ("-" for the
	// default).
	L4(source certs.ID) (allowed bool, intention string)
}

// WithL7Rules decides L7 permissions from r instead of from the
// intentions held (an Authorizer with a Decider holds none, and without
// this option leaves an L7 intention Consul's connection-level deny).
func WithL7Rules(r L7Rules) Option { return func(a *Authorizer) { a.l7 = r } }

// rules are the L7 rules decisions read now, nil when there are none.
func (a *Authorizer) rules() L7Rules {
	if a.l7 != nil {
		return a.l7
	}
	if h := a.held.Load(); h != nil && a.decider == nil {
		return h.rules
	}
	return nil
}

// setRules is the L7 view of one intentions Set: the Set decides which
// intention governs a source (Consul's precedence, tenancy and wildcards),
// and each L7 intention's permissions are compiled once, when the Set is
// built. Immutable.
type setRules struct {
	set      *intentions.Set
	compiled map[*intentions.Intention]l7.Lookup
	table    []l7.Compiled
}

// newSetRules compiles s's L7 intentions. Permissions that are refused
// (l7.Parse) stay with their error: every request of a source they govern
// is denied, not let through to a lower-precedence intention. The errors
// come back for the log.
func newSetRules(s *intentions.Set) (*setRules, []error) {
	r := &setRules{set: s, compiled: map[*intentions.Intention]l7.Lookup{}}
	var errs []error
	for _, x := range s.L7() {
		in, err := l7.Parse(x.SourceName, x.Permissions)
		if err != nil {
			err = fmt.Errorf("intention %s: %w", x, err)
			errs = append(errs, err)
		}
		lk := l7.Lookup{Intention: in, Err: err}
		if err == nil {
			c := in.Compile(s.Default().Allow)
			lk.Key = c.Key
			if !slices.ContainsFunc(r.table, func(o l7.Compiled) bool { return o.Key == c.Key }) {
				r.table = append(r.table, c)
			}
		}
		r.compiled[x] = lk
	}
	return r, errs
}

// Table is the intentions compiled for HAProxy's L7 map, one per key, in
// the Set's order.
func (r *setRules) Table() []l7.Compiled { return r.table }

// Lookup implements L7Rules.
func (r *setRules) Lookup(src certs.ID) l7.Lookup {
	d := r.set.Decide(intentions.Peer{Partition: src.Partition, Namespace: src.Namespace, Service: src.Service})
	if d.Verdict != intentions.L7 {
		return l7.Lookup{}
	}
	return r.compiled[d.Intention]
}

// DefaultAllow implements L7Rules.
func (r *setRules) DefaultAllow() bool { return r.set.Default().Allow }

// L4 implements L7Rules.
func (r *setRules) L4(src certs.ID) (bool, string) {
	d := r.set.Decide(intentions.Peer{Partition: src.Partition, Namespace: src.Namespace, Service: src.Service})
	if d.Intention == nil {
		return d.Allowed(), "-"
	}
	return d.Allowed(), d.Intention.SourceName
}

// maxRequestHeaders bounds the headers of one request the agent reads.
const maxRequestHeaders = 256

// maxSourceIDs bounds the parsed source SPIFFE IDs the agent keeps for
// per-request decisions and new certificates; past it, sources are parsed
// each time.
const maxSourceIDs = 16384

// sourceID parses a source SPIFFE ID (certs.ParseSPIFFE), remembered:
// every request of an L7 connection names its source, and so does every
// new certificate of a source (renewals, instances).
func (a *Authorizer) sourceID(uri string) (certs.ID, error) {
	if v, ok := a.sourceIDs.Load(uri); ok {
		return v.(certs.ID), nil
	}
	id, err := certs.ParseSPIFFE(uri)
	if err == nil && a.nSourceIDs.Add(1) <= maxSourceIDs {
		a.sourceIDs.Store(uri, id)
	}
	return id, err
}

// l7Connection is the L7 hook of a connection decision: a deny from the
// Decider for a source whose governing intention is L7 becomes an allow
// decided per request, on an HTTP listener.
func (a *Authorizer) l7Connection(d *decision, httpListener bool) {
	rules := a.rules()
	if rules == nil || d.allowed || d.undecided || d.err != nil {
		return
	}
	// A local verdict says itself whether an L7 intention made it: the
	// rules may have moved on since (an intentions change under way), and
	// asking them would turn an L7 verdict into a plain deny. A Decider's
	// answer says only allow or deny, so the rules say whether it is L7.
	isL7 := d.l7Intention
	if a.decider != nil {
		src, err := a.sourceID(d.source)
		if err != nil {
			return
		}
		lk := rules.Lookup(src)
		isL7 = lk.Intention != nil || lk.Err != nil
		d.l7Key = lk.Key
	}
	if !isL7 {
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
	permL4      = "l4"      // the source is under an L4 intention now
)

// decideL7 decides one request: its txn-scope actions. No verdict (HAProxy
// answers 503) when the request cannot be read. A source no longer under
// an L7 intention (its connection was decided L7 under older intentions,
// and this request was sent before HAProxy asked again) gets its L4
// verdict under the intentions held now, as its connection will on its
// next request: the request is decided by the newest intentions, and a
// switch between L4 and L7 refuses nothing the intentions allow.
func (a *Authorizer) decideL7(r l7Request) []setVar {
	rules := a.rules()
	if r.err != nil || rules == nil {
		a.stats.undecided.Add(1)
		a.log.Warn("L7 request not decided; refused", zap.String("source", r.source), zap.Error(errOr(r.err, "no L7 rules")))
		return nil
	}
	src, err := a.sourceID(r.source)
	if err != nil {
		a.stats.l7Denied.Add(1)
		return l7Actions(false, "-", permRefused)
	}
	lk := rules.Lookup(src)
	switch {
	case lk.Err != nil:
		a.stats.l7Denied.Add(1)
		a.log.Debug("L7 request denied: the intention's permissions were refused", zap.String("source", r.source), zap.Error(lk.Err))
		return l7Actions(false, src.Service, permRefused)
	case lk.Intention == nil:
		allowed, intention := rules.L4(src)
		if allowed {
			a.stats.l7Allowed.Add(1)
		} else {
			a.stats.l7Denied.Add(1)
		}
		a.log.Debug("L7 request from a source no longer under an L7 intention: its L4 verdict", zap.String("source", r.source),
			zap.String("intention", intention), zap.Bool("allowed", allowed))
		return l7Actions(allowed, intention, permL4)
	}
	p, matched := lk.Intention.Decide(r.req)
	allowed, label := rules.DefaultAllow(), permDefault
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
