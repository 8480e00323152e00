package l7

import (
	"fmt"

	"github.com/hashicorp/consul/api"
)

// Table is the L7 view of one destination's intentions: for each source
// whose governing intention has Permissions, that intention. It is built
// from the service-intentions config entries of the destination and of
// "*", and is immutable: a change builds a new Table.
type Table struct {
	// entries by precedence (Consul CE, structs.Intention.UpdatePrecedence):
	// destination exact before "*", then source exact before "*".
	destExact, destWild map[string]source
}

// source is one source's governing intention: L7 (in) or not (an L4
// Action, which Consul's authorize decides), or refused (err).
type source struct {
	in  *Intention
	err error
}

// Lookup is the L7 answer for one source.
type Lookup struct {
	// Intention is the source's L7 intention; nil when the intention that
	// governs the source is L4 (or there is none): Consul's L4 decision
	// stands then.
	Intention *Intention
	// Err is set when the governing intention has permissions that were
	// refused (see Parse): every request of the source is denied.
	Err error
}

// Build returns the table for destination dest from the config entries of
// dest and of "*" (others are ignored). Sources from another namespace,
// partition, peer or sameness group never match a local service's leaf
// here and are skipped. A source whose permissions are refused stays in
// the table with its error (its requests are denied, not let through to a
// lower-precedence intention), and the error is returned for the log.
func Build(dest string, entries []*api.ServiceIntentionsConfigEntry) (*Table, []error) {
	t := &Table{destExact: map[string]source{}, destWild: map[string]source{}}
	var errs []error
	for _, e := range entries {
		if e == nil || !defaultTenancy(e.Partition, e.Namespace) {
			continue
		}
		var into map[string]source
		switch e.Name {
		case dest:
			into = t.destExact
		case "*":
			into = t.destWild
		default:
			continue
		}
		for _, s := range e.Sources {
			if s == nil || s.Peer != "" || s.SamenessGroup != "" || !defaultTenancy(s.Partition, s.Namespace) {
				continue
			}
			if _, dup := into[s.Name]; dup {
				continue // Consul refuses duplicates; keep the first
			}
			if len(s.Permissions) == 0 {
				into[s.Name] = source{}
				continue
			}
			in, err := Parse(s.Name, s.Permissions)
			if err != nil {
				err = fmt.Errorf("destination %s: %w", e.Name, err)
				errs = append(errs, err)
			}
			into[s.Name] = source{in: in, err: err}
		}
	}
	return t, errs
}

func defaultTenancy(partition, namespace string) bool {
	return (partition == "" || partition == "default") && (namespace == "" || namespace == "default")
}

// HasL7 reports whether any source of the table is under an L7
// intention (refused ones included).
func (t *Table) HasL7() bool {
	if t == nil {
		return false
	}
	for _, m := range []map[string]source{t.destExact, t.destWild} {
		for _, s := range m {
			if s.in != nil || s.err != nil {
				return true
			}
		}
	}
	return false
}

// Lookup returns the L7 intention that governs the source service name,
// in Consul's precedence order.
func (t *Table) Lookup(name string) Lookup {
	if t == nil {
		return Lookup{}
	}
	for _, m := range []map[string]source{t.destExact, t.destWild} {
		for _, n := range []string{name, "*"} {
			if s, ok := m[n]; ok {
				return Lookup{Intention: s.in, Err: s.err}
			}
		}
	}
	return Lookup{}
}
