package runtime

import (
	"fmt"

	"github.com/haproxy-connect/haproxy-connect/slots"
)

// SlotCommand is the runtime command for a planned slot operation; add
// holds the server options of "add server" (its weight is the op's).
func SlotCommand(backend string, op slots.Op, add ServerOptions) (Command, error) {
	switch op.Kind {
	case slots.OpSetAddr:
		return SetServerAddr(backend, op.Server, op.Addr, op.Port)
	case slots.OpSetWeight:
		return SetServerWeight(backend, op.Server, op.Weight)
	case slots.OpReady:
		return SetServerState(backend, op.Server, StateReady)
	case slots.OpMaint:
		return SetServerState(backend, op.Server, StateMaint)
	case slots.OpAdd:
		add.Weight = op.Weight
		return AddServer(backend, op.Server, op.Addr, op.Port, add)
	}
	return Command{}, fmt.Errorf("unknown slot operation %d", op.Kind)
}
