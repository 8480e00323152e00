package bootstrap

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/haproxy-connect/haproxy-connect/chain"
	"github.com/haproxy-connect/haproxy-connect/input"
)

// An upstream with a discovery chain (package chain) is rendered as:
//
//   - its frontend, which names the route a request takes (txn.hc.rt,
//     "r0", "r1", ...: the first route whose match holds), draws a bucket
//     (rand(100)), and looks "<route>/<bucket>" up in the chain map: the
//     value is the backend of the target that bucket of the route's
//     requests goes to. A route's splits own contiguous runs of buckets,
//     sized by weight (ChainBuckets). Then, for each target with
//     failover, the first failover target that has a usable server takes
//     the request when the target has none (nbsrv). use_backend takes
//     the backend named; the upstream's own backend stays the default,
//     for a request the map has no entry for.
//   - one backend per target (Upstream.Target set), with slots as every
//     upstream backend, its balance algorithm, connect timeout and
//     retries, and the request timeout of the route that took the
//     request, looked up in the chain map ("<route>" -> milliseconds).
//
// So weights, the route-to-target choice and request timeouts are map
// entries, changed with "set map" at run time; matches, header changes,
// rewrites, retries, balance algorithms, connect timeouts and failover
// order are configuration lines, and their change is a reload (HAProxy
// 2.6 has no runtime command for any of them).
//
// Failover is a rule in the frontend rather than backup servers in the
// primary's backend: a backup server would put the failover target's
// endpoints in a second backend's slots too (each placed and verified
// twice, in two slot tables), while the rule keeps one backend per target
// and switches as soon as HAProxy's health state of the primary's slots
// says none is usable (nbsrv counts servers neither in maintenance nor
// down).

// ChainBuckets is how many buckets a route's requests are drawn into:
// weights are applied to the percent.
const ChainBuckets = 100

// Routing is an upstream's discovery chain as its frontend runs it.
type Routing struct {
	// Map is the chain map's absolute path (RenderChainMap).
	Map    string
	Routes []chain.Route
	// Targets are the chain's targets, and Backends the backend that
	// serves each, by target Name.
	Targets  []chain.Target
	Backends map[string]string
}

// TargetBackend is what a chain target's backend adds to an upstream
// backend.
type TargetBackend struct {
	Balance chain.Balance
	// Retries is the largest NumRetries of the routes that reach the
	// target (0: HAProxy's default, 3); RetryOn the status codes any of
	// them retries on.
	Retries int
	RetryOn []int
	// NoConnFailure: every route that reaches the target has a retry
	// policy (NumRetries or RetryOnStatusCodes) with
	// RetryOnConnectFailure false, so a failed connection is not retried
	// (retry-on without conn-failure). A route without a retry policy
	// keeps what every upstream backend retries. Left out of the JSON
	// when false, so the chain shapes (controller) of chains without it
	// are what they were.
	NoConnFailure bool `json:",omitzero"`
	// Map is the chain map holding request timeouts by route.
	Map string
}

// RouteVar and friends are the transaction variables of chain routing.
const (
	routeVar   = "txn." + VarPrefix + ".rt"
	bucketVar  = "txn." + VarPrefix + ".bucket"
	backendVar = "txn." + VarPrefix + ".be"
	// activeVar is a routed upstream's requests in progress, summed over
	// its backends (renderRoutedLimit).
	activeVar = "txn." + VarPrefix + ".active"
	// noTimeout is the request timeout of a route without one: the
	// defaults' "timeout server".
	noTimeout = "3600000"
)

// RouteID is the name of route i in the chain map and txn.hc.rt.
func RouteID(i int) string { return "r" + strconv.Itoa(i) }

