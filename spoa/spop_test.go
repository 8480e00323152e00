package spoa

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	goruntime "runtime"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/haproxy-connect/haproxy-connect/spoa/spoptest"
)

func TestHandlerOverSPOP(t *testing.T) {
	ca := testCA()
	der := leafDER(t, ca, 1, clientID)
	f := &fakeDecider{allowed: map[string]bool{clientID: true}}
	a := newTest(t, f)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- a.Serve(ln) }()
	s, err := spoptest.Dial(ln.Addr().String(), "test-engine", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}

	arg := func(name string, v any) spoptest.Arg { return spoptest.Arg{Name: name, Value: v} }
	auth := func(args ...spoptest.Arg) spoptest.Message { return spoptest.Message{Name: "authorize", Args: args} }
	deny := map[string]any{"sess.allowed": false, "sess.source": "-", "sess.gen": int64(0)}
	allow := map[string]any{"sess.allowed": true, "sess.source": clientID, "sess.gen": int64(0)}
	// Consul failing for a key not in the cache: the source and no
	// verdict, so HAProxy refuses this request and asks again on the next.
	consulDown := func() { f.set(func(f *fakeDecider) { f.err = errors.New("agent down") }) }
	consulUp := func() { f.set(func(f *fakeDecider) { f.err = nil }) }
	renewed := leafDER(t, ca, 2, clientID)
	tests := []struct {
		name string
		do   func()
		msgs []spoptest.Message
		want map[string]any
	}{
		{"allowed", nil, []spoptest.Message{auth(arg("cert", der))}, allow},
		{"null cert (fetch failed)", nil, []spoptest.Message{auth(arg("cert", nil))}, deny},
		{"empty cert", nil, []spoptest.Message{auth(arg("cert", []byte{}))}, deny},
		{"cert as a string", nil, []spoptest.Message{auth(arg("cert", string(der)))}, deny},
		{"no cert argument", nil, []spoptest.Message{auth(arg("other", der))}, deny},
		{"garbage", nil, []spoptest.Message{auth(arg("cert", []byte("garbage")))}, deny},
		{"another message only", nil, []spoptest.Message{{Name: "other", Args: []spoptest.Arg{arg("cert", der)}}}, map[string]any{}},
		{"after another message", nil, []spoptest.Message{{Name: "other", Args: []spoptest.Arg{arg("x", "y")}}, auth(arg("cert", der))}, allow},
		{"consul down, cached", consulDown, []spoptest.Message{auth(arg("cert", der))}, allow},
		{"consul down, not cached", nil, []spoptest.Message{auth(arg("cert", renewed))}, map[string]any{"sess.source": clientID}},
		{"consul back", consulUp, []spoptest.Message{auth(arg("cert", renewed))}, allow},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.do != nil {
				tt.do()
			}
			got, err := s.Notify(tt.msgs...)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("variables (-want +got):\n%s", diff)
			}
		})
	}

	// Close drops the established agent connection: HAProxy gets no
	// further answer on it and refuses.
	a.Close()
	if err := <-served; err != nil {
		t.Errorf("Serve: %v", err)
	}
	for {
		typ, _, err := s.ReadFrame()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("agent connection still open after Close")
			}
			break
		}
		if typ != 102 { // the library may say goodbye first
			t.Fatalf("frame type %d after Close", typ)
		}
	}
}

// TestDroppedConnectionsLeakNothing: HAProxy connections that drop while
// their NOTIFYs wait for Consul leave no goroutine behind once the answers
// come, and the handlers in flight never exceed the bound. (The criteo
// library this agent replaced left one goroutine per NOTIFY in flight.)
func TestDroppedConnectionsLeakNothing(t *testing.T) {
	const (
		conns       = 3
		perConn     = 500
		maxHandlers = 32
	)
	ca := testCA()
	f := &fakeDecider{allowed: map[string]bool{clientID: true}, gate: make(chan struct{}), ignoreCtx: true}
	a := newTest(t, f, WithTimeout(time.Minute), WithMaxHandlers(maxHandlers))
	ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "spoa.sock"))
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = a.Serve(ln) }()
	// Distinct sources, across connections too: each NOTIFY waits on a
	// Consul call of its own (calls for one source are coalesced, and with
	// shared sources the interleaving decided how many calls there were).
	ders := make([][]byte, conns*perConn)
	for i := range ders {
		ders[i] = leafDER(t, ca, int64(i+1), fmt.Sprintf("spiffe://"+testTD+"/ns/default/dc/dc1/svc/s%d", i))
	}

	// One round trip first, so that the baseline counts every goroutine
	// that lives as long as the agent (the accept loop, a warm runtime).
	warm, err := spoptest.Dial(ln.Addr().String(), "warm", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	close(f.gate)
	if _, err := warm.Notify(spoptest.Message{Name: "authorize", Args: []spoptest.Arg{{Name: "cert", Value: ders[0]}}}); err != nil {
		t.Fatal(err)
	}
	warm.Close()
	// The warm connection's reader and its NOTIFY's handler end after the
	// answer came back: counted in the baseline, they would let one
	// leaked goroutine pass unseen below.
	waitFor(t, func() bool {
		a.connMu.Lock()
		defer a.connMu.Unlock()
		return len(a.conns) == 0 && len(a.slots) == 0
	})
	f.set(func(f *fakeDecider) { f.gate = make(chan struct{}) })
	a.Invalidate() // nothing cached: every NOTIFY below calls the decider
	waitGoroutines := func(what string, cond func(n int) bool) int {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			n := goruntime.NumGoroutine()
			if cond(n) {
				return n
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				t.Fatalf("%s: %d goroutines after 10s\n%s", what, n, buf[:goruntime.Stack(buf, true)])
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	baseline := goruntime.NumGoroutine()

	var sent sync.WaitGroup
	var clients []*spoptest.Conn
	for c := range conns {
		cl, err := spoptest.Dial(ln.Addr().String(), fmt.Sprintf("engine-%d", c), 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		clients = append(clients, cl)
		sent.Add(1)
		go func() {
			defer sent.Done()
			for i := range perConn {
				// Blocks once the agent stops reading (all handlers
				// busy); fails once the test drops the connection.
				if _, err := cl.Send(spoptest.Message{Name: "authorize", Args: []spoptest.Arg{{Name: "cert", Value: ders[c*perConn+i]}}}); err != nil {
					return
				}
			}
		}()
	}
	// Every handler slot taken, by NOTIFYs waiting for the decider.
	waitFor(t, func() bool { return len(a.slots) == maxHandlers && f.nCalls() >= maxHandlers })
	// Bounded: per busy handler, itself, its Consul call and the call's
	// goroutine, plus a reader and a sender per connection.
	if n, bound := goruntime.NumGoroutine(), baseline+3*maxHandlers+2*conns; n > bound {
		t.Errorf("%d goroutines with %d NOTIFYs sent, want at most %d", n, conns*perConn, bound)
	}
	for _, cl := range clients {
		cl.Drop()
	}
	sent.Wait()
	close(f.gate) // the decisions come, with nobody left to answer
	// A handler gives its slot back as it ends: wait for both.
	n := waitGoroutines("after dropped connections", func(n int) bool { return n <= baseline && len(a.slots) == 0 })
	t.Logf("baseline %d goroutines, %d after %d connections dropped with NOTIFYs in flight", baseline, n, conns)
	if got := len(a.slots); got != 0 {
		t.Errorf("%d handler slots still taken", got)
	}
}
