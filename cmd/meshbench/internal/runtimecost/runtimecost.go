// Package runtimecost is the workload "runtime": what one endpoint change
// costs on HAProxy's master socket, applied the ways compared.
package runtimecost

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/slots"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// ways are the ways of applying one endpoint change through the
// master socket that the workload compares, the sidecar's first.
var ways = []struct {
	name string
	// kept: one client whose session stays open between batches;
	// otherwise a new session (connect, prompt mode) per batch.
	kept bool
	// parkAddr: a removal also points the slot at 127.0.0.1:1, as the
	// planner did before it parked with "state maint" alone.
	parkAddr bool
}{
	{"haproxy-connect: kept session, park = state maint", true, false},
	{"new session per batch, park = state maint", false, false},
	{"new session per batch, park = state maint + set addr (before)", false, true},
}

// Run: what one endpoint change costs on the master socket, on
// an idle machine, for the batches the sidecar's planner produces at steady
// churn (an add into a free slot, a removal), applied the ways compared.
// This is the part of the sidecar's own share of propagation spent in
// HAProxy, without Consul or load around it.
func Run(ctx context.Context, b *bench.Bench) error {
	changes := 6000
	if b.Quick {
		changes = 600
	}
	sec := b.Report.Add("Master CLI: one endpoint change through the master socket",
		"way", "change", "commands", "p50", "p99", "p50 ÷ haproxy-connect", "p99 ÷ haproxy-connect")
	p50, p99 := map[cellKey]bench.Rounds{}, map[cellKey]bench.Rounds{}
	cmds := map[cellKey]float64{}
	for round := 0; round < b.Rounds; round++ {
		res, n, err := measureRound(ctx, b, changes)
		if err != nil {
			return err
		}
		for k, s := range res {
			p50[k] = append(p50[k], s.Percentile(50))
			p99[k] = append(p99[k], s.Percentile(99))
			cmds[k] = n[k]
		}
	}
	for _, add := range []bool{true, false} {
		for w, way := range ways {
			k, ref := cellKey{w, add}, cellKey{0, add}
			kind := "remove"
			if add {
				kind = "add"
			}
			sec.Row(way.name, kind, bench.Num(cmds[k]), p50[k].Format(bench.Dur), p99[k].Format(bench.Dur),
				bench.Ratio(p50[k].Median(), p50[ref].Median()), bench.Ratio(p99[k].Median(), p99[ref].Median()))
		}
	}
	sec.Note("What: %d endpoint changes per round on a HAProxy running the sidecar's rendered configuration (bootstrap.Render: one upstream, 128 TLS server-template slots, 100 endpoints in service), adds and removes alternating as in the churn workload; each change is planned with slots.Plan, translated as the sidecar does (runtime.SlotCommands), sent with runtime.Client and timed from the batch's start to its last reply. The ways take turns change by change, so each sees the same mix and the same moment; the time of a batch is p50/p99 over the changes of one kind, median (min–max) over %d rounds. Idle machine: nothing else runs, so this is the floor of the sidecar's runtime step; under the churn workload's load the same batches took several times longer (see the churn sections' own share).", changes, b.Rounds)
	sec.Note("add: a new endpoint into a free slot (`set server addr` + `state ready`). remove: the slot is parked. A new session is what the sidecar did before it kept its sessions: connect to the master socket, `prompt`, the commands, then close.")
	return nil
}

type cellKey struct {
	way int
	add bool
}

