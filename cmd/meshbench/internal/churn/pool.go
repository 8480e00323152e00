package churn

import (
	"fmt"
	"net"
	"strconv"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// endpoint is one churn endpoint: a relay on its own loopback address,
// registered in the catalog on a node of its own.
type endpoint struct {
	id, key string
	reg     *api.CatalogRegistration // its check passing
	// critical is reg with its check critical: listed, not to be used.
	critical *api.CatalogRegistration
	dereg    *api.CatalogDeregistration
}

// pool is a set of endpoints of one service, all listening for the whole
// workload.
type pool struct {
	eps []endpoint
}

// newPool opens n relays on 127.<octet>.x.y to target and prepares
// their registrations: service ID <prefix>-<i> on node <prefix>-node-<i>
// (with the endpoint's address), a check passing from the start (or
// critical, for the check flips); kind sets
// the service's name and kind.
//
// Endpoints go to the catalog, each on a node of its own, because they
// stand for instances on other hosts, which a client's agent never holds.
// Registered on the one local agent instead (Agent().ServiceRegister), each
// connect-proxy made the agent start its per-proxy machinery (proxycfg):
// measured here, 51 connect-proxy against 201 plain registrations/s
// (sequential), and 22 against 72-92 changes/s reached in a burst, a cost
// only the mTLS contenders would have paid. The write acknowledgement is
// then the catalog commit, with no agent anti-entropy step in between.
func newPool(e *bench.Env, prefix string, octet, n int, target string, kind func(*api.AgentService)) (*pool, error) {
	p := &pool{}
	for i := range n {
		addr := fmt.Sprintf("127.%d.%d.%d", octet, i/250, i%250+1)
		ln, err := net.Listen("tcp", addr+":0")
		if err != nil {
			return nil, fmt.Errorf("endpoint listener on %s: %w", addr, err)
		}
		e.Defer(func() { ln.Close() })
		port := ln.Addr().(*net.TCPAddr).Port
		id, node := fmt.Sprintf("%s-%d", prefix, i), fmt.Sprintf("%s-node-%d", prefix, i)
		svc := &api.AgentService{ID: id, Address: addr, Port: port}
		kind(svc)
		reg := func(status string) *api.CatalogRegistration {
			return &api.CatalogRegistration{Node: node, Address: addr, Service: svc,
				Check: &api.AgentCheck{Node: node, CheckID: "alive", Name: "alive", Status: status, ServiceID: id}}
		}
		p.eps = append(p.eps, endpoint{id: id, key: net.JoinHostPort(addr, strconv.Itoa(port)),
			reg: reg(api.HealthPassing), critical: reg(api.HealthCritical),
			dereg: &api.CatalogDeregistration{Node: node, ServiceID: id}})
		go p.serve(ln, net.JoinHostPort(addr, strconv.Itoa(port)), target)
	}
	return p, nil
}

// serve relays every connection to target.
func (p *pool) serve(ln net.Listener, key, target string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			testenv.Pipe(c, target)
		}()
	}
}
