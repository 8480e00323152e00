package controller

import (
	"context"
	"slices"
	"testing"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap/zaptest"
)

// TestClearSourcesMap: the prune clears the sources map only of an HAProxy
// whose configuration loaded one, the one the loop applied: an HTTP
// public listener, started, reloaded or adopted as desired.
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
		{"tcp listener", applied{known: true, sidecar: tcp}, nil},
		{"nothing applied yet", applied{sidecar: *sidecar()}, nil},
		{"adopted, another configuration", applied{known: true, sidecar: *sidecar(), foreign: "config id differs"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := New(Config{Consul: api.DefaultConfig(), ProxyID: "web-sidecar-proxy", StateDir: dir, SPOASocket: "/state/spoa.sock", Log: zaptest.NewLogger(t)})
			if err != nil {
				t.Fatal(err)
			}
			fake := &fakeHAProxy{}
			c.rt = fake
			c.applied = tt.applied
			c.clearSourcesMap(context.Background())
			if got := fake.take(); !slices.Equal(got, tt.want) {
				t.Errorf("transcript %q, want %q", got, tt.want)
			}
		})
	}
}
