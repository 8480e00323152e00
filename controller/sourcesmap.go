package controller

import (
	"context"
	"time"

	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/runtime"
)

// The sources map of an HTTP public listener (bootstrap.Spec.SourcesMap):
// the SPIFFE ID of each client certificate whose allow HAProxy remembers,
// keyed by the certificate's SHA-256. HAProxy's own rules write it, from
// the agent's verdict, so that a connection allowed from a remembered
// allow still logs its caller. An entry is what the agent read from a
// certificate it allowed, which no later decision changes, so clearing the
// map is always safe: a certificate missing from it is asked about again,
// once. The controller clears it every sourcesPrune, which bounds it to
// the certificates allowed since the last clear.

// SourcesMapFile is the sources map's file in the state directory.
const SourcesMapFile = "sources.map"

// sourcesPrune is how often the sources map is cleared: the stick table's
// expiry of a remembered allow, so that a certificate in use is asked
// about again at most as often as it is when idle.
const sourcesPrune = bootstrap.AuthzCacheExpire

// sourcesMapPath is the sources map's path for sidecar sc, "" when its public
// listener has none (tcp: HAProxy's tcp rules cannot write a map).
func (c *Controller) sourcesMapPath(sc Sidecar) string {
	if bootstrap.Mode(sc.Public.Protocol) != "http" {
		return ""
	}
	return c.path(SourcesMapFile)
}

// pruneSourcesMap clears the sources map every sourcesPrune until ctx ends.
func (c *Controller) pruneSourcesMap(ctx context.Context) {
	t := time.NewTicker(sourcesPrune)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			c.send(ctx, func(*desired) { c.clearSourcesMap(ctx) })
		}
	}
}

// clearSourcesMap clears the sources map of the HAProxy the loop applied, if
// its configuration has one. A failure waits for the next prune: the map
// only grows meanwhile.
func (c *Controller) clearSourcesMap(ctx context.Context) {
	if !c.applied.known || c.applied.foreign != "" {
		return
	}
	file := c.sourcesMapPath(c.applied.sidecar)
	if file == "" {
		return
	}
	cmd, err := runtime.ClearMap(file)
	if err == nil {
		err = c.execAll(ctx, cmd)
	}
	if err != nil {
		c.log.Warn("sources map not cleared; the next prune tries again", zap.Duration("every", sourcesPrune), zap.Error(err))
		c.metrics.runtimeErrors.Add(1)
		return
	}
	c.log.Debug("sources map cleared", zap.String("map", file))
}
