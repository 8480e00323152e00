package controller

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/authzgen"
	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/slots"
)

// Adoption. HAProxy outlives the controller (runtime.Master): a controller
// that starts on a state directory where a master still runs takes it over
// instead of starting a second one. What HAProxy runs is read back from
// HAProxy itself, never from this process's memory or from the files on
// disk (which a crash may have left newer than what HAProxy loaded):
//
//   - the configuration's identity from the state map (configID): equal to
//     the desired one, nothing is reloaded;
//   - each upstream's slots from "show servers state";
//   - the leaf from "show ssl cert" (its serial);
//   - the intentions generation from the authz map.
//
// The usual plan then moves that state to Consul's through runtime
// commands, and reloads only if the configuration differs (an upstream
// added or removed while no controller ran, or a build that renders
// another configuration for the same registration).

// findMaster returns a master to adopt, or nil when none runs. A master
// that runs but cannot be adopted is killed, with its workers: starting a
// second HAProxy beside it would share its ports (SO_REUSEPORT) and split
// the traffic with a configuration nobody steers.
func (c *Controller) findMaster(ctx context.Context) *runtime.Master {
	fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	m, pl, err := runtime.FindMaster(fctx, c.rt.Socket(), c.path(PIDFile))
	switch {
	case err == nil:
		cur, _ := pl.Current()
		c.log.Info("found a running haproxy to adopt", zap.Int("master_pid", m.PID()), zap.Int("worker_pid", cur.PID),
			zap.Int("reloads", pl.Master.Reloads))
		return m
	case errors.Is(err, runtime.ErrNoMaster):
		return nil
	}
	pid, _ := runtime.ReadPID(c.path(PIDFile))
	c.log.Error("a haproxy master runs on the state directory but cannot be adopted; killing it before starting a new one",
		zap.Int("master_pid", pid), zap.Error(err))
	runtime.Kill(pid) // refuses 0
	return nil
}

// readBack reads what the adopted master serves (Controller.readApplied).
// The sidecar it was configured for cannot be read from HAProxy: the state
// map's configuration id stands for it. Equal to the desired one, the
// applied registration and roots are the desired ones; otherwise foreign
// holds the reload reason, and the plan reloads once.
func (c *Controller) readBack(ctx context.Context) (applied, error) {
	d := &c.desired
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	mr, ok1 := c.rt.(mapReader)
	cr, ok2 := c.rt.(certReader)
	if !ok1 || !ok2 {
		return applied{}, errors.New("this runtime client cannot read HAProxy's state back")
	}
	state, err := mr.Map(rctx, c.path(StateMapFile))
	if err != nil {
		return applied{}, fmt.Errorf("state map: %w", err)
	}
	authz, err := mr.Map(rctx, c.path("authz.map"))
	if err != nil {
		return applied{}, fmt.Errorf("authz map: %w", err)
	}
	gen, err := strconv.ParseUint(mapValue(authz, authzgen.MapKey), 10, 64)
	if err != nil {
		return applied{}, fmt.Errorf("authz generation %q unreadable", mapValue(authz, authzgen.MapKey))
	}
	leaf, err := cr.SSLCert(rctx, c.path("leaf.pem"))
	if err != nil {
		return applied{}, fmt.Errorf("served leaf: %w", err)
	}
	tables := map[string]slots.Table{}
	for _, u := range d.sidecar.Upstreams {
		obs, err := c.observe(rctx, u.Name)
		if errors.Is(err, runtime.ErrNoSuchBackend) {
			continue // added while no controller ran: the reload adds it
		}
		if err != nil {
			return applied{}, fmt.Errorf("servers of upstream %s: %w", u.Name, err)
		}
		tables[u.Name] = slots.FromObserved(u.Name, bootstrap.SlotPrefix, len(obs), obs)
	}
	// The L7 map's entries are not read back (show map prints them, but
	// which table they came from is not worth trusting): it is cleared
	// and filled again.
	ap := applied{sidecar: *d.sidecar, rootsPEM: d.roots.PEM, tables: tables, authzGen: gen, leaf: d.leaf, l7Unknown: true}
	want, running := c.configID(*d.sidecar, d.roots.PEM), mapValue(state, bootstrap.StateConfigIDKey)
	if running != want {
		// A reload renders the desired configuration; until then the
		// running one keeps serving and its endpoints are kept current.
		ap.foreign = fmt.Sprintf("adopted haproxy runs another configuration (%s, desired %s)", orDash(running), want)
	}
	if !strings.EqualFold(leaf.Serial, d.leaf.Serial) {
		// HAProxy serves another leaf: the plan swaps it at once (a
		// zero NotAfter leaves nothing to wait for).
		ap.leaf = &certs.Bundle{Serial: strings.ToLower(leaf.Serial)}
	}
	c.log.Info("read back the running haproxy's state", zap.String("config_id", running), zap.Bool("config_current", running == want),
		zap.String("served_leaf_serial", leaf.Serial), zap.Uint64("authz_generation", gen),
		zap.String("last_reload_reason", lastReason(state)))
	return ap, nil
}