// ChainBuckets assigns a route's buckets to its splits' targets: each
// split gets its weight's share of ChainBuckets (largest remainder, ties
// to the earlier split), in split order, so that a weight change moves
// only the buckets between the splits whose shares changed.
func AssignBuckets(splits []chain.Split) [ChainBuckets]string {
	var out [ChainBuckets]string
	counts := make([]int, len(splits))
	type rem struct{ i, r int }
	var rems []rem
	total := 0
	for i, s := range splits {
		counts[i] = s.Weight * ChainBuckets / chain.TotalWeight
		total += counts[i]
		rems = append(rems, rem{i, s.Weight * ChainBuckets % chain.TotalWeight})
	}
	slices.SortStableFunc(rems, func(a, b rem) int { return b.r - a.r })
	for k := 0; total < ChainBuckets && len(rems) > 0; k = (k + 1) % len(rems) {
		counts[rems[k].i]++
		total++
	}
	b := 0
	for i, n := range counts {
		for range n {
			if b < ChainBuckets {
				out[b] = splits[i].Target
				b++
			}
		}
	}
	return out
}

// ChainMapEntries is the chain map's content as key -> value: for each
// route, its request timeout in ms (the defaults' 1 h when it has none),
// and each bucket's backend.
func ChainMapEntries(r Routing) map[string]string {
	m := map[string]string{}
	for i, rt := range r.Routes {
		id := RouteID(i)
		// Every route has its entry, so that the map's keys depend on
		// the number of routes only (a change is a "set map").
		m[id] = noTimeout
		if rt.Dest.RequestTimeout > 0 {
			m[id] = strconv.FormatInt(rt.Dest.RequestTimeout.Milliseconds(), 10)
		}
		for b, t := range AssignBuckets(rt.Splits) {
			if be, ok := r.Backends[t]; ok {
				m[id+"/"+strconv.Itoa(b)] = be
			}
		}
	}
	return m
}

// RenderChainMap is the chain map file: ChainMapEntries, sorted.
func RenderChainMap(r Routing) string {
	m := ChainMapEntries(r)
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(k + " " + m[k] + "\n")
	}
	return b.String()
}

// validateRouting checks what reaches configuration lines again, so a
// Routing built without package chain cannot carry a quote or a newline.
func validateRouting(u Upstream) error {
	r := u.Routing
	if _, err := input.Path("chain map", r.Map); err != nil {
		return invalid(err)
	}
	if Mode(u.Protocol) != "http" {
		return fmt.Errorf("%w: upstream %s: routes on a tcp upstream", ErrInvalid, u.Name)
	}
	for _, be := range r.Backends {
		if _, err := input.Ident("chain target backend", be); err != nil {
			return invalid(err)
		}
	}
	for _, t := range r.Targets {
		for _, f := range append([]string{t.Name}, t.Failover...) {
			if _, ok := r.Backends[f]; !ok {
				return fmt.Errorf("%w: upstream %s: chain target %q has no backend", ErrInvalid, u.Name, f)
			}
		}
	}
	if len(r.Routes) == 0 {
		return fmt.Errorf("%w: upstream %s: a chain without routes", ErrInvalid, u.Name)
	}
	for _, rt := range r.Routes {
		m := rt.Match
		for _, p := range []string{m.PathExact, m.PathPrefix} {
			if _, err := input.URLPath("route path", p); p != "" && err != nil {
				return invalid(err)
			}
		}
		checks := []error{}
		if m.PathRegex != "" {
			_, err := input.Regex("route path regex", m.PathRegex)
			checks = append(checks, err)
		}
		for _, h := range m.Headers {
			_, err := input.HeaderName("route header", h.Name)
			checks = append(checks, err, checkMatchValue("route header", h.Kind, h.Value))
		}
		for _, q := range m.Query {
			_, err := input.QueryParam("route query parameter", q.Name)
			checks = append(checks, err, checkMatchValue("route query", q.Kind, q.Value))
		}
		for _, meth := range m.Methods {
			_, err := input.Method("route method", meth)
			checks = append(checks, err)
		}
		d := rt.Dest
		if d.PrefixRewrite != "" {
			_, err := input.URLPath("route prefix rewrite", d.PrefixRewrite)
			if err == nil && strings.Contains(d.PrefixRewrite, "%") {
				err = input.ErrorOf("route prefix rewrite", d.PrefixRewrite, "'%' is not supported")
			}
			checks = append(checks, err)
		}
		for _, hm := range []chain.HeaderMods{d.RequestHeaders, d.ResponseHeaders} {
			for _, h := range append(slices.Clone(hm.Add), hm.Set...) {
				_, err := input.HeaderName("header", h.Name)
				checks = append(checks, err)
				_, err = input.HeaderValue("header value", h.Value)
				checks = append(checks, err)
			}
			for _, n := range hm.Remove {
				_, err := input.HeaderName("header", n)
				checks = append(checks, err)
			}
		}
		for _, err := range checks {
			if err != nil {
				return invalid(err)
			}
		}
	}
	return nil
}

