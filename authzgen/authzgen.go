// Package authzgen is the protocol that carries an intentions change to
// connections HAProxy already authorized. The SPOE agent (package spoa)
// answers each "authorize" message with a verdict and the intentions
// generation it was made under; the controller publishes the current
// generation in an HAProxy map (the authz map) at MapKey; the listener
// rules that bootstrap renders ask the agent again when a connection's
// verdict is older than the map's generation. This package owns the names
// the three share and the hand-over of a new generation between the agent
// and the controller (Generation). It does no I/O.
package authzgen

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// Names shared by the SPOE configuration and listener rules (bootstrap),
// the agent (spoa) and the controller's authz map writes.
const (
	// Engine is the SPOE engine (filter id, "spoe-agent <Engine>-agent").
	Engine = "intentions"
	// Group is the SPOE group the listener sends ("send-spoe-group").
	Group = "authz"
	// Message authorizes a connection: HAProxy sends it once per
	// connection (TCP: from a "tcp-request content send-spoe-group" rule;
	// HTTP: on the first request, and again when the connection's verdict
	// is older than the intentions).
	Message = "authorize"
	// ArgCert is the message's argument: the client certificate's DER
	// (ssl_c_der; HAProxy 2.6 cannot read URI SANs itself).
	ArgCert = "cert"
	// ArgL7 is present (a bool) in the Message of an HTTP listener: the
	// listener can decide L7 permissions per request.
	ArgL7 = "l7"
	// ArgNamed is present in the Message of a tcp listener with a
	// sources map, which the controller fills from the agent's allows
	// (2.6's tcp rules cannot write a map): the name the map holds for
	// the client certificate, or NULL when it holds none, which the
	// agent then hands to the controller with its allow.
	ArgNamed = "named"
	// GroupL7 and MessageL7 decide one request of a connection whose
	// source is under an L7 intention (VarL7): its arguments are
	// ArgSource (the verdict's VarSource), ArgMethod, ArgPath (without
	// the query string) and ArgHeaders (req.hdrs_bin).
	GroupL7    = "authz_l7"
	MessageL7  = "authorize_l7"
	ArgSource  = "source"
	ArgMethod  = "method"
	ArgPath    = "path"
	ArgHeaders = "headers"
	// VarL7 (session scope, a bool) marks a connection whose source is
	// under an L7 intention: each request is sent as MessageL7.
	VarL7 = "l7"
	// VarL7Rules (session scope, a string) names the entries of the L7
	// map that decide the connection's requests inside HAProxy (see
	// package l7: the subject is "<VarL7Rules>:<method>:<path>"); unset
	// when there are none. A request the map does not decide goes to
	// the agent as MessageL7.
	VarL7Rules = "l7rules"
	// VarL7Allowed, VarIntention and VarPerm (transaction scope) are a
	// request's L7 verdict, the intention that decided it (its source
	// name) and the permission ("<index>:<allow|deny>", "default" when
	// none matched, "refused" when the intention was refused).
	VarL7Allowed = "l7allowed"
	VarIntention = "intention"
	VarPerm      = "perm"
	// VarPrefix is the SPOE "option var-prefix": the agent's variables
	// are sess.<VarPrefix>.<name>.
	VarPrefix = "hc"
	// VarAllowed is the verdict (a bool); unset when the agent could not
	// decide, and the listener refuses then.
	VarAllowed = "allowed"
	// VarSource is the caller's identity, for the access log.
	VarSource = "source"
	// VarGen is the intentions generation the verdict was made under.
	VarGen = "gen"
	// VarCert (transaction scope, binary) is the SHA-256 of the client
	// certificate's DER, computed once per connection by the listener's
	// rules: the key of its remembered allows, its sources map (as hex)
	// and, on a tcp listener, its connections table (ConnKeyFormat).
	VarCert = "cert"
	// MapKey is the authz map's key holding the current generation.
	MapKey = "gen"
)

// SessVar is the full name of the agent's session variable name, as the
// listener rules read it ("sess.hc.allowed").
func SessVar(name string) string { return "sess." + VarPrefix + "." + name }

// TxnVar is the full name of the agent's transaction variable name
// ("txn.hc.l7allowed").
func TxnVar(name string) string { return "txn." + VarPrefix + "." + name }

// MapContent is the authz map file's content at generation gen.
func MapContent(gen uint64) string { return fmt.Sprintf("%s %d\n", MapKey, gen) }

// Generation hands a new intentions generation from the agent to the
// controller and back: the agent publishes it (Publish) and waits (Wait)
// until the controller has put it in HAProxy's map (Applied), so that no
// connection is allowed under the new intentions while HAProxy still
// counts older verdicts as current. Safe for concurrent use.
type Generation struct {
	want    atomic.Uint64
	kick    chan struct{}
	applied atomic.Uint64
	mu      sync.Mutex
	done    chan struct{} // closed (and replaced) each time applied moves
}

// NewGeneration returns a Generation at 0, applied.
func NewGeneration() *Generation {
	return &Generation{kick: make(chan struct{}, 1), done: make(chan struct{})}
}

// Publish sets the generation HAProxy should have and wakes the
// controller (Kick). It does not block.
func (g *Generation) Publish(gen uint64) {
	g.want.Store(gen)
	select {
	case g.kick <- struct{}{}:
	default:
	}
}

// Wanted is the generation last published.
func (g *Generation) Wanted() uint64 { return g.want.Load() }

// Kick receives after a Publish (one value for any number of them).
func (g *Generation) Kick() <-chan struct{} { return g.kick }

// Applied records that HAProxy has gen and wakes the waiters.
func (g *Generation) Applied(gen uint64) {
	g.applied.Store(gen)
	g.mu.Lock()
	close(g.done)
	g.done = make(chan struct{})
	g.mu.Unlock()
}

// Wait returns true once HAProxy has generation gen (or a later one), or
// false after timeout.
func (g *Generation) Wait(gen uint64, timeout time.Duration) bool {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for g.applied.Load() < gen {
		g.mu.Lock()
		done := g.done
		g.mu.Unlock()
		if g.applied.Load() >= gen {
			return true
		}
		select {
		case <-done:
		case <-t.C:
			return false
		}
	}
	return true
}
