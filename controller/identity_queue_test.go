package controller

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap/zaptest"

	"github.com/haproxy-connect/haproxy-connect/verify"
)

// TestVerifyQueue: proofs beyond verifyWorkers wait in a queue, not in a
// goroutine each; all of them run, at most verifyWorkers at once, without
// the loop reading results in between, and a queued proof of an endpoint
// no upstream lists any more is dropped without a handshake.
func TestVerifyQueue(t *testing.T) {
	leaf, roots := webLeaf(t)
	c, err := New(Config{Consul: api.DefaultConfig(), ProxyID: "web-sidecar-proxy", StateDir: t.TempDir(), SPOASocket: "/state/spoa.sock", Log: zaptest.NewLogger(t), MinSlots: 8})
	if err != nil {
		t.Fatal(err)
	}
	c.desired.leaf, c.desired.roots = &leaf, &roots
	release := make(chan struct{})
	var running, most atomic.Int64
	var mu sync.Mutex
	proved := map[string]bool{}
	c.ident.verify = func(_ context.Context, _ verify.Config, addr, want string) (verify.Result, error) {
		n := running.Add(1)
		for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
		}
		<-release
		running.Add(-1)
		mu.Lock()
		proved[addr] = true
		mu.Unlock()
		return verify.Result{ID: want}, nil
	}
	const total, dropped = 40, 4
	checks := map[string]*idCheck{}
	for i := range total {
		addr := fmt.Sprintf("10.0.0.%d:21000", i+1)
		k := checkKey{"api", netip.MustParseAddrPort(addr)}
		ch := &idCheck{want: "spiffe://td.consul/ns/default/dc/dc1/svc/api", addr: addr, users: upstreamSet{"api"}}
		c.ident.checks[k], checks[addr] = ch, ch
		c.startVerify(context.Background(), k, ch)
	}
	c.ident.mu.Lock()
	workers, queued := c.ident.running, len(c.ident.queue)
	c.ident.mu.Unlock()
	if workers != verifyWorkers || queued != total-verifyWorkers {
		t.Fatalf("%d workers, %d queued; want %d and %d", workers, queued, verifyWorkers, total-verifyWorkers)
	}
	// The last queued endpoints leave every list before their turn, as
	// track marks them.
	for i := total - dropped; i < total; i++ {
		ch := checks[fmt.Sprintf("10.0.0.%d:21000", i+1)]
		ch.users = nil
		ch.unlisted.Store(true)
	}
	// The workers go on without the loop: every result is waiting in
	// c.events once they are done.
	close(release)
	c.ident.wg.Wait()
	drainEvents(c)
	if most.Load() > verifyWorkers {
		t.Errorf("%d proofs at once, want at most %d", most.Load(), verifyWorkers)
	}
	for i := range total {
		addr := fmt.Sprintf("10.0.0.%d:21000", i+1)
		ch, want := checks[addr], i < total-dropped
		if proved[addr] != want {
			t.Errorf("%s proved: %t, want %t", addr, proved[addr], want)
		}
		if ch.inflight {
			t.Errorf("%s still in flight", addr)
		}
		if _, kept := c.ident.checks[checkKey{"api", netip.MustParseAddrPort(addr)}]; kept != want {
			t.Errorf("%s kept: %t, want %t", addr, kept, want)
		}
	}
}