func validateTarget(u Upstream) error {
	t := u.Target
	if _, err := input.Path("chain map", t.Map); err != nil {
		return invalid(err)
	}
	switch t.Balance.Policy {
	case chain.RoundRobin, chain.LeastRequest, chain.Random:
	case chain.Hash:
		switch t.Balance.HashOn {
		case chain.HashSourceIP:
		case chain.HashHeader, chain.HashCookie, chain.HashQuery:
			if _, err := input.HeaderName("hash name", t.Balance.HashName); err != nil {
				return invalid(err)
			}
		default:
			return fmt.Errorf("%w: upstream %s: hash on %q", ErrInvalid, u.Name, t.Balance.HashOn)
		}
	default:
		return fmt.Errorf("%w: upstream %s: balance %q", ErrInvalid, u.Name, t.Balance.Policy)
	}
	if _, err := input.Count("retries", t.Retries, chain.MaxRetries); err != nil {
		return invalid(err)
	}
	return nil
}

// quote single-quotes a validated value: HAProxy reads it literally.
func quote(s string) string { return "'" + s + "'" }

// anchored makes an RE2 pattern match the whole value, as Envoy's regex
// matches do (HAProxy's -m reg searches).
func anchored(re string) string { return quote("^(?:" + re + ")$") }

// matchCond renders a route's match as anonymous ACLs, ANDed.
func matchCond(m chain.Match) string {
	var parts []string
	ci := ""
	if m.CaseInsensitive {
		ci = "-i "
	}
	switch {
	case m.PathExact != "":
		parts = append(parts, "{ path "+ci+"-m str "+quote(m.PathExact)+" }")
	case m.PathPrefix != "" && m.PathPrefix != "/":
		parts = append(parts, "{ path "+ci+"-m beg "+quote(m.PathPrefix)+" }")
	case m.PathRegex != "":
		parts = append(parts, "{ path "+ci+"-m reg "+anchored(m.PathRegex)+" }")
	}
	for _, h := range m.Headers {
		var c string
		f := "req.fhdr(" + h.Name + ")"
		switch h.Kind {
		case chain.Present:
			c = "{ " + f + " -m found }"
		case chain.Exact:
			c = "{ " + f + " -m str " + quote(h.Value) + " }"
		case chain.Prefix:
			c = "{ " + f + " -m beg " + quote(h.Value) + " }"
		case chain.Suffix:
			c = "{ " + f + " -m end " + quote(h.Value) + " }"
		case chain.Regex:
			c = "{ " + f + " -m reg " + anchored(h.Value) + " }"
		}
		if h.Invert {
			c = "!" + c
		}
		parts = append(parts, c)
	}
	for _, q := range m.Query {
		f := "url_param(" + q.Name + ")"
		switch q.Kind {
		case chain.Present:
			parts = append(parts, "{ "+f+" -m found }")
		case chain.Exact:
			parts = append(parts, "{ "+f+" -m str "+quote(q.Value)+" }")
		case chain.Regex:
			parts = append(parts, "{ "+f+" -m reg "+anchored(q.Value)+" }")
		}
	}
	if len(m.Methods) > 0 {
		parts = append(parts, "{ method "+strings.Join(m.Methods, " ")+" }")
	}
	return strings.Join(parts, " ")
}