func measureRound(ctx context.Context, b *bench.Bench, changes int) (map[cellKey]bench.Samples, map[cellKey]float64, error) {
	env := b.Fresh()
	defer env.Close()
	dir, err := env.Subdir("rc")
	if err != nil {
		return nil, nil, err
	}
	ports, err := env.Ports(4)
	if err != nil {
		return nil, nil, err
	}
	ca, err := testenv.GenerateCA("bench")
	if err != nil {
		return nil, nil, err
	}
	cert, key, err := ca.IssueLeaf("spiffe://bench.consul/ns/default/dc/dc1/svc/web")
	if err != nil {
		return nil, nil, err
	}
	name, err := bootstrap.UpstreamName("api", "")
	if err != nil {
		return nil, nil, err
	}
	spec := bootstrap.Spec{
		Service: "web", LeafFile: filepath.Join(dir, "leaf.pem"), RootsFile: filepath.Join(dir, "roots.pem"),
		SPOEFile: filepath.Join(dir, "spoe.cfg"), AuthzMap: filepath.Join(dir, "authz.map"),
		CrtList: filepath.Join(dir, "public.crtlist"), SNI: bootstrap.FallbackSNI,
		SPOASocket: filepath.Join(dir, "spoa.sock"), HardStopAfter: 5 * time.Second,
		Public: bootstrap.Public{BindAddr: "127.0.0.1", BindPort: ports[1], LocalAddr: "127.0.0.1", LocalPort: ports[2]},
		Upstreams: []bootstrap.Upstream{{Name: name, Destination: "api", BindAddr: "127.0.0.1", BindPort: ports[3],
			Protocol: "http", Slots: slots.New(name, bootstrap.SlotPrefix, 128)}},
	}
	cfg, files, err := bootstrap.RenderFiles(spec, 0)
	if err != nil {
		return nil, nil, err
	}
	files = append(files, bootstrap.File{Path: spec.LeafFile, Content: cert + key}, bootstrap.File{Path: spec.RootsFile, Content: ca.CertPEM})
	if err := bench.WriteFiles(files); err != nil {
		return nil, nil, err
	}
	h, err := env.StartHAProxy(cfg)
	if err != nil {
		return nil, nil, err
	}
	kept := runtime.New(h.MasterSock, nil)
	defer kept.Close()
	opts := runtime.ServerOptions{SSL: true, CrtFile: spec.LeafFile, CAFile: spec.RootsFile}

	table := spec.Upstreams[0].Slots
	endpoint := func(i int) slots.Endpoint {
		return slots.Endpoint{Addr: fmt.Sprintf("127.3.%d.%d", i/250, i%250+1), Port: 21000, Weight: 1}
	}
	const window = 100
	var live []slots.Endpoint
	for i := range window {
		live = append(live, endpoint(i))
	}
	apply := func(rt *runtime.Client, ops []slots.Op) error {
		var batch []runtime.Command
		for _, op := range ops {
			cs, err := runtime.SlotCommands(name, op, opts)
			if err != nil {
				return err
			}
			batch = append(batch, cs...)
		}
		rs, err := rt.Exec(ctx, batch...)
		if err != nil {
			return err
		}
		return rs.Err()
	}
	ops, next, _ := slots.Plan(table, live)
	if err := apply(kept, ops); err != nil {
		return nil, nil, fmt.Errorf("prefill: %w", err)
	}
	table = next

	res := map[cellKey]bench.Samples{}
	ncmds := map[cellKey]float64{}
	nextID := window
	for i := 0; i < changes && ctx.Err() == nil; i++ {
		add := i%2 == 0
		if add {
			live = append(live, endpoint(nextID%60000))
			nextID++
		} else {
			live = live[1:]
		}
		ops, next, rejected := slots.Plan(table, live)
		if len(rejected) > 0 {
			return nil, nil, fmt.Errorf("plan rejected %v", rejected)
		}
		w := (i / 2) % len(ways)
		way := ways[w]
		if way.parkAddr {
			for _, op := range ops {
				if op.Kind == slots.OpMaint {
					ops = append(ops, slots.Op{Kind: slots.OpSetAddr, Server: op.Server, Addr: slots.ParkAddr, Port: slots.ParkPort})
					for j := range next.Slots {
						if next.Slots[j].Name == op.Server {
							next.Slots[j].Addr, next.Slots[j].Port = slots.ParkAddr, slots.ParkPort
						}
					}
				}
			}
		}
		rt := kept
		if !way.kept {
			rt = runtime.New(h.MasterSock, nil)
		}
		start := time.Now()
		err := apply(rt, ops)
		took := time.Since(start)
		if !way.kept {
			_ = rt.Close()
		}
		if err != nil {
			return nil, nil, fmt.Errorf("change %d (%s): %w", i, way.name, err)
		}
		k := cellKey{w, add}
		res[k] = append(res[k], took.Seconds())
		ncmds[k] += float64(len(ops))
		table = next
	}
	for k := range ncmds {
		ncmds[k] /= float64(len(res[k])) // commands per change
	}
	return res, ncmds, ctx.Err()
}
