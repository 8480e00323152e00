// Package intentions decides, as Consul's agent does for L4, whether a
// source service may connect to one destination, from the intentions Consul
// serves for that destination and the agent's default policy. It is pure:
// callers fetch the intentions (spoa's watch) and publish a Set; it does no
// I/O and knows nothing of certificates or HAProxy.
//
// The semantics are those of Consul 1.22.3's /v1/agent/connect/authorize
// (agent/agent_endpoint.go AgentConnectAuthorize): take the destination's
// intentions from /v1/connect/intentions/match?by=destination in precedence
// order (agent/structs/intention.go IntentionPrecedenceSorter), the first
// whose source matches (agent/connect/authz.go IntentionMatch) decides:
// allow only if its Action is "allow", or, if it has L7 Permissions, a
// connection-level deny ("Matched L7 intention"); with none matching, the
// agent's default_intention_policy if set, else the ACL default policy
// (allow when ACLs are disabled).
package intentions

import (
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/input"
)

// Wildcard is Consul's wildcard for a name or a namespace.
const Wildcard = "*"

// Peer is a service identity as a local leaf certificate carries it
// (spiffe://<td>/[ap/<partition>/]ns/<ns>/dc/<dc>/svc/<service>), already
// checked (certs.ParseSPIFFE). Partition "" counts as "default", as in
// Consul. A source of the destination's own cluster has no peer name.
type Peer struct {
	Partition, Namespace, Service string
}

// Verdict is what one intention, or the default, says of a connection.
type Verdict int

const (
	Deny  Verdict = iota
	Allow         // an L4 intention with Action "allow", or the default allow
	// L7 is an intention with Permissions: it decides per HTTP request.
	// For a connection as a whole Consul's authorize answers deny; so does
	// Decision.Allowed.
	L7
)

func (v Verdict) String() string {
	switch v {
	case Allow:
		return "allow"
	case L7:
		return "l7"
	}
	return "deny"
}

// Intention is one intention as the decision needs it, with Precedence
// computed here from its names (Consul's UpdatePrecedence) rather than
// taken from the answer.
type Intention struct {
	ID                                                                     string
	SourceSamenessGroup, SourcePeer, SourcePartition, SourceNS, SourceName string
	DestinationPartition, DestinationNS, DestinationName                   string
	// Action is Consul's, as served: only "allow" allows (Consul compares
	// it the same way), anything else is a deny.
	Action      string
	Permissions []*api.IntentionPermission
	Precedence  int
}

// String names the intention as Consul's reasons do (structs.Intention.String).
func (x *Intention) String() string {
	var id, src, dst, detail string
	if x.ID != "" {
		id = "ID: " + x.ID + ", "
	}
	if x.SourcePartition != "" {
		src = x.SourcePartition + "/"
	}
	if x.SourcePeer != "" {
		src = "peer(" + x.SourcePeer + ")/"
	}
	if x.SourceSamenessGroup != "" {
		src = "sameness-group(" + x.SourceSamenessGroup + ")/"
	}
	if x.DestinationPartition != "" {
		dst = x.DestinationPartition + "/"
	}
	if len(x.Permissions) > 0 {
		detail = fmt.Sprintf("Permissions: %d", len(x.Permissions))
	} else {
		detail = "Action: " + strings.ToUpper(x.Action)
	}
	return fmt.Sprintf("%s%s/%s => %s%s/%s (%sPrecedence: %d, %s)",
		src, x.SourceNS, x.SourceName, dst, x.DestinationNS, x.DestinationName, id, x.Precedence, detail)
}

// verdict is what the intention says of a source it matches.
func (x *Intention) verdict() Verdict {
	switch {
	case len(x.Permissions) > 0:
		return L7
	case x.Action == string(api.IntentionActionAllow):
		return Allow
	}
	return Deny
}

// matches is Consul's IntentionMatch for a source (agent/connect/authz.go):
// no peer on either side, the same partition ("" is "default"), the same
// namespace or "*", the same name or "*". A source sameness group is not
// looked at, as Consul does not.
func (x *Intention) matches(p Peer) bool {
	return x.SourcePeer == "" &&
		partitionOrDefault(x.SourcePartition) == partitionOrDefault(p.Partition) &&
		(x.SourceNS == Wildcard || x.SourceNS == p.Namespace) &&
		(x.SourceName == Wildcard || x.SourceName == p.Service)
}

func partitionOrDefault(p string) string {
	if p == "" {
		return "default"
	}
	return p
}