// renderRouting writes an upstream frontend's routing rules.
func renderRouting(w func(string, ...any), u Upstream) {
	r := u.Routing
	for i, rt := range r.Routes {
		cond := matchCond(rt.Match)
		if i > 0 {
			cond = strings.TrimSpace("!{ var(" + routeVar + ") -m found } " + cond)
		}
		if cond != "" {
			cond = " if " + cond
		}
		w("    http-request set-var(%s) str(%s)%s", routeVar, RouteID(i), cond)
	}
	w("    http-request set-var(%s) rand(%d)", bucketVar, ChainBuckets)
	w("    http-request set-var(%s) var(%s),concat(/,%s,),map(%s)", backendVar, routeVar, bucketVar, r.Map)
	for _, t := range r.Targets {
		p := r.Backends[t.Name]
		for _, f := range t.Failover {
			fb := r.Backends[f]
			w("    http-request set-var(%s) str(%s) if { var(%s) -m str %s } !{ nbsrv(%s) gt 0 } { nbsrv(%s) gt 0 }", backendVar, fb, backendVar, p, p, fb)
		}
	}
	for i, rt := range r.Routes {
		d := rt.Dest
		on := fmt.Sprintf(" if { var(%s) -m str %s }", routeVar, RouteID(i))
		if d.PrefixRewrite != "" {
			prefix := rt.Match.PathPrefix
			if prefix == "" {
				prefix = rt.Match.PathExact
			}
			w("    http-request replace-path %s %s%s", quote("^"+regexp.QuoteMeta(prefix)+"(.*)"), quote(d.PrefixRewrite+`\1`), on)
		}
		renderMods(w, "http-request", d.RequestHeaders, on)
		renderMods(w, "http-response", d.ResponseHeaders, on)
	}
	w("    use_backend %%[var(%s)] if { var(%s) -m found }", backendVar, backendVar)
}

// renderRoutedLimit writes a routed upstream's limits (n requests in
// progress): the sum of be_conn over the upstream's own backend and every
// target backend, which is every backend its frontend can pick. be_conn
// counts the streams a backend holds, one per HTTP request from the moment
// use_backend assigns it until it ends, whatever connection carries it,
// so the sum is the upstream's requests in progress. The frontend-level
// samples count something else on 2.6: fe_conn and a stick table's
// conn_cur count client connections, idle kept-alive ones included, and
// one h2c connection carries many requests. Envoy applies the limits to
// each cluster of the chain; here the upstream as a whole gets n, so a
// split never lets more than n requests through where Envoy would let n
// per target. As for a plain upstream, the count is read before this
// request is assigned, so simultaneous arrivals on different threads can
// pass n by a few.
func renderRoutedLimit(w func(string, ...any), u Upstream, n int) {
	bes := make([]string, 0, len(u.Routing.Backends))
	for _, be := range u.Routing.Backends {
		if be != u.Name && !slices.Contains(bes, be) {
			bes = append(bes, be)
		}
	}
	slices.Sort(bes)
	w("    http-request set-var(%s) be_conn(%s)", activeVar, u.Name)
	for _, be := range bes {
		w("    http-request set-var(%s) be_conn(%s),add(%s)", activeVar, be, activeVar)
	}
	w("    http-request deny deny_status 503 if { var(%s) -m int ge %d }", activeVar, n)
}

func renderMods(w func(string, ...any), rule string, h chain.HeaderMods, on string) {
	for _, n := range h.Remove {
		w("    %s del-header %s%s", rule, quote(n), on)
	}
	for _, x := range h.Set {
		w("    %s set-header %s %s%s", rule, quote(x.Name), quote(x.Value), on)
	}
	for _, x := range h.Add {
		w("    %s add-header %s %s%s", rule, quote(x.Name), quote(x.Value), on)
	}
}

