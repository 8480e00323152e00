package controller

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

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

// TestStandbyProofs: an instance listed as standby (its checks failing)
// is proven ahead, retried while it does not answer, but only within
// standbyWindow, and behind the listed endpoints' proofs; past the window
// a due proof of it is forgotten, so that it is proven again before it is
// placed.
func TestStandbyProofs(t *testing.T) {
	leaf, roots := webLeaf(t)
	c, err := New(Config{Consul: api.DefaultConfig(), ProxyID: "web-sidecar-proxy", StateDir: t.TempDir(), SPOASocket: "/state/spoa.sock", Log: zaptest.NewLogger(t), MinSlots: 8})
	if err != nil {
		t.Fatal(err)
	}
	c.desired.sidecar, c.desired.leaf, c.desired.roots = sidecar(up("api", 9191)), &leaf, &roots
	c.desired.endpoints["up_api"] = nil
	now := t0
	c.now = func() time.Time { return now }
	const want = "spiffe://td.consul/ns/default/dc/dc1/svc/api"
	var mu sync.Mutex
	proofs := map[string]int{}
	c.ident.verify = func(_ context.Context, _ verify.Config, addr, want string) (verify.Result, error) {
		mu.Lock()
		proofs[addr]++
		mu.Unlock()
		if addr == "10.0.0.2:21000" {
			return verify.Result{}, errors.New("connection refused")
		}
		return verify.Result{ID: want}, nil
	}
	key := func(i int) checkKey {
		return checkKey{want, netip.MustParseAddrPort(fmt.Sprintf("10.0.0.%d:21000", i))}
	}
	settle := func() {
		c.ident.wg.Wait()
		drainEvents(c)
	}
	count := func(i int) int {
		mu.Lock()
		defer mu.Unlock()
		return proofs[fmt.Sprintf("10.0.0.%d:21000", i)]
	}
	sweep := func(at time.Duration) {
		now = t0.Add(at)
		c.sweepIdentities(context.Background(), &c.desired)
		settle()
	}

	// Endpoint 1 answers, endpoint 2 refuses: both standby.
	c.track(context.Background(), verifyAction{upstream: "up_api", standby: []checkRef{{key: key(1)}, {key: key(2)}}})
	settle()
	one, two := c.ident.checks[key(1)], c.ident.checks[key(2)]
	if !one.known || !one.good || count(1) != 1 {
		t.Fatalf("standby endpoint 1: known %t good %t after %d proofs", one.known, one.good, count(1))
	}
	if !two.known || two.good || count(2) != 1 {
		t.Fatalf("standby endpoint 2: known %t good %t after %d proofs", two.known, two.good, count(2))
	}
	// Retried with backoff within the window; endpoint 1 holds.
	sweep(time.Second)
	if count(1) != 1 || count(2) != 2 {
		t.Errorf("after 1 s: %d and %d proofs, want 1 and 2", count(1), count(2))
	}
	// Past the window: no more tries.
	sweep(standbyWindow + time.Second)
	n2 := count(2)
	sweep(standbyWindow + time.Minute)
	if count(2) != n2 {
		t.Errorf("past the window: endpoint 2 proven %d more times", count(2)-n2)
	}
	if p, _ := c.ident.proof(key(2), now); p.due {
		t.Errorf("past the window, endpoint 2 is due for the plan")
	}
	// Endpoint 1's proof falls due past the window: forgotten, not renewed.
	sweep(reverifyEvery + reverifyEvery/5)
	if p, _ := c.ident.proof(key(1), now); p.known || p.good || p.due || count(1) != 1 {
		t.Errorf("endpoint 1, due past the window: %+v after %d proofs; want forgotten and not proven again", p, count(1))
	}
	// Its checks pass: it is listed, so it is proven at once.
	c.track(context.Background(), verifyAction{upstream: "up_api", checks: []checkRef{{key: key(1)}}, standby: []checkRef{{key: key(2)}}})
	settle()
	if p, _ := c.ident.proof(key(1), now); !p.good || count(1) != 2 {
		t.Errorf("endpoint 1 listed: %+v after %d proofs; want proven again", p, count(1))
	}
	// A proof ahead does not take the workers past standbyRoom: it waits
	// in a queue of its own, which a worker takes when it is done and no
	// proof of a listed endpoint waits.
	setRunning := func(n int) {
		c.ident.mu.Lock()
		c.ident.running = n
		c.ident.mu.Unlock()
	}
	setRunning(standbyRoom)
	c.track(context.Background(), verifyAction{upstream: "up_api", checks: []checkRef{{key: key(1)}}, standby: []checkRef{{key: key(2)}, {key: key(3)}}})
	three := c.ident.checks[key(3)]
	if c.ident.wg.Wait(); three == nil || !three.ahead.Load() || count(3) != 0 {
		t.Fatalf("standby endpoint 3 with %d workers running: %+v, %d proofs", standbyRoom, three, count(3))
	}
	setRunning(0)
	c.track(context.Background(), verifyAction{upstream: "up_api", checks: []checkRef{{key: key(1)}, {key: key(4)}}, standby: []checkRef{{key: key(2)}, {key: key(3)}}})
	settle()
	if !three.good || count(3) != 1 || count(4) != 1 {
		t.Errorf("after endpoint 4's proof: 3 good %t after %d proofs, 4 proven %d times", three.good, count(3), count(4))
	}
	// One waiting ahead that an upstream lists is proven as listed ones are.
	setRunning(standbyRoom)
	c.track(context.Background(), verifyAction{upstream: "up_api", checks: []checkRef{{key: key(1)}, {key: key(4)}}, standby: []checkRef{{key: key(3)}, {key: key(5)}}})
	five := c.ident.checks[key(5)]
	if !five.ahead.Load() {
		t.Fatalf("standby endpoint 5 not waiting ahead")
	}
	c.track(context.Background(), verifyAction{upstream: "up_api", checks: []checkRef{{key: key(1)}, {key: key(4)}, {key: key(5)}}, standby: []checkRef{{key: key(3)}}})
	c.ident.wg.Wait()
	setRunning(0)
	drainEvents(c)
	if five.ahead.Load() || !five.good || count(5) != 1 {
		t.Errorf("endpoint 5 listed: waiting ahead %t, good %t after %d proofs", five.ahead.Load(), five.good, count(5))
	}
	c.ident.mu.Lock()
	left := len(c.ident.ahead) + len(c.ident.queue)
	c.ident.mu.Unlock()
	if left != 0 {
		t.Errorf("%d proofs left queued", left)
	}
	// Endpoint 2 leaves Consul's list: its check is dropped.
	c.track(context.Background(), verifyAction{upstream: "up_api", checks: []checkRef{{key: key(1)}}, standby: []checkRef{{key: key(3)}}})
	if _, kept := c.ident.checks[key(2)]; kept {
		t.Errorf("endpoint 2 no longer listed, its check kept")
	}
}
