package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// lineConn is a client connection to a tcp public listener that exchanges
// lines with a lineApp, as one mesh source (its leaf).
type lineConn struct {
	conn net.Conn
	rd   *bufio.Reader
}

func dialLine(port int, cert tls.Certificate) (*lineConn, error) {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", fmt.Sprintf("127.0.0.1:%d", port), &tls.Config{
		Certificates: []tls.Certificate{cert},
		// The sidecar's leaf has only a URI SAN; the client side is
		// under test.
		InsecureSkipVerify: true,
	})
	if err != nil {
		return nil, err
	}
	return &lineConn{conn: conn, rd: bufio.NewReader(conn)}, nil
}

// exchange writes a line and reads the application's answer.
func (l *lineConn) exchange() error {
	_ = l.conn.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := fmt.Fprintln(l.conn, "hello"); err != nil {
		return err
	}
	line, err := l.rd.ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "hello from server" {
		return fmt.Errorf("answer %q: %v", line, err)
	}
	return nil
}

// newLineCall exchanges one line on a new connection.
func newLineCall(port int, cert tls.Certificate) error {
	l, err := dialLine(port, cert)
	if err != nil {
		return err
	}
	defer l.conn.Close()
	return l.exchange()
}

// flow keeps exchanging lines on l until one fails: ok counts the
// exchanges, and ended is closed, with err and at set, at the first
// failure.
type flow struct {
	ok    atomic.Int64
	ended chan struct{}
	err   error
	at    time.Time
}

func keepExchanging(t *testing.T, l *lineConn) *flow {
	f := &flow{ended: make(chan struct{})}
	t.Cleanup(func() { l.conn.Close() })
	go func() {
		for {
			if err := l.exchange(); err != nil {
				f.err, f.at = err, time.Now()
				close(f.ended)
				return
			}
			f.ok.Add(1)
			time.Sleep(20 * time.Millisecond)
		}
	}()
	return f
}