// mapReader and certReader are the read-backs adoption needs beyond
// haproxyAPI; runtime.Client has them.
type mapReader interface {
	Map(ctx context.Context, file string) ([]runtime.MapEntry, error)
}

type certReader interface {
	SSLCert(ctx context.Context, file string) (runtime.CertInfo, error)
}

// configID identifies the configuration rendered for sc and roots apart
// from its slot assignment and its reason: two equal ones need no reload.
// It hashes the spec and what this build renders from it (configuration,
// SPOE and certificate list files), so that a controller whose renderer
// changed reloads the HAProxy an earlier build left running, once, instead
// of keeping its older rules until some other reload.
func (c *Controller) configID(sc Sidecar, rootsPEM string) string {
	spec := c.spec(sc, nil)
	spec.ConfigID, spec.Reason = "", ""
	for i := range spec.Upstreams {
		spec.Upstreams[i].Slots, spec.Upstreams[i].Instances = slots.Table{}, nil
		if r := spec.Upstreams[i].Routing; r != nil {
			// Weights and request timeouts change at run time: not part
			// of the configuration's identity.
			r2 := *r
			r2.Routes = slices.Clone(r.Routes)
			for j := range r2.Routes {
				r2.Routes[j].Splits, r2.Routes[j].Dest.RequestTimeout = nil, 0
			}
			spec.Upstreams[i].Routing = &r2
		}
	}
	b, err := json.Marshal(spec)
	if err != nil {
		panic(err) // a Spec is plain data
	}
	h := sha256.New()
	h.Write(b)
	h.Write([]byte{0})
	h.Write([]byte(rootsPEM))
	// Rendered with one free slot per upstream: the slots never count.
	for i := range spec.Upstreams {
		spec.Upstreams[i].Slots = slots.New(spec.Upstreams[i].Name, bootstrap.SlotPrefix, 1)
	}
	if cfg, files, err := renderForID(spec, 0); err == nil {
		h.Write([]byte{0})
		h.Write([]byte(cfg))
		for _, f := range files {
			if f.Path == spec.SPOEFile || f.Path == spec.CrtList {
				h.Write([]byte{0})
				h.Write([]byte(f.Content))
			}
		}
	}
	// An invalid spec is refused by the start or reload that would render
	// it; its id is the spec's alone.
	return hex.EncodeToString(h.Sum(nil)[:16])
}

// renderForID renders the files configID hashes; a seam for its test.
var renderForID = bootstrap.RenderFiles

// mapValue is key's value in a map listing: its first entry, the one
// HAProxy's lookups return ("" when absent).
func mapValue(entries []runtime.MapEntry, key string) string {
	for _, e := range entries {
		if e.Key == key {
			return e.Value
		}
	}
	return ""
}

// lastReason is the reload reason recorded in a state map listing.
func lastReason(state []runtime.MapEntry) string {
	r, err := bootstrap.DecodeToken(mapValue(state, bootstrap.StateReasonKey))
	if err != nil {
		return "(unreadable)"
	}
	return r
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
