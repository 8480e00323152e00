package controller

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap/zaptest"

	"github.com/haproxy-connect/haproxy-connect/runtime"
)

// mapController is a controller on state directory dir that applied ap,
// steering a fake HAProxy.
func mapController(t *testing.T, dir string, ap applied) (*Controller, *fakeHAProxy) {
	t.Helper()
	c, err := New(Config{Consul: api.DefaultConfig(), ProxyID: "web-sidecar-proxy", StateDir: dir, SPOASocket: "/state/spoa.sock", Log: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	fake := &fakeHAProxy{}
	c.rt, c.applied = fake, ap
	return c, fake
}

// TestClearSourcesMap: the prune clears the sources map of the HAProxy the
// loop applied (started, reloaded or adopted as desired), whichever wrote
// it: an HTTP listener's rules, or the controller for a tcp listener.
func TestClearSourcesMap(t *testing.T) {
	dir := t.TempDir()
	tcp := *sidecar()
	tcp.Public.Protocol = "tcp"
	tests := []struct {
		name    string
		applied applied
		want    []string
	}{
		{"http listener", applied{known: true, sidecar: *sidecar()}, []string{"@1 clear map " + dir + "/" + SourcesMapFile}},
		{"tcp listener", applied{known: true, sidecar: tcp}, []string{"@1 clear map " + dir + "/" + SourcesMapFile}},
		{"nothing applied yet", applied{sidecar: *sidecar()}, nil},
		{"adopted, another configuration", applied{known: true, sidecar: *sidecar(), foreign: "config id differs"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, fake := mapController(t, dir, tt.applied)
			c.clearSourcesMap(context.Background())
			if got := fake.take(); !slices.Equal(got, tt.want) {
				t.Errorf("transcript %q, want %q", got, tt.want)
			}
		})
	}
}

// unreachable is an HAProxy whose master socket answers nothing.
type unreachable struct{ *fakeHAProxy }

func (unreachable) Exec(context.Context, ...runtime.Command) (runtime.Results, error) {
	return nil, errors.New("dial unix master.sock: connect: no such file or directory")
}

// TestNameSources: the names the agent hands over for a tcp listener (each
// one the listener said its map lacks) go to HAProxy's sources map in one
// batch of "add map", keyed by the certificate's SHA-256 in upper-case hex
// as HAProxy's hex converter writes it; a name the grammar refuses is
// dropped; a batch that does not reach HAProxy waits for the next plan; an
// HTTP listener (its own rules write the map) gets nothing, and the names
// waiting are forgotten.
func TestNameSources(t *testing.T) {
	dir := t.TempDir()
	file := dir + "/" + SourcesMapFile
	tcp := *sidecar()
	tcp.Public.Protocol = "tcp"
	web := "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web"
	api1 := "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/api"
	a, b, bad := [32]byte{0xab, 1}, [32]byte{0xcd, 2}, [32]byte{3}
	hexA, hexB := "AB01"+strings.Repeat("00", 30), "CD02"+strings.Repeat("00", 30)
	type step struct {
		name    string
		do      func(c *Controller)
		down    bool // the master socket does not answer
		want    []string
		pending int
	}
	tests := []struct {
		name    string
		sidecar Sidecar
		steps   []step
	}{
		{"tcp listener", tcp, []step{
			{name: "two allows", do: func(c *Controller) { c.NameSource(a, web); c.NameSource(b, api1) },
				want: []string{"@1 add map " + file + " " + hexA + " " + web, "@1 add map " + file + " " + hexB + " " + api1}},
			{name: "nothing waits"},
			{name: "the map lacks it again (cleared by hand)", do: func(c *Controller) { c.NameSource(a, web); c.NameSource(a, web) },
				want: []string{"@1 add map " + file + " " + hexA + " " + web}},
			{name: "a name the grammar refuses", do: func(c *Controller) { c.NameSource(bad, "spiffe://x/a b\n@1 shutdown sessions") }},
			{name: "unreachable", do: func(c *Controller) { c.NameSource(b, api1) }, down: true, pending: 1},
			{name: "reachable again", want: []string{"@1 add map " + file + " " + hexB + " " + api1}},
		}},
		{"http listener", *sidecar(), []step{
			// Handed over by an old worker's tcp listener, after a
			// reload to an HTTP one: forgotten, not sent.
			{name: "allow", do: func(c *Controller) { c.NameSource(a, web) }},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, fake := mapController(t, dir, applied{known: true, sidecar: tt.sidecar})
			for _, st := range tt.steps {
				c.rt = fake
				if st.down {
					c.rt = unreachable{fake}
				}
				if st.do != nil {
					st.do(c)
				}
				in := c.planInput()
				for _, act := range planSourceNames(in.names, in.namesMap == "") {
					c.nameSources(context.Background(), act.(nameSourcesAction))
				}
				got := fake.take()
				slices.Sort(got)
				want := slices.Sorted(slices.Values(st.want))
				if !slices.Equal(got, want) {
					t.Errorf("%s: transcript %q, want %q", st.name, got, want)
				}
				if n := len(c.names.snapshot()); n != st.pending {
					t.Errorf("%s: %d names waiting, want %d", st.name, n, st.pending)
				}
			}
		})
	}
}

// TestNameSourcesInBatches: many names waiting at once (a sidecar starting
// under many callers) go in batches of at most maxNamesPerBatch, one per
// plan, each but the last waking the loop for the next.
func TestNameSourcesInBatches(t *testing.T) {
	tcp := *sidecar()
	tcp.Public.Protocol = "tcp"
	c, fake := mapController(t, t.TempDir(), applied{known: true, sidecar: tcp})
	const n = 2*maxNamesPerBatch + 44
	for i := range n {
		c.NameSource([32]byte{byte(i), byte(i >> 8)}, fmt.Sprintf("spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/s%d", i))
	}
	<-c.nameKick
	var batches []int
	added := map[string]bool{}
	for range 10 {
		in := c.planInput()
		acts := planSourceNames(in.names, in.namesMap == "")
		if len(acts) == 0 {
			break
		}
		c.nameSources(context.Background(), acts[0].(nameSourcesAction))
		got := fake.take()
		batches = append(batches, len(got))
		for _, line := range got {
			added[line] = true
		}
		select {
		case <-c.nameKick:
			if len(c.names.snapshot()) == 0 {
				t.Errorf("batch %d: the loop woken with nothing left", len(batches))
			}
		default:
			if len(c.names.snapshot()) != 0 {
				t.Errorf("batch %d: names left, and the loop not woken", len(batches))
			}
		}
	}
	if want := []int{maxNamesPerBatch, maxNamesPerBatch, 44}; !slices.Equal(batches, want) {
		t.Errorf("batches of %v commands, want %v", batches, want)
	}
	if len(added) != n {
		t.Errorf("%d distinct names added, want %d", len(added), n)
	}
}
