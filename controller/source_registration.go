package controller

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

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
	c.logNotes(sc.Notes)
	c.send(ctx, func(d *desired) {
		if d.sidecar == nil {
			d.sidecarSince = time.Now()
		}
		d.sidecar = &sc
	})
}

func (c *Controller) fetchRegistration(ctx context.Context, cur watch.Cursor) (*api.AgentService, watch.Cursor, error) {
	svc, meta, err := c.consul.Agent().Service(c.cfg.ProxyID, (&api.QueryOptions{WaitHash: cur.Hash, WaitTime: 5 * time.Minute}).WithContext(ctx))
	if err != nil {
		return nil, cur, fmt.Errorf("proxy registration %s: %w", c.cfg.ProxyID, err)
	}
	return svc, watch.Cursor{Hash: meta.LastContentHash}, nil
}

// logNotes logs each note of the registration once: at the first
// registration, and when it first appears after a change. A note that
// stays is not repeated on every registration update.
func (c *Controller) logNotes(notes []Note) {
	seen := make(map[Note]bool, len(notes))
	for _, n := range notes {
		seen[n] = true
		if c.regNotes[n] {
			continue
		}
		msg := "proxy registration: not supported, not applied"
		switch n.Level {
		case zapcore.ErrorLevel:
			msg = "proxy registration: value refused; the rest keeps working"
		case zapcore.InfoLevel:
			msg = "proxy registration: key needs nothing from haproxy"
		}
		c.log.Log(n.Level, msg, zap.String("proxy_id", c.cfg.ProxyID), zap.String("key", n.Key), zap.String("reason", n.Reason))
	}
	c.regNotes = seen
}
