package controller

import (
	"net/netip"

	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/slots"
)

// The slot-to-instance map and the state map (bootstrap maps.go) live in
// the state directory under these names. "haproxy-connect status" reads
// them from HAProxy, never from disk.
const (
	InstanceMapFile = "instances.map"
	StateMapFile    = "state.map"
	// StartReason is the state map's reload reason of a configuration
	// HAProxy was started with.
	StartReason = "start"
)

// InstanceMapCommands are the runtime commands that keep the instance map
// in file current for ops, the slot operations that take backend to next:
// for every slot an op points elsewhere, puts in or out of service, or
// adds, the slot's new value (bootstrap.InstanceValue of the instance
// that insts, by endpoint key, names for it; bootstrap.FreeSlot for a
// parked slot). A slot added with "add server" has no entry yet: "add map".
// The commands go in the same batch as ops, after them.
//
// An instance that changes its ID but keeps its address and port gets no
// op, so no new value: the map names the ID the slot was filled with.
func InstanceMapCommands(file, backend string, ops []slots.Op, next slots.Table, insts map[netip.AddrPort]instance) ([]runtime.Command, []error) {
	added := map[string]bool{}
	var order []string
	for _, op := range ops {
		switch op.Kind {
		case slots.OpSetAddr, slots.OpReady, slots.OpMaint, slots.OpAdd:
		default:
			continue
		}
		if _, seen := added[op.Server]; !seen {
			order = append(order, op.Server)
			added[op.Server] = false
		}
		if op.Kind == slots.OpAdd {
			added[op.Server] = true
		}
	}
	if len(order) == 0 {
		return nil, nil
	}
	byName := make(map[string]slots.Slot, len(order))
	for _, s := range next.Slots {
		if _, ok := added[s.Name]; ok {
			byName[s.Name] = s
		}
	}
	var cmds []runtime.Command
	var errs []error
	for _, name := range order {
		s := byName[name]
		value := bootstrap.FreeSlot
		if s.Used {
			var id string
			if k, ok := endpointKey(s.Addr, s.Port); ok {
				id = insts[k].id
			}
			value = bootstrap.InstanceValue(id, s.Addr, s.Port)
		}
		build := runtime.SetMap
		if added[name] {
			build = runtime.AddMap
		}
		cmd, err := build(file, bootstrap.InstanceKey(backend, name), value)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		cmds = append(cmds, cmd)
	}
	return cmds, errs
}

// instanceMapCommands is InstanceMapCommands for the controller's instance
// map and the upstream's current instances; a command it cannot build is
// logged (the slots move anyway).
func (c *Controller) instanceMapCommands(backend string, ops []slots.Op, next slots.Table) []runtime.Command {
	cmds, errs := InstanceMapCommands(c.path(InstanceMapFile), backend, ops, next, c.desired.instances[backend])
	for _, err := range errs {
		c.log.Error("instance map entry not built", zap.String("upstream", backend), zap.Error(err))
	}
	return cmds
}

// checkInstanceMap logs and counts the instance map commands of a batch
// that failed. A failure leaves the slots as they are (they serve): only
// the names in status and the access log are stale until the slot moves
// again or HAProxy reloads, which renders the map anew. An HAProxy started
// by a version without the map answers "Unknown map identifier".
func (c *Controller) checkInstanceMap(rs runtime.Results) {
	if err := rs.Err(); err != nil {
		c.metrics.runtimeErrors.Add(1)
		c.log.Warn("instance map not updated", zap.Error(err))
	}
}

// instanceIDs is the Consul instance ID of each endpoint of insts, by
// endpoint key, for rendering the instance map.
func instanceIDs(insts map[netip.AddrPort]instance) map[string]string {
	out := make(map[string]string, len(insts))
	for k, in := range insts {
		out[k.String()] = in.id
	}
	return out
}