// balanceLine is a target backend's balance algorithm. A consistent hash
// keeps a key on its server when servers come and go (as ring_hash and
// maglev do in Envoy); HAProxy's consistent hash accepts weight changes
// at run time, which the slots need.
func balanceLines(b chain.Balance) []string {
	switch b.Policy {
	case chain.LeastRequest:
		return []string{"balance leastconn"}
	case chain.Random:
		return []string{"balance random"}
	case chain.Hash:
		var on string
		switch b.HashOn {
		case chain.HashSourceIP:
			on = "src"
		case chain.HashHeader:
			on = "req.hdr(" + b.HashName + ")"
		case chain.HashCookie:
			on = "req.cook(" + b.HashName + ")"
		case chain.HashQuery:
			on = "url_param(" + b.HashName + ")"
		}
		return []string{"balance hash " + on, "hash-type consistent"}
	}
	return []string{"balance roundrobin"}
}

// retryOn is a target backend's retry-on list. empty-response stays in
// it whatever the routes say: it is what hides the other sidecar's
// reloads and an application that resets a connection (README, "What is
// retried").
func retryOn(t *TargetBackend) string {
	s := "conn-failure empty-response"
	if t.NoConnFailure {
		s = "empty-response"
	}
	for _, c := range t.RetryOn {
		s += " " + strconv.Itoa(c)
	}
	return s
}

// TargetBackendName is the backend of chain target target of upstream
// name: "<upstream>:<service>:<subset>:<dc>".
func TargetBackendName(name, target string) string { return name + ":" + target }

// NewRouting is upstream name's routing over c with the chain map at
// mapPath, and what each target's backend adds (by target Name): its
// balance, and the retries of the routes that reach it. A target reached
// by several routes retries as the most insistent of them: retries are a
// backend setting in HAProxy 2.6, not a per-request one.
func NewRouting(name string, c chain.Chain, mapPath string) (Routing, map[string]TargetBackend) {
	r := Routing{Map: mapPath, Routes: c.Routes, Targets: c.Targets, Backends: map[string]string{}}
	tbs := map[string]TargetBackend{}
	for _, t := range c.Targets {
		r.Backends[t.Name] = TargetBackendName(name, t.Name)
		tbs[t.Name] = TargetBackend{Balance: t.Balance, Map: mapPath}
	}
	// connRetry: a route reaching the target retries failed connections
	// (RetryOnConnectFailure, or no retry policy at all).
	reached, connRetry := map[string]bool{}, map[string]bool{}
	for _, rt := range c.Routes {
		d := rt.Dest
		policy := d.NumRetries > 0 || len(d.RetryOnStatusCodes) > 0 || d.RetryOnConnectFailure
		for _, s := range rt.Splits {
			reached[s.Target] = true
			if !policy || d.RetryOnConnectFailure {
				connRetry[s.Target] = true
			}
			tb := tbs[s.Target]
			tb.Retries = max(tb.Retries, rt.Dest.NumRetries)
			for _, code := range rt.Dest.RetryOnStatusCodes {
				if !slices.Contains(tb.RetryOn, code) {
					tb.RetryOn = append(tb.RetryOn, code)
				}
			}
			slices.Sort(tb.RetryOn)
			tbs[s.Target] = tb
		}
	}
	for name, tb := range tbs {
		tb.NoConnFailure = reached[name] && !connRetry[name]
		tbs[name] = tb
	}
	return r, tbs
}

// checkMatchValue validates the value a route's header or query match
// (what) compares with: a regex, or a value, none for a presence match.
func checkMatchValue(what string, kind chain.Kind, v string) error {
	var err error
	switch kind {
	case chain.Present:
	case chain.Regex:
		_, err = input.Regex(what+" regex", v)
	default:
		_, err = input.HeaderValue(what+" value", v)
	}
	return err
}
