// Package routing is the routed-upstream workload: the keep-alive request
// rate through an upstream whose discovery chain has a router, a splitter
// and a resolver with subsets (each request matched against the routes,
// split by weight and sent to a target's backend, all from maps at run
// time) against a plain upstream of the same app, paired in each round.
package routing

import (
	"context"
	"errors"
	"fmt"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// clients is the keep-alive concurrency of the comparison.
const clients = 16

const body = "hello from server\n"

// Run measures the routed and the plain upstream of one client sidecar.
func Run(ctx context.Context, b *bench.Bench) error {
	if b.Wrk == "" {
		return errors.New("wrk not found (apt-get install -y wrk, or set WRK_BIN)")
	}
	consul, err := b.StartConsul(testenv.ConsulOptions{})
	if err != nil {
		return err
	}
	c := consul.Client
	app, err := b.HTTPApp(body)
	if err != nil {
		return err
	}
	ports, err := b.Ports(6)
	if err != nil {
		return err
	}
	plainSidecar, routedSidecar, clientApp, clientSidecar, upPlain, upRouted := ports[0], ports[1], ports[2], ports[3], ports[4], ports[5]
	httpCfg := map[string]any{"protocol": "http", "bind_address": "127.0.0.1"}
	// "plain" and "routed" front the same app, each with a sidecar of its
	// own; "routed" is one instance tagged for both subsets, so each
	// target's backend has that one endpoint and what differs from plain
	// is only the routing.
	if err := bench.RegisterWithSidecar(c, "plain", app, plainSidecar, httpCfg); err != nil {
		return err
	}
	if err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: "routed", Name: "routed", Tags: []string{"v1", "v2"}, Port: app, Address: "127.0.0.1", Checks: bench.Passing(),
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
			Port: routedSidecar, Address: "127.0.0.1", Checks: bench.Passing(),
			Proxy: &api.AgentServiceConnectProxyConfig{Config: httpCfg},
		}},
	}); err != nil {
		return err
	}
	for _, e := range []api.ConfigEntry{
		&api.ServiceConfigEntry{Kind: api.ServiceDefaults, Name: "plain", Protocol: "http"},
		&api.ServiceConfigEntry{Kind: api.ServiceDefaults, Name: "routed", Protocol: "http"},
		&api.ServiceResolverConfigEntry{Kind: api.ServiceResolver, Name: "routed", DefaultSubset: "v1",
			Subsets: map[string]api.ServiceResolverSubset{
				"v1": {Filter: "Service.Tags contains v1"},
				"v2": {Filter: "Service.Tags contains v2"},
			}},
		&api.ServiceSplitterConfigEntry{Kind: api.ServiceSplitter, Name: "routed", Splits: []api.ServiceSplit{
			{Weight: 90, ServiceSubset: "v1"}, {Weight: 10, ServiceSubset: "v2"},
		}},
		&api.ServiceRouterConfigEntry{Kind: api.ServiceRouter, Name: "routed", Routes: []api.ServiceRoute{
			{Match: &api.ServiceRouteMatch{HTTP: &api.ServiceRouteHTTPMatch{PathPrefix: "/admin"}},
				Destination: &api.ServiceRouteDestination{ServiceSubset: "v2"}},
			{Match: &api.ServiceRouteMatch{HTTP: &api.ServiceRouteHTTPMatch{Header: []api.ServiceRouteHTTPMatchHeader{{Name: "X-Canary", Exact: "1"}}}},
				Destination: &api.ServiceRouteDestination{ServiceSubset: "v2"}},
		}},
	} {
		if _, _, err := c.ConfigEntries().Set(e, nil); err != nil {
			return fmt.Errorf("config entry %s/%s: %w", e.GetKind(), e.GetName(), err)
		}
	}
	up := func(name string, port int) api.Upstream {
		return api.Upstream{DestinationName: name, LocalBindAddress: "127.0.0.1", LocalBindPort: port, Config: map[string]any{"protocol": "http"}}
	}
	if err := bench.RegisterWithSidecar(c, "client", clientApp, clientSidecar, httpCfg, up("plain", upPlain), up("routed", upRouted)); err != nil {
		return err
	}
	for _, id := range []string{"plain", "routed", "client"} {
		if _, err := b.StartSidecar(consul, id); err != nil {
			return err
		}
	}
	if err := bench.WaitUpstreams(ctx, body, upPlain, upRouted); err != nil {
		return err
	}
	d := b.WrkTime()
	// A is the plain upstream, B the routed one: the ratio is the routed
	// rate over the plain rate, one per round.
	var f bench.PairFigures
	for r := 0; r < b.Rounds; r++ {
		b.Logf("routing round %d/%d", r+1, b.Rounds)
		plain, routed, ratio, err := bench.Paired(ctx, b.Wrk, r, fmt.Sprintf("http://127.0.0.1:%d/", upPlain),
			fmt.Sprintf("http://127.0.0.1:%d/", upRouted), clients, d)
		if err != nil {
			return err
		}
		f.Add(plain, routed, ratio)
	}
	sec := b.Report.Add(fmt.Sprintf("Traffic management: keep-alive rate through a routed upstream (%d clients)", clients),
		"plain req/s", "routed req/s", "routed ÷ plain (per round)", "plain p99", "routed p99")
	sec.Row(bench.Num(f.A.Median()), bench.Num(f.B.Median()),
		f.Ratio.Format(func(v float64) string { return fmt.Sprintf("%.2f", v) }),
		bench.Dur(f.AP99.Median()), bench.Dur(f.BP99.Median()))
	sec.Note("wrk -c %d for %s per run, keep-alive, GET / → the client sidecar's upstream → a server sidecar → the same app. Plain: an "+
		"upstream without config entries. Routed: its discovery chain has a service-router (two routes, a path prefix and a header, "+
		"neither matching these requests), a service-splitter (90/10 over two subsets) and a service-resolver (subsets by tag; the one "+
		"instance has both tags), so every request is matched against the routes, draws its split bucket and is sent to a target's "+
		"backend from the chain map. Each round runs both twice in mirrored order (ABBA, flipped every round) and pairs their rates; "+
		"the ratio column is the median of the rounds' ratios (lowest–highest). Sidecars at their defaults.", clients, d)
	return nil
}
