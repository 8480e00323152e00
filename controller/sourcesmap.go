package controller

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/runtime"
)

// The sources map of the public listener (bootstrap.Spec.SourcesMap): the
// SPIFFE ID of each client certificate whose allow HAProxy remembers,
// keyed by the certificate's SHA-256, so that a connection allowed from a
// remembered allow still logs its caller. An HTTP listener's own rules
// write it, from the agent's verdict. A tcp listener's cannot (2.6 has no
// tcp-request set-map): the listener tells the agent when the map has no
// name for a certificate, the agent hands such an allow to NameSource, and
// the loop adds the names with "add map", in one batch per plan.
// An entry is what the agent read from a certificate it allowed, which no
// later decision changes, so clearing the map is always safe: a
// certificate missing from it is asked about again, once. The controller
// clears it every sourcesPrune, which bounds it to the certificates
// allowed since the last clear.

// SourcesMapFile is the sources map's file in the state directory.
const SourcesMapFile = "sources.map"

// sourcesPrune is how often the sources map is cleared: the stick table's
// expiry of a remembered allow, so that a certificate in use is asked
// about again at most as often as it is when idle.
const sourcesPrune = bootstrap.AuthzCacheExpire

// sourcesMapPath is the sources map's path: every public listener has one.
func (c *Controller) sourcesMapPath() string { return c.path(SourcesMapFile) }

// namesMap is the sources map of sidecar sc when the loop names its
// sources (a tcp public listener), else "".
func (c *Controller) namesMap(sc Sidecar) string {
	if bootstrap.Mode(sc.Public.Protocol) == "http" {
		return ""
	}
	return c.sourcesMapPath()
}

// maxPendingNames bounds the names waiting for the loop: no more than the
// listener can remember allows for. A name past it is dropped; its
// certificate asks the agent again on its next connection, which hands
// the name over again.
const maxPendingNames = bootstrap.AuthzCacheSize

// pendingNames are the sources the agent allowed on a tcp listener, by
// the SHA-256 of the client certificate, that the loop has not added to
// HAProxy's sources map.
type pendingNames struct {
	mu sync.Mutex
	m  map[[32]byte]string
}

// snapshot copies the names waiting.
func (p *pendingNames) snapshot() map[[32]byte]string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.m) == 0 {
		return nil
	}
	return maps.Clone(p.m)
}

// done forgets the names of certs that still map to what was planned,
// and returns how many names wait still.
func (p *pendingNames) done(planned map[[32]byte]string, certs [][32]byte) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, k := range certs {
		if p.m[k] == planned[k] {
			delete(p.m, k)
		}
	}
	return len(p.m)
}

// NameSource is the SPOE agent's allow of a connection whose tcp listener
// has no name for the client certificate in its sources map
// (spoa.WithSourceHook): the certificate whose SHA-256 is cert names
// source. The loop adds it. Safe for concurrent use; it does not block.
func (c *Controller) NameSource(cert [32]byte, source string) {
	c.names.mu.Lock()
	if _, ok := c.names.m[cert]; ok || len(c.names.m) < maxPendingNames {
		c.names.m[cert] = source
	}
	c.names.mu.Unlock()
	select {
	case c.nameKick <- struct{}{}:
	default:
	}
}

// nameSourcesAction adds the names waiting to a tcp listener's sources
// map, or forgets them (drop) when the listener HAProxy runs now names its
// own sources: an HTTP listener replaced a tcp one, whose old worker's
// connections may still have handed names over.
type nameSourcesAction struct {
	names map[[32]byte]string
	drop  bool
}

func (nameSourcesAction) isAction() {}

// maxNamesPerBatch bounds one plan's "add map" batch, so that the loop's
// endpoint changes never wait behind a long one (a sidecar starting under
// many callers at once): what is left waits for the next plan.
const maxNamesPerBatch = 128

// planSourceNames is the sources map's step when names wait: at most
// maxNamesPerBatch of them, or all of them to forget (drop).
func planSourceNames(names map[[32]byte]string, drop bool) []action {
	if len(names) == 0 {
		return nil
	}
	if drop {
		return []action{nameSourcesAction{names: names, drop: true}}
	}
	if len(names) > maxNamesPerBatch {
		some := make(map[[32]byte]string, maxNamesPerBatch)
		for k, v := range names {
			if len(some) == maxNamesPerBatch {
				break
			}
			some[k] = v
		}
		names = some
	}
	return []action{nameSourcesAction{names: names}}
}

// nameSources applies a nameSourcesAction: one batch of "add map". A name
// the command grammar or HAProxy refuses is dropped with an error: its
// certificate's connections keep asking the agent, which allows them as
// before. A batch that does not reach HAProxy is retried. A name added
// twice (two connections asked before the first name landed) is harmless:
// a lookup finds the first entry, and both carry what the agent read from
// the same certificate.
func (c *Controller) nameSources(ctx context.Context, a nameSourcesAction) {
	if a.drop {
		c.names.done(a.names, slices.Collect(maps.Keys(a.names)))
		return
	}
	file := c.namesMap(c.applied.sidecar)
	var cmds []runtime.Command
	var sent, done [][32]byte
	refused := func(k [32]byte, err error) {
		c.log.Error("source not named in the sources map", zap.String("source", a.names[k]), zap.Error(err))
		c.metrics.runtimeErrors.Add(1)
		done = append(done, k)
	}
	for k, source := range a.names {
		cmd, err := runtime.AddMap(file, fmt.Sprintf("%X", k[:]), source)
		if err != nil {
			refused(k, err)
			continue
		}
		cmds, sent = append(cmds, cmd), append(sent, k)
	}
	if len(cmds) > 0 {
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		rs, err := c.rt.Exec(rctx, cmds...)
		cancel()
		if err != nil {
			c.log.Warn("sources map: names not added; retrying", zap.Int("names", len(sent)), zap.Error(err))
			c.metrics.runtimeErrors.Add(1)
			c.scheduleRetry(time.Second)
			c.names.done(a.names, done)
			return
		}
		for i, k := range sent {
			if rs[i].Err != nil {
				refused(k, rs[i].Err)
			} else {
				done = append(done, k)
			}
		}
		c.log.Debug("sources map: names added", zap.Int("names", len(sent)))
	}
	if c.names.done(a.names, done) > 0 {
		// More than one batch waited: the next plan takes the rest.
		select {
		case c.nameKick <- struct{}{}:
		default:
		}
	}
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

// clearSourcesMap clears the sources map of the HAProxy the loop applied. A
// failure waits for the next prune: the map only grows meanwhile.
func (c *Controller) clearSourcesMap(ctx context.Context) {
	if !c.applied.known || c.applied.foreign != "" {
		return
	}
	file := c.sourcesMapPath()
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
