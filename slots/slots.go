// Package slots assigns an upstream's endpoints to the server slots of its
// HAProxy backend and plans the operations that move the slots from the
// applied assignment to the desired one. It is pure: no I/O, and it knows
// neither Consul nor the runtime socket (the controller translates Ops).
package slots

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"

	"github.com/haproxy-connect/haproxy-connect/input"
)

// ParkAddr and ParkPort are where a slot that never served points: nothing
// listens on port 1, and the slot is in maintenance anyway. A slot that
// served and was freed is only put in maintenance and keeps its last
// address (one master CLI command instead of two). Slots are never deleted
// ("del server" can crash 2.6 while streams still use the server, haproxy
// GH #2298): they are parked and reused.
const (
	ParkAddr = "127.0.0.1"
	ParkPort = 1
)

// MaxWeight is HAProxy's largest server weight; Consul allows up to 65535.
const MaxWeight = input.MaxWeight

// Endpoint is one healthy instance of an upstream. Its identity is Key():
// the address and port HAProxy connects to, which is also what HAProxy
// reports, so an applied table can be rebuilt from "show servers state".
type Endpoint struct {
	Addr   string
	Port   int
	Weight int
}

// Key identifies the endpoint.
func (e Endpoint) Key() string {
	return netip.AddrPortFrom(netip.MustParseAddr(e.Addr), uint16(e.Port)).String()
}

// Compare orders endpoints by address (numerically), then port.
func (e Endpoint) Compare(o Endpoint) int {
	return netip.AddrPortFrom(netip.MustParseAddr(e.Addr), uint16(e.Port)).Compare(netip.AddrPortFrom(netip.MustParseAddr(o.Addr), uint16(o.Port)))
}

// addrPort is Key as a comparable value, which Plan keys its maps with:
// equal exactly when the keys are, without formatting a string.
func addrPort(addr string, port int) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr(addr), uint16(port))
}

// Validate rejects an endpoint the runtime API cannot take.
func (e Endpoint) Validate() error {
	if _, err := netip.ParseAddr(e.Addr); err != nil {
		return fmt.Errorf("endpoint address %q is not an IP literal", e.Addr)
	}
	if e.Port < 1 || e.Port > 65535 {
		return fmt.Errorf("endpoint %s port %d out of range 1-65535", e.Addr, e.Port)
	}
	if e.Weight < 1 {
		return fmt.Errorf("endpoint %s:%d weight %d below 1", e.Addr, e.Port, e.Weight)
	}
	return nil
}

// Slot is one server of the backend.
type Slot struct {
	Name    string
	Dynamic bool   // added with "add server"; becomes a template slot at the next reload
	Weight  int    // the weight HAProxy has for it
	Used    bool   // serving Endpoint; otherwise parked in maint
	Addr    string // where HAProxy points it (a parked slot: its last endpoint, or ParkAddr)
	Port    int
}

// Key is the endpoint key of a used slot.
func (s Slot) Key() string {
	return Endpoint{Addr: s.Addr, Port: s.Port}.Key()
}

