package controller

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/watch"
)

func (c *Controller) publishRegistration(ctx context.Context, svc *api.AgentService) {
	sc, rejected, err := ParseRegistration(svc)
	if err != nil {
		c.log.Error("proxy registration rejected; keeping the applied configuration", zap.String("proxy_id", c.cfg.ProxyID), zap.Error(err))
		return
	}
	for _, r := range rejected {
		c.log.Error("upstream rejected; the other upstreams keep working", zap.String("proxy_id", c.cfg.ProxyID), zap.Error(r))
	}
	c.send(ctx, func(d *desired) {
		if d.sidecar == nil {
			d.sidecarSince = time.Now()
		}
		d.registration = &sc
		d.sidecar = expand(d.registration, d.chains)
	})
}

func (c *Controller) fetchRegistration(ctx context.Context, cur watch.Cursor) (*api.AgentService, watch.Cursor, error) {
	svc, meta, err := c.consul.Agent().Service(c.cfg.ProxyID, (&api.QueryOptions{WaitHash: cur.Hash, WaitTime: 5 * time.Minute}).WithContext(ctx))
	if err != nil {
		return nil, cur, fmt.Errorf("proxy registration %s: %w", c.cfg.ProxyID, err)
	}
	return svc, watch.Cursor{Hash: meta.LastContentHash}, nil
}
