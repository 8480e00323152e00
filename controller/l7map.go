package controller

import (
	"context"
	"errors"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/l7"
	"github.com/haproxy-connect/haproxy-connect/runtime"
)

// The L7 map: the destination's L7 intentions compiled for HAProxy (package
// l7, Compile), which decides the requests it can without asking the SPOE
// agent. The agent publishes the table with each intentions Set
// (SetL7Map); the loop keeps HAProxy's copy current with "add map" and
// "del map", and writes the file for the next start or reload. No reload.
//
// Entries are grouped by key, and a key's entries never change (the key
// hashes them), so the map moves by whole keys: a new key's entries are
// added in order, a gone key's entries are removed last first. Every state
// in between holds, for each key, a prefix of its entries, and a prefix
// decides a request as the whole does or not at all (the request then goes
// to the agent): the order of these changes against the agent's
// generation switch does not matter for correctness. Adding before the
// switch, as the agent does (it publishes before it switches), only saves
// the agent the requests of connections decided under the new intentions.

// L7MapFile is the L7 map's file in the state directory.
const L7MapFile = "l7.map"

// SetL7Map publishes the L7 map's table: one compiled intention per key.
// Safe to call from any goroutine; it does not block.
func (c *Controller) SetL7Map(table []l7.Compiled) {
	t := slices.Clone(table)
	c.l7want.Store(&t)
	select {
	case c.l7kick <- struct{}{}:
	default:
	}
}

// l7Table is the table last published.
func (c *Controller) l7Table() []l7.Compiled {
	if p := c.l7want.Load(); p != nil {
		return *p
	}
	return nil
}

// l7Keys is what a start or reload puts in HAProxy: every key of table.
func l7Keys(table []l7.Compiled) map[string]bool {
	m := make(map[string]bool, len(table))
	for _, x := range table {
		m[x.Key] = true
	}
	return m
}

// l7MapContent is the L7 map file for table.
func l7MapContent(table []l7.Compiled) string {
	var all []l7.MapEntry
	for _, x := range table {
		all = append(all, x.Entries...)
	}
	return l7.MapContent(all)
}

// l7MapAction moves HAProxy's L7 map to want.
type l7MapAction struct {
	// clear: what HAProxy holds is unknown (an adopted HAProxy); empty
	// it first, then add every key.
	clear    bool
	add, del []l7.Compiled
	// forget are keys HAProxy refused that the table no longer has.
	forget []string
	want   []l7.Compiled
}

func (l7MapAction) isAction() {}

// planL7Map is the L7 map's step, when HAProxy's keys differ from want's.
// applied maps each key HAProxy holds to true, and a key whose entries
// HAProxy refused to false (not tried again while it stays in the table:
// its requests go to the agent). del carries the entries applied held.
func planL7Map(want []l7.Compiled, applied map[string]bool, unknown bool, held []l7.Compiled) []action {
	a := l7MapAction{clear: unknown, want: want}
	wantKeys := l7Keys(want)
	for _, x := range want {
		if _, ok := applied[x.Key]; !ok || unknown {
			a.add = append(a.add, x)
		}
	}
	if !unknown {
		for _, x := range held {
			if applied[x.Key] && !wantKeys[x.Key] {
				a.del = append(a.del, x)
			}
		}
	}
	for k, ok := range applied {
		if !ok && !wantKeys[k] {
			a.forget = append(a.forget, k)
		}
	}
	if !a.clear && len(a.add) == 0 && len(a.del) == 0 && len(a.forget) == 0 {
		return nil
	}
	return []action{a}
}

// applyL7Map applies an l7MapAction: the file first (a reload reads it),
// then the removals and the additions, each key in one batch.
func (c *Controller) applyL7Map(ctx context.Context, a l7MapAction) {
	file := c.path(L7MapFile)
	if err := certs.WriteFile(file, l7MapContent(a.want)); err != nil {
		c.log.Error("L7 map: write file", zap.Error(err))
		c.scheduleRetry(time.Second)
		return
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	failed := func(what string, err error) {
		// What HAProxy holds is unknown now: the next plan clears the
		// map and adds every key again. Meanwhile the agent decides what
		// the map does not.
		c.log.Error("L7 map not applied; retrying", zap.String("step", what), zap.Error(err))
		c.metrics.runtimeErrors.Add(1)
		c.applied.l7Unknown = true
		c.scheduleRetry(time.Second)
	}
	if a.clear {
		cmd, err := runtime.ClearMap(file)
		if err == nil {
			err = c.execAll(rctx, cmd)
		}
		if err != nil {
			failed("clear", err)
			return
		}
		c.applied.l7, c.applied.l7Unknown = map[string]bool{}, false
	}
	if c.applied.l7 == nil {
		c.applied.l7 = map[string]bool{}
	}
	for _, x := range a.del {
		if err := c.execAll(rctx, l7Removal(file, x.Entries)...); err != nil {
			failed("remove "+x.Key, err)
			return
		}
		delete(c.applied.l7, x.Key)
	}
	for _, k := range a.forget {
		delete(c.applied.l7, k)
	}
	added := 0
	for _, x := range a.add {
		var cmds []runtime.Command
		var err error
		for _, e := range x.Entries {
			var cmd runtime.Command
			if cmd, err = runtime.AddL7Entry(file, e.Pattern, e.Value); err != nil {
				break
			}
			cmds = append(cmds, cmd)
		}
		if err == nil {
			err = c.execAll(rctx, cmds...)
		}
		if errors.Is(err, runtime.ErrInvalidArgument) {
			// This key's entries are refused (by the grammar or by
			// HAProxy's regex engine): its requests go to the agent,
			// which decides them all. What was added of it is a prefix
			// of its entries, removed so as not to linger.
			c.log.Error("L7 map entries refused; the SPOE agent decides this intention's requests",
				zap.String("key", x.Key), zap.Error(err))
			if err := c.execAll(rctx, l7Removal(file, x.Entries)...); err != nil {
				failed("remove refused "+x.Key, err)
				return
			}
			c.applied.l7[x.Key] = false
			continue
		}
		if err != nil {
			failed("add "+x.Key, err)
			return
		}
		c.applied.l7[x.Key] = true
		added++
	}
	c.applied.l7Held = a.want
	c.log.Info("L7 map applied at run time (no reload)", zap.Int("added", added), zap.Int("removed", len(a.del)),
		zap.Bool("cleared", a.clear), zap.Int("intentions", len(a.want)))
}

// l7Removal removes entries, last first; removing one that is not there
// is no error.
func l7Removal(file string, entries []l7.MapEntry) []runtime.Command {
	var cmds []runtime.Command
	for i := len(entries) - 1; i >= 0; i-- {
		if cmd, err := runtime.DelL7Entry(file, entries[i].Pattern); err == nil {
			cmds = append(cmds, cmd)
		}
	}
	return cmds
}

// execAll runs cmds as one batch; a removal of an entry not there is
// no error.
func (c *Controller) execAll(ctx context.Context, cmds ...runtime.Command) error {
	if len(cmds) == 0 {
		return nil
	}
	rs, err := c.rt.Exec(ctx, cmds...)
	if err != nil {
		return err
	}
	var errs []error
	for _, r := range rs {
		if r.Err != nil && !errors.Is(r.Err, runtime.ErrNoSuchMapEntry) {
			errs = append(errs, r.Err)
		}
	}
	return errors.Join(errs...)
}