// precedence is Consul's Intention.UpdatePrecedence: 9 for an exact
// destination and exact source, down to 1 for "*/*" on both sides; the
// destination's exactness counts first.
func precedence(x *Intention) int {
	var top int
	switch countExact(x.DestinationNS, x.DestinationName) {
	case 2:
		top = 9
	case 1:
		top = 6
	default:
		top = 3
	}
	return top - (2 - countExact(x.SourceNS, x.SourceName))
}

// countExact counts the exact values in (namespace, name), as Consul does:
// a wildcard namespace makes both wildcards.
func countExact(ns, name string) int {
	switch {
	case ns == Wildcard:
		return 0
	case name == Wildcard:
		return 1
	}
	return 2
}

// less is Consul's IntentionPrecedenceSorter: higher precedence first,
// then the lexicographic order of (sameness group, peer, partition,
// namespace, name) of the source and (partition, namespace, name) of the
// destination.
func less(a, b *Intention) int {
	if a.Precedence != b.Precedence {
		return b.Precedence - a.Precedence
	}
	for _, p := range [][2]string{
		{a.SourceSamenessGroup, b.SourceSamenessGroup}, {a.SourcePeer, b.SourcePeer},
		{a.SourcePartition, b.SourcePartition}, {a.SourceNS, b.SourceNS}, {a.SourceName, b.SourceName},
		{a.DestinationPartition, b.DestinationPartition}, {a.DestinationNS, b.DestinationNS},
	} {
		if c := strings.Compare(p[0], p[1]); c != 0 {
			return c
		}
	}
	return strings.Compare(a.DestinationName, b.DestinationName)
}

// Default is what applies when no intention matches.
type Default struct {
	Allow bool
	// Reason is Consul's: "Default intention policy" or "Default behavior
	// configured by ACLs".
	Reason string
}

// AgentConfig is the part of the agent's configuration the default comes
// from, as /v1/agent/self serves it in DebugConfig: DefaultIntentionPolicy,
// ACLsEnabled and ACLResolverSettings.ACLDefaultPolicy.
type AgentConfig struct {
	DefaultIntentionPolicy string
	ACLsEnabled            bool
	ACLDefaultPolicy       string
}

// DefaultOf is the default decision of an agent configured as c, as
// AgentConnectAuthorize makes it: default_intention_policy when set, else
// the ACL default policy; with ACLs disabled the agent's authorizer allows
// everything (acl.ManageAll), so the default is allow. A value Consul would
// not start with is an error.
func DefaultOf(c AgentConfig) (Default, error) {
	switch c.DefaultIntentionPolicy {
	case "allow", "deny":
		return Default{Allow: c.DefaultIntentionPolicy == "allow", Reason: "Default intention policy"}, nil
	case "":
	default:
		return Default{}, fmt.Errorf("default_intention_policy %q is neither allow nor deny", c.DefaultIntentionPolicy)
	}
	if !c.ACLsEnabled {
		return Default{Allow: true, Reason: "Default behavior configured by ACLs"}, nil
	}
	switch c.ACLDefaultPolicy {
	case "allow", "deny":
		return Default{Allow: c.ACLDefaultPolicy == "allow", Reason: "Default behavior configured by ACLs"}, nil
	}
	return Default{}, fmt.Errorf("ACL default_policy %q is neither allow nor deny", c.ACLDefaultPolicy)
}

// Set is the intentions of one destination and the default, in decision
// order. Immutable once built: publish a new one on a change.
type Set struct {
	dest Peer
	list []Intention
	// reasons[i] is Decide's reason when list[i] matches, made once by
	// New rather than on each decision (a first decision for a source is
	// on HAProxy's wait).
	reasons []string
	def     Default
}

// New builds the Set for destination dest (partition "" is "default") from
// the intentions Consul served for it, in any order. Consul's answer is
// hostile input: an intention that does not name dest (or "*") as its
// destination, or whose source names are neither "*" nor valid names
// (package input), is left out and reported in skipped. Leaving it out
// changes no decision: Consul's match would not have returned the first
// kind, and the second cannot match a source, whose names are checked
// with the same rules before Decide sees them.
func New(dest Peer, served []*api.Intention, def Default) (s *Set, skipped []error) {
	s = &Set{dest: dest, def: def, list: make([]Intention, 0, len(served))}
	for i, a := range served {
		if a == nil {
			skipped = append(skipped, fmt.Errorf("intention %d: null", i))
			continue
		}
		x := Intention{
			ID: a.ID, SourceSamenessGroup: a.SourceSamenessGroup, SourcePeer: a.SourcePeer,
			SourcePartition: a.SourcePartition, SourceNS: a.SourceNS, SourceName: a.SourceName,
			DestinationPartition: a.DestinationPartition, DestinationNS: a.DestinationNS, DestinationName: a.DestinationName,
			Action: string(a.Action), Permissions: a.Permissions,
		}
		if err := s.check(&x); err != nil {
			skipped = append(skipped, fmt.Errorf("intention %q: %w", x.ID, err))
			continue
		}
		x.Precedence = precedence(&x)
		s.list = append(s.list, x)
	}
	slices.SortStableFunc(s.list, func(a, b Intention) int { return less(&a, &b) })
	s.reasons = make([]string, len(s.list))
	for i := range s.list {
		s.reasons[i] = matchedReason(&s.list[i])
	}
	return s, skipped
}

