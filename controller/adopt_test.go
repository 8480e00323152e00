package controller

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/consul/api"
	"go.uber.org/zap/zaptest"

	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/slots"
	"github.com/haproxy-connect/haproxy-connect/verify"
)

// TestAdoptTranscript: a master found running (not started by this
// controller) is adopted through readApplied before anything else, and
// the exact runtime transcript that follows reconciles it with the
// desired state: nothing when they agree, runtime commands for endpoint
// changes, exactly one reload for another upstream set. Without
// readApplied, finding a master is an error.
func TestAdoptTranscript(t *testing.T) {
	leaf, roots := webLeaf(t)
	api9, db := up("api", 9191), up("db", 9192)
	// served is what the running master serves: sc, with eps per
	// upstream in 8 slots, the leaf and the roots, generation 0.
	served := func(sc *Sidecar, eps map[string][]slots.Endpoint) applied {
		ap := applied{sidecar: *sc, leaf: &leaf, rootsPEM: roots.PEM, tables: map[string]slots.Table{}}
		for _, u := range sc.Upstreams {
			_, ap.tables[u.Name], _ = slots.Plan(slots.New(u.Name, "s", 8), eps[u.Name])
		}
		return ap
	}
	tests := []struct {
		name       string
		serving    *applied // nil: no readApplied
		desired    *Sidecar
		eps        map[string][]slots.Endpoint
		impostor   string // an address that proves another identity
		want       []string
		unreadable bool
		reloads    uint64
	}{
		{
			name:    "the same state: nothing sent",
			serving: ptr(served(sidecar(api9, db), map[string][]slots.Endpoint{"up_api": {ep(1, 21000), ep(2, 21000)}, "up_db": {ep(5, 21000)}})),
			desired: sidecar(api9, db),
			eps:     map[string][]slots.Endpoint{"up_api": {ep(1, 21000), ep(2, 21000)}, "up_db": {ep(5, 21000)}},
			want:    nil,
		},
		{
			name:    "endpoints changed while away: runtime commands, no reload",
			serving: ptr(served(sidecar(api9, db), map[string][]slots.Endpoint{"up_api": {ep(1, 21000), ep(2, 21000)}, "up_db": {ep(5, 21000)}})),
			desired: sidecar(api9, db),
			eps:     map[string][]slots.Endpoint{"up_api": {ep(2, 21000), ep(3, 21000)}, "up_db": {ep(5, 21000)}},
			// 1 leaves at once, and 3 takes its slot once proven.
			want: []string{
				"@1 set server up_api/s1 state maint",
				"@1 set server up_api/s1 addr 10.0.0.3 port 21000",
				"@1 set server up_api/s1 state ready",
			},
		},
		{
			name:     "a served endpoint proven again shows another identity: parked",
			serving:  ptr(served(sidecar(api9), map[string][]slots.Endpoint{"up_api": {ep(1, 21000), ep(2, 21000)}})),
			desired:  sidecar(api9),
			eps:      map[string][]slots.Endpoint{"up_api": {ep(1, 21000), ep(2, 21000)}},
			impostor: "10.0.0.2:21000",
			want:     []string{"@1 set server up_api/s2 state maint"},
		},
		{
			name:    "an upstream added while away: exactly one reload",
			serving: ptr(served(sidecar(api9), map[string][]slots.Endpoint{"up_api": {ep(1, 21000)}})),
			desired: sidecar(api9, db),
			eps:     map[string][]slots.Endpoint{"up_api": {ep(1, 21000)}, "up_db": {ep(5, 21000)}},
			want: []string{
				"reload: registration: upstream up_db added",
				"@1 set server up_db/s1 addr 10.0.0.5 port 21000",
				"@1 set server up_db/s1 state ready",
			},
			reloads: 1,
		},
		{
			name:       "the state cannot be read back: that master is let go, nothing sent",
			desired:    sidecar(api9),
			eps:        map[string][]slots.Endpoint{"up_api": {ep(1, 21000)}},
			unreadable: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := New(Config{Consul: api.DefaultConfig(), ProxyID: "web-sidecar-proxy", StateDir: t.TempDir(), SPOASocket: "/state/spoa.sock", Log: zaptest.NewLogger(t)})
			if err != nil {
				t.Fatal(err)
			}
			fake := &fakeHAProxy{}
			c.rt = fake
			var mu sync.Mutex
			var verified []string
			c.ident.verify = func(_ context.Context, _ verify.Config, addr, want string) (verify.Result, error) {
				mu.Lock()
				verified = append(verified, addr)
				mu.Unlock()
				if addr == tt.impostor {
					const other = "spiffe://td.consul/ns/default/dc/dc1/svc/other"
					return verify.Result{ID: other}, fmt.Errorf("%w: %s", verify.ErrMismatch, other)
				}
				return verify.Result{ID: want}, nil
			}
			c.startMaster = func(context.Context) (*runtime.Master, error) {
				return nil, errors.New("a master runs already: nothing may start another")
			}
			// The lifecycle found a running master.
			c.master = &runtime.Master{}
			c.readApplied = func(context.Context) (applied, error) { return applied{}, errors.New("show map: no such map") }
			if tt.serving != nil {
				c.readApplied = func(context.Context) (applied, error) { return *tt.serving, nil }
			}
			for _, u := range tt.desired.Upstreams {
				c.watches[u.Name] = &upstreamWatch{up: u, cancel: func() {}}
			}
			c.leafFor, c.leafStop = "web", func() {}
			d := &c.desired
			d.sidecar, d.sidecarSince, d.leaf, d.roots = tt.desired, time.Now(), &leaf, &roots
			for name, eps := range tt.eps {
				d.setEndpoints(name, eps, time.Now())
			}
			if err := c.reconcile(context.Background()); err != nil {
				t.Fatalf("reconcile: %v", err)
			}
			if tt.unreadable {
				// Stopped (here a fake: Stop refuses its PID 0), and
				// forgotten: the plan starts a new one, which this
				// test's startMaster refuses once the wait is over.
				if c.master != nil || c.applied.known {
					t.Errorf("the master that could not be adopted is kept: master %v, applied known %v", c.master, c.applied.known)
				}
				if got := fake.take(); len(got) > 0 {
					t.Errorf("sent %q", got)
				}
				return
			}
			// The verifications it started come back; reconcile again
			// until nothing is left, as the loop does.
			settle(t, c)
			if diff := cmp.Diff(tt.want, fake.take()); diff != "" {
				t.Errorf("transcript (-want +got):\n%s", diff)
			}
			if got := reloads(t, c.metrics); got != tt.reloads {
				t.Errorf("%d reloads, want %d", got, tt.reloads)
			}
			if !c.applied.known || !c.Ready() {
				t.Errorf("after adoption: applied known %v, ready %v", c.applied.known, c.Ready())
			}
			wantServed := slices.DeleteFunc(slices.Clone(tt.eps["up_api"]), func(e slots.Endpoint) bool { return e.Key() == tt.impostor })
			if fmt.Sprint(c.applied.tables["up_api"].Endpoints()) != fmt.Sprint(wantServed) {
				t.Errorf("up_api serves %v, want %v", c.applied.tables["up_api"].Endpoints(), wantServed)
			}
			// Every endpoint is proven by this process, the adopted
			// ones included.
			for _, eps := range tt.eps {
				for _, e := range eps {
					if !slices.Contains(verified, e.Key()) {
						t.Errorf("%s never verified (verified: %v)", e.Key(), verified)
					}
				}
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }
