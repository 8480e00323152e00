package testenv

import (
	"io"
	"net"
	"sync"
	"testing"
)

// Link is a TCP relay on a free loopback port to a target that a test can
// cut and restore: the network between a sidecar and its Consul agent,
// failing while the agent itself keeps running.
type Link struct {
	// Addr is the relay's host:port, to give in place of the target's.
	Addr   string
	target string

	mu    sync.Mutex
	cut   bool
	conns map[net.Conn]struct{} // both ends of every relayed connection
}

// NewLink starts a relay to target; it stops when the test ends.
func NewLink(t testing.TB, target string) *Link {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := &Link{Addr: ln.Addr().String(), target: target, conns: map[net.Conn]struct{}{}}
	t.Cleanup(func() {
		ln.Close()
		l.Cut()
	})
	go Serve(ln, l.relay)
	return l
}

// Cut closes every relayed connection, and closes new ones as soon as they
// are accepted, until Restore: the client sees its requests fail at once
// (connection reset or EOF) rather than hang.
func (l *Link) Cut() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.cut = true
	for c := range l.conns {
		c.Close()
	}
	clear(l.conns)
}

// Restore relays new connections again.
func (l *Link) Restore() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.cut = false
}

func (l *Link) relay(c net.Conn) {
	if !l.track(c) {
		return
	}
	defer l.untrack(c)
	u, err := net.Dial("tcp", l.target)
	if err != nil {
		return
	}
	defer u.Close()
	if !l.track(u) {
		return
	}
	defer l.untrack(u)
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(u, c); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, u); done <- struct{}{} }()
	<-done
}

// track registers c unless the link is cut.
func (l *Link) track(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cut {
		return false
	}
	l.conns[c] = struct{}{}
	return true
}

func (l *Link) untrack(c net.Conn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.conns, c)
}
