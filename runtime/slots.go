package runtime

import (
	"fmt"

	"github.com/haproxy-connect/haproxy-connect/slots"
)

// SlotCommands are the runtime commands for a planned slot operation; add
// holds the server options of "add server" (its weight is the op's). An
// added server with a passive check also needs "enable health".
func SlotCommands(backend string, op slots.Op, add ServerOptions) ([]Command, error) {
	one := func(c Command, err error) ([]Command, error) {
		if err != nil {
			return nil, err
		}
		return []Command{c}, nil
	}
	switch op.Kind {
	case slots.OpSetAddr:
		return one(SetServerAddr(backend, op.Server, op.Addr, op.Port))
	case slots.OpSetWeight:
		return one(SetServerWeight(backend, op.Server, op.Weight))
	case slots.OpReady:
		return one(SetServerState(backend, op.Server, StateReady))
	case slots.OpMaint:
		return one(SetServerState(backend, op.Server, StateMaint))
	case slots.OpAdd:
		add.Weight = op.Weight
		c, err := AddServer(backend, op.Server, op.Addr, op.Port, add)
		if err != nil || add.Passive.ErrorLimit == 0 {
			return one(c, err)
		}
		h, err := EnableHealth(backend, op.Server)
		if err != nil {
			return nil, err
		}
		return []Command{c, h}, nil
	}
	return nil, fmt.Errorf("unknown slot operation %d", op.Kind)
}