// waitExchanges waits until f has made n more exchanges, and fails if it
// ends first.
func (f *flow) waitExchanges(t *testing.T, what string, n int64) {
	t.Helper()
	want := f.ok.Load() + n
	deadline := time.After(10 * time.Second)
	for f.ok.Load() < want {
		select {
		case <-f.ended:
			t.Fatalf("%s: connection ended: %v", what, f.err)
		case <-deadline:
			t.Fatalf("%s: %d exchanges in 10s, want %d more", what, f.ok.Load(), n)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// TestDenyClosesEstablishedTCP: when an intention turns a source to deny,
// its established connections to a tcp service are closed (the one the
// agent decided and the one allowed from the listener's remembered
// verdict), without a reload; another source's connection keeps
// exchanging, its new connections get through, and the denied source's new
// connections are refused. Envoy and Consul's built-in proxy leave such
// connections open.
func TestDenyClosesEstablishedTCP(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{})
	c := consul.Client
	port := testenv.FreePorts(t, 1)[0]
	register(t, c, "server", lineApp(t), port, map[string]any{"protocol": "tcp"})
	s := startSidecar(t, consul, "server")
	alpha, beta := meshCert(t, c, "alpha"), meshCert(t, c, "beta")

	// No intentions and no ACLs: Consul's default allows. The agent's
	// roots and intention watches may answer after /readyz.
	eventually(t, 10*time.Second, "alpha gets through", func() error { return newLineCall(port, alpha) })
	eventually(t, 10*time.Second, "the intention watch answered", func() error {
		if v, err := s.metric("haproxy_connect_authz_intentions_index"); err != nil || v == 0 {
			return fmt.Errorf("intentions index %v, %v", v, err)
		}
		return nil
	})
	open := func(cert tls.Certificate, what string) *flow {
		l, err := dialLine(port, cert)
		if err == nil {
			err = l.exchange()
		}
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		return keepExchanging(t, l)
	}
	// alpha's second connection is allowed from the listener's
	// remembered verdict, without the agent.
	alpha1, alpha2, beta1 := open(alpha, "alpha's first connection"), open(alpha, "alpha's second connection"), open(beta, "beta's connection")
	for name, f := range map[string]*flow{"alpha 1": alpha1, "alpha 2": alpha2, "beta": beta1} {
		f.waitExchanges(t, name, 10)
	}
	reloads := s.reloads(t)

	start := time.Now()
	index := intention(t, c, "alpha", "server", api.IntentionActionDeny)
	saw := eventually(t, 10*time.Second, "the sidecar sees the deny", s.sawIntentions(index))
	for name, f := range map[string]*flow{"alpha 1": alpha1, "alpha 2": alpha2} {
		select {
		case <-f.ended:
			t.Logf("%s closed %v after the intention was written (the sidecar saw it within %v of that), after %d exchanges: %v",
				name, f.at.Sub(start).Round(time.Millisecond), saw.Round(10*time.Millisecond), f.ok.Load(), f.err)
		case <-time.After(10 * time.Second):
			t.Fatalf("%s still open 10s after the deny (%d exchanges)", name, f.ok.Load())
		}
	}
	// beta's connection keeps exchanging, and its new ones get through;
	// alpha's new ones are refused.
	beta1.waitExchanges(t, "beta's connection after the deny", 50)
	for i := range 10 {
		if err := newLineCall(port, beta); err != nil {
			t.Fatalf("beta's new connection %d: %v", i, err)
		}
		if err := newLineCall(port, alpha); err == nil {
			t.Fatalf("alpha's new connection %d was allowed after the deny", i)
		}
	}
	beta1.waitExchanges(t, "beta's connection at the end", 10)

	if n := s.reloads(t); n != reloads {
		t.Errorf("%d reloads during the test, want none", n-reloads)
	}
	if v, err := s.metric("haproxy_connect_authz_tcp_closed_total"); err != nil || v != 2 {
		t.Errorf("haproxy_connect_authz_tcp_closed_total = %v, %v; want 2", v, err)
	}
	if n := strings.Count(s.out.String(), "tcp connection closed: its source is denied now"); n != 2 {
		t.Errorf("%d log lines of a closed connection, want 2", n)
	}
	// A tcp connection's access log line is written when it ends; beta's
	// new connections, allowed from the remembered verdict, name it (the
	// sources map), as its first did.
	if n := len(regexp.MustCompile(`src=spiffe://\S+/svc/beta crt=`).FindAllString(s.out.String(), -1)); n < 10 || strings.Contains(s.out.String(), "src=cached") {
		t.Errorf("%d access log lines name beta, want 10 or more, and none without the caller", n)
	}
	if errors.Is(beta1.err, net.ErrClosed) {
		t.Errorf("beta's connection closed: %v", beta1.err)
	}
}

// TestDenyClosesTCPInOldWorker: a tcp connection established before a
// reload stays in the old worker (until hard-stop-after); a deny of its
// source closes it there too, and the old worker, left with no
// connection, exits.
func TestDenyClosesTCPInOldWorker(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{})
	c := consul.Client
	ports := testenv.FreePorts(t, 2)
	app := lineApp(t)
	register(t, c, "server", app, ports[0], map[string]any{"protocol": "tcp"})
	s := startSidecar(t, consul, "server")
	alpha := meshCert(t, c, "alpha")
	eventually(t, 10*time.Second, "alpha gets through", func() error { return newLineCall(ports[0], alpha) })
	l, err := dialLine(ports[0], alpha)
	if err == nil {
		err = l.exchange()
	}
	if err != nil {
		t.Fatal(err)
	}
	f := keepExchanging(t, l)
	f.waitExchanges(t, "alpha", 5)

	// A new upstream in the registration is a reload: alpha's connection
	// stays with the old worker.
	before := s.reloads(t)
	register(t, c, "server", app, ports[0], map[string]any{"protocol": "tcp"},
		api.Upstream{DestinationName: "other", LocalBindPort: ports[1]})
	eventually(t, 10*time.Second, "the reload", func() error {
		if s.reloads(t) <= before {
			return errors.New("not yet")
		}
		return nil
	})
	oldWorkers := func() int {
		pl, err := s.rt.Procs(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, w := range pl.Workers {
			if w.Reloads > 0 {
				n++
			}
		}
		return n
	}
	if n := oldWorkers(); n != 1 {
		t.Fatalf("%d old workers after the reload, want the one holding alpha's connection", n)
	}
	f.waitExchanges(t, "alpha after the reload", 10)

	start := time.Now()
	intention(t, c, "alpha", "server", api.IntentionActionDeny)
	select {
	case <-f.ended:
		t.Logf("alpha's connection in the old worker closed %v after the intention was written: %v", f.at.Sub(start).Round(time.Millisecond), f.err)
	case <-time.After(10 * time.Second):
		t.Fatalf("alpha's connection in the old worker still open 10s after the deny")
	}
	eventually(t, 10*time.Second, "the old worker exits", func() error {
		if n := oldWorkers(); n != 0 {
			return fmt.Errorf("%d old workers", n)
		}
		return nil
	})
}