// matchedReason is Decide's reason when x matches, as Consul words it.
func matchedReason(x *Intention) string {
	kind := "L4"
	if x.verdict() == L7 {
		kind = "L7"
	}
	return "Matched " + kind + " intention: " + x.String()
}

var errNotOurs = errors.New("destination is not this service")

// check refuses an intention New leaves out.
func (s *Set) check(x *Intention) error {
	if partitionOrDefault(x.DestinationPartition) != partitionOrDefault(s.dest.Partition) ||
		(x.DestinationNS != Wildcard && x.DestinationNS != s.dest.Namespace) ||
		(x.DestinationName != Wildcard && x.DestinationName != s.dest.Service) {
		return fmt.Errorf("%w: %s/%s/%s", errNotOurs, x.DestinationPartition, x.DestinationNS, x.DestinationName)
	}
	for _, f := range []struct{ field, v string }{
		{"source name", x.SourceName}, {"source namespace", x.SourceNS},
	} {
		if f.v == Wildcard {
			continue
		}
		if _, err := input.Name("intention "+f.field, f.v); err != nil {
			return err
		}
	}
	if x.SourcePartition != "" {
		if _, err := input.Name("intention source partition", x.SourcePartition); err != nil {
			return err
		}
	}
	return nil
}

// L7 returns the intentions with Permissions, in precedence order (they
// point into s, which is immutable).
func (s *Set) L7() []*Intention {
	var out []*Intention
	for i := range s.list {
		if s.list[i].verdict() == L7 {
			out = append(out, &s.list[i])
		}
	}
	return out
}

// Len is the number of intentions held.
func (s *Set) Len() int { return len(s.list) }

// Default is the decision when no intention matches.
func (s *Set) Default() Default { return s.def }

// Decision is the outcome for one source.
type Decision struct {
	Verdict Verdict
	// Intention is the one that matched, nil for the default. For L7 it
	// holds the Permissions to evaluate per request.
	Intention *Intention
	// Reason says why, in Consul's words ("Matched L4 intention: ...",
	// "Matched L7 intention: ...", "Default intention policy", "Default
	// behavior configured by ACLs").
	Reason string
}

// Allowed is the connection-level answer Consul's authorize endpoint
// gives: true only for an L4 allow or a default allow.
func (d Decision) Allowed() bool { return d.Verdict == Allow }

// Decide decides for the source p: the first intention in precedence
// order whose source matches, else the default.
func (s *Set) Decide(p Peer) Decision {
	for i := range s.list {
		x := &s.list[i]
		if !x.matches(p) {
			continue
		}
		return Decision{Verdict: x.verdict(), Intention: x, Reason: s.reasons[i]}
	}
	v := Deny
	if s.def.Allow {
		v = Allow
	}
	return Decision{Verdict: v, Reason: s.def.Reason}
}

// Equal reports whether s and o decide alike for every source: the same
// destination, default and intentions in the same order. A watch answer
// equal to the held Set needs no invalidation.
func (s *Set) Equal(o *Set) bool {
	if s == nil || o == nil {
		return s == o
	}
	return s.dest == o.dest && s.def == o.def && slices.EqualFunc(s.list, o.list, func(a, b Intention) bool {
		return a.ID == b.ID && a.SourceSamenessGroup == b.SourceSamenessGroup && a.SourcePeer == b.SourcePeer &&
			a.SourcePartition == b.SourcePartition && a.SourceNS == b.SourceNS && a.SourceName == b.SourceName &&
			a.DestinationPartition == b.DestinationPartition && a.DestinationNS == b.DestinationNS &&
			a.DestinationName == b.DestinationName && a.Action == b.Action && a.Precedence == b.Precedence &&
			permissionsEqual(a.Permissions, b.Permissions)
	})
}

// permissionsEqual compares L7 permissions by value: a change to them is a
// change of the Set (the L7 decisions depend on them).
func permissionsEqual(a, b []*api.IntentionPermission) bool { return reflect.DeepEqual(a, b) }
