package controller

import (
	"context"
	"fmt"
	"slices"
	"strings"
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
		d.registration = &sc
		d.sidecar = expand(d.registration, d.chains)
	})
}

func (c *Controller) fetchRegistration(ctx context.Context, cur watch.Cursor) (*api.AgentService, watch.Cursor, error) {
	// The cursor is the agent's content hash, and with Expose.Checks the
	// digest of the paths derived from the checks after a '|'.
	agentHash, _, _ := strings.Cut(cur.Hash, "|")
	wait := 5 * time.Minute
	if strings.Contains(cur.Hash, "|") {
		// Checks change without the proxy's registration (and the agent
		// has no blocking query on them): look again every 10 s.
		wait = exposeChecksPoll
	}
	svc, meta, err := c.consul.Agent().Service(c.cfg.ProxyID, (&api.QueryOptions{WaitHash: agentHash, WaitTime: wait}).WithContext(ctx))
	if err != nil {
		return nil, cur, fmt.Errorf("proxy registration %s: %w", c.cfg.ProxyID, err)
	}
	next := watch.Cursor{Hash: meta.LastContentHash}
	if svc != nil && svc.Proxy != nil && svc.Proxy.Expose.Checks {
		checks, err := c.consul.Agent().ChecksWithFilterOpts("", (&api.QueryOptions{}).WithContext(ctx))
		if err != nil {
			return nil, cur, fmt.Errorf("checks of %s for Expose.Checks: %w", svc.Proxy.DestinationServiceID, err)
		}
		paths, errs := exposedCheckPaths(checks, svc.Proxy.DestinationServiceID, svc.Proxy.LocalServicePort)
		for _, err := range errs {
			c.log.Warn("a check cannot be exposed through the sidecar", zap.String("proxy_id", c.cfg.ProxyID), zap.Error(err))
		}
		// A copy: the answer is this loop's, but the registration it
		// publishes must not alias a slice it appends to.
		proxy := *svc.Proxy
		proxy.Expose.Paths = append(slices.Clone(proxy.Expose.Paths), paths...)
		withPaths := *svc
		withPaths.Proxy = &proxy
		svc = &withPaths
		next.Hash += "|" + fmt.Sprint(paths)
	}
	return svc, next, nil
}

// exposeChecksPoll is how often the destination service's checks are read
// when the registration exposes them.
const exposeChecksPoll = 10 * time.Second

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