// parkedKey is the endpoint a free slot still points at, if its address
// (which may come from HAProxy, see FromObserved) is one.
func (s Slot) parkedKey() (netip.AddrPort, bool) {
	a, err := input.Addr(input.FieldAddress, s.Addr)
	if err != nil {
		return netip.AddrPort{}, false
	}
	p, err := input.Port(input.FieldPort, s.Port)
	if err != nil {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(a, p), true
}

// Table is the assignment of one backend's slots. It is a value: Plan
// returns a new Table and never changes the one it is given.
type Table struct {
	Backend string
	Prefix  string // server-template prefix: slot i is Prefix+(i+1)
	Slots   []Slot
}

// New returns a table of n parked template slots.
func New(backend, prefix string, n int) Table {
	t := Table{Backend: backend, Prefix: prefix, Slots: make([]Slot, n)}
	for i := range t.Slots {
		t.Slots[i] = Slot{Name: prefix + strconv.Itoa(i+1), Weight: 1, Addr: ParkAddr, Port: ParkPort}
	}
	return t
}

// Used counts the slots serving an endpoint.
func (t Table) Used() int {
	n := 0
	for _, s := range t.Slots {
		if s.Used {
			n++
		}
	}
	return n
}

// Endpoints lists the endpoints the table serves, sorted by key.
func (t Table) Endpoints() []Endpoint {
	var out []Endpoint
	for _, s := range t.Slots {
		if s.Used {
			out = append(out, Endpoint{Addr: s.Addr, Port: s.Port, Weight: s.Weight})
		}
	}
	slices.SortFunc(out, Endpoint.Compare)
	return out
}

// Clone returns a deep copy.
func (t Table) Clone() Table {
	t.Slots = slices.Clone(t.Slots)
	return t
}

// OpKind is what an Op does to a slot.
type OpKind int

// The operations, in the order they are worth reading in a transcript.
const (
	OpSetAddr   OpKind = iota // set server addr/port
	OpSetWeight               // set server weight
	OpReady                   // set server state ready
	OpMaint                   // set server state maint
	OpAdd                     // add server (a new dynamic slot; starts in maint)
)

// Op is one runtime operation on one slot.
type Op struct {
	Kind   OpKind
	Server string
	Addr   string
	Port   int
	Weight int
}

// Plan computes the operations that take applied to serve desired, and the
// table reached when they all succeed. Invalid endpoints are returned as
// rejected, with a reason, and left out; duplicates (same key) are merged,
// keeping the highest weight. Weights above MaxWeight are clamped.
//
// Order matters for traffic, and every command is a master CLI round trip
// to the worker (meshbench churn: most of the sidecar's own share of
// propagation). A removed endpoint's slot goes straight to a new endpoint:
// one "set server addr" (and a weight, if it differs), and the slot never
// leaves service, so capacity never dips. Other new endpoints go into free
// slots, first one that still points at them (an endpoint whose health
// flapped comes back with one "state ready"), then weights change, then
// the removed endpoints left over are parked ("state maint" only: the slot
// keeps its address), and only when every slot is taken does the backend
// grow with "add server". An endpoint keeps its slot while it lives.
func Plan(applied Table, desired []Endpoint) (ops []Op, next Table, rejected []error) {
	// want indexes desired by key (an index is a fifth of an Endpoint's
	// size, and the map is built on every plan).
	want := make(map[netip.AddrPort]int, len(desired))
	endpoint := func(i int) Endpoint {
		e := desired[i]
		e.Weight = min(e.Weight, MaxWeight)
		return e
	}
	for i, e := range desired {
		if err := e.Validate(); err != nil {
			rejected = append(rejected, err)
			continue
		}
		k := addrPort(e.Addr, e.Port)
		if j, ok := want[k]; ok && endpoint(j).Weight >= endpoint(i).Weight {
			continue
		}
		want[k] = i
	}

	next = applied.Clone()
	var free, freed []int
	for i, s := range next.Slots {
		if !s.Used {
			free = append(free, i)
			continue
		}
		k := addrPort(s.Addr, s.Port)
		if j, ok := want[k]; ok {
			if e := endpoint(j); e.Weight != s.Weight {
				ops = append(ops, Op{Kind: OpSetWeight, Server: s.Name, Weight: e.Weight})
				next.Slots[i].Weight = e.Weight
			}
			delete(want, k)
			continue
		}
		freed = append(freed, i)
	}

	// New endpoints in a stable order, so that plans are reproducible.
	keys := make([]netip.AddrPort, 0, len(want))
	for k := range want {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, netip.AddrPort.Compare)
	adds := make([]Endpoint, 0, len(keys))
	for _, k := range keys {
		adds = append(adds, endpoint(want[k]))
	}

	// fill points slot i at e (unless it already does: a parked slot keeps
	// its address); a free slot is then put in service, a slot changing
	// hands never left it.
	fill := func(i int, e Endpoint) {
		s := &next.Slots[i]
		if s.Addr != e.Addr || s.Port != e.Port {
			ops = append(ops, Op{Kind: OpSetAddr, Server: s.Name, Addr: e.Addr, Port: e.Port})
		}
		if s.Weight != e.Weight {
			ops = append(ops, Op{Kind: OpSetWeight, Server: s.Name, Weight: e.Weight})
		}
		if !s.Used {
			ops = append(ops, Op{Kind: OpReady, Server: s.Name})
		}
		s.Used, s.Addr, s.Port, s.Weight = true, e.Addr, e.Port, e.Weight
	}

	// Free slots still pointing at a new endpoint: it comes back with
	// "state ready" alone there, so slots changing hands go to the others
	// first.
	parked := map[netip.AddrPort]int{}
	for _, i := range free {
		if k, ok := next.Slots[i].parkedKey(); ok {
			parked[k] = i
		}
	}
	var back []Endpoint
	adds = slices.DeleteFunc(adds, func(e Endpoint) bool {
		if _, ok := parked[addrPort(e.Addr, e.Port)]; ok {
			back = append(back, e)
			return true
		}
		return false
	})
	adds = append(adds, back...)

	// Weight changes were appended above; slots changing hands and fills
	// of free slots come first.
	weightOps := ops
	ops = nil
	for len(adds) > 0 && len(freed) > 0 {
		fill(freed[0], adds[0])
		freed, adds = freed[1:], adds[1:]
	}
	adds = slices.DeleteFunc(adds, func(e Endpoint) bool {
		i, ok := parked[addrPort(e.Addr, e.Port)]
		if ok {
			fill(i, e)
		}
		return ok
	})
	free = slices.DeleteFunc(free, func(i int) bool { return next.Slots[i].Used })
	for len(adds) > 0 && len(free) > 0 {
		fill(free[0], adds[0])
		free, adds = free[1:], adds[1:]
	}
	ops = append(ops, weightOps...)
	for _, i := range freed {
		s := &next.Slots[i]
		ops = append(ops, Op{Kind: OpMaint, Server: s.Name})
		s.Used = false
	}
	for _, e := range adds {
		name := next.Prefix + strconv.Itoa(len(next.Slots)+1)
		ops = append(ops,
			Op{Kind: OpAdd, Server: name, Addr: e.Addr, Port: e.Port, Weight: e.Weight},
			Op{Kind: OpReady, Server: name})
		next.Slots = append(next.Slots, Slot{Name: name, Dynamic: true, Used: true, Addr: e.Addr, Port: e.Port, Weight: e.Weight})
	}
	return ops, next, rejected
}

// Observed is one server as HAProxy reports it.
type Observed struct {
	Name   string
	Addr   string
	Port   int
	Weight int
	Maint  bool
}

// FromObserved rebuilds a table from what HAProxy reports, after a batch
// failed part way: a server in maintenance is a free slot, any other serves
// its address. Servers whose names are not Prefix<N> are ignored; slot
// numbers beyond templates are dynamic.
func FromObserved(backend, prefix string, templates int, obs []Observed) Table {
	t := Table{Backend: backend, Prefix: prefix}
	byIndex := map[int]Observed{}
	maxIdx := 0
	for _, o := range obs {
		if len(o.Name) <= len(prefix) || o.Name[:len(prefix)] != prefix {
			continue
		}
		n, err := strconv.Atoi(o.Name[len(prefix):])
		if err != nil || n < 1 {
			continue
		}
		byIndex[n] = o
		maxIdx = max(maxIdx, n)
	}
	for n := 1; n <= maxIdx; n++ {
		o, ok := byIndex[n]
		s := Slot{Name: prefix + strconv.Itoa(n), Dynamic: n > templates, Weight: 1, Addr: ParkAddr, Port: ParkPort}
		if ok {
			s.Weight = o.Weight
			if !o.Maint {
				s.Used, s.Addr, s.Port = true, o.Addr, o.Port
			} else {
				s.Addr, s.Port = o.Addr, o.Port
			}
		}
		t.Slots = append(t.Slots, s)
	}
	return t
}

// Size is the number of template slots to render at a reload for a backend
// serving used endpoints: room for a quarter more (a rolling deployment's
// usual surge), at most MaxHeadroom more, before "add server" is needed; at
// least minSlots. Not rounded up: on 2.6 every slot under an ssl
// default-server holds its own TLS context, parked or not, so the headroom
// is memory, paid for the life of the configuration; a server added past
// it is equal to a slot (same TLS settings and passive check), costs one
// more command once, and is parked and reused like one until the next
// reload sizes the template again.
func Size(used, minSlots int) int {
	return max(minSlots, used+min((used+3)/4, MaxHeadroom), 1)
}

// MaxHeadroom caps the parked slots Size adds: a quarter of a thousand
// endpoints would be 250 TLS contexts held in case of a surge, where 64
// cover most surges, and the endpoints past them in a larger one are
// placed with "add server", still without a reload.
const MaxHeadroom = 64

// Resize returns a table of size template slots serving the same endpoints,
// for rendering into the configuration of a reload. An endpoint keeps its
// slot when the slot is within size; the others move to the lowest free
// slots. size must be at least t.Used().
func Resize(t Table, size int) Table {
	out := New(t.Backend, t.Prefix, size)
	var moved []Slot
	for i, s := range t.Slots {
		switch {
		case !s.Used:
		case i < size:
			out.Slots[i].Used, out.Slots[i].Addr, out.Slots[i].Port, out.Slots[i].Weight = true, s.Addr, s.Port, s.Weight
		default:
			moved = append(moved, s)
		}
	}
	for i := range out.Slots {
		if len(moved) == 0 {
			break
		}
		if !out.Slots[i].Used {
			s := moved[0]
			out.Slots[i].Used, out.Slots[i].Addr, out.Slots[i].Port, out.Slots[i].Weight = true, s.Addr, s.Port, s.Weight
			moved = moved[1:]
		}
	}
	return out
}
