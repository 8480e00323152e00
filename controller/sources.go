package controller

import (
	"context"
	"time"

	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/watch"
)

// syncWatches runs one endpoint watch per desired upstream and the leaf
// watch for the destination service.
func (c *Controller) syncWatches(ctx context.Context) {
	c.syncChainWatches(ctx)
	sc := c.desired.sidecar
	want := map[string]Upstream{}
	for _, u := range sc.Upstreams {
		want[u.Name] = u
	}
	for name, w := range c.watches {
		if u, ok := want[name]; !ok || u != w.up {
			w.cancel()
			delete(c.watches, name)
			delete(c.desired.endpoints, name)
			delete(c.desired.instances, name)
			delete(c.desired.standby, name)
		}
	}
	for name, u := range want {
		if _, ok := c.watches[name]; ok {
			continue
		}
		wctx, cancel := context.WithCancel(ctx)
		c.watches[name] = &upstreamWatch{up: u, cancel: cancel}
		go c.watchUpstream(wctx, u)
	}
	if c.leafFor != sc.Service {
		if c.leafStop != nil {
			c.leafStop()
		}
		lctx, cancel := context.WithCancel(ctx)
		c.leafStop, c.leafFor = cancel, sc.Service
		service := sc.Service
		go watch.Loop(lctx, watch.Options{Name: "leaf", Log: c.log, MinInterval: time.Second}, func(ctx context.Context, cur watch.Cursor) (*certs.Bundle, watch.Cursor, error) {
			return c.fetchLeaf(ctx, service, cur)
		}, func(b *certs.Bundle) { c.send(lctx, func(d *desired) { d.leaf = b }) })
	}
}
