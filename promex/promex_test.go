package promex

import (
	"path/filepath"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// TestGatherWithoutHAProxy: with nothing on the socket, Gather returns
// the up gauge at 0 and no error (the sidecar's own series are still
// served), and logs why at debug. The read of a live exporter is checked
// end to end (cmd/haproxy-connect TestDashboardSeriesExist).
func TestGatherWithoutHAProxy(t *testing.T) {
	core, logs := observer.New(zap.DebugLevel)
	g := New(filepath.Join(t.TempDir(), "prom.sock"), zap.New(core))
	fams, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if len(fams) != 1 || fams[0].GetName() != UpMetric || fams[0].GetMetric()[0].GetGauge().GetValue() != 0 {
		t.Errorf("families %v, want %s at 0 alone", fams, UpMetric)
	}
	if n := logs.FilterMessage("haproxy's prometheus exporter not reachable").FilterLevelExact(zap.DebugLevel).Len(); n != 1 {
		t.Errorf("%d debug lines, want 1: %v", n, logs.All())
	}
}
