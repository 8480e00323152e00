package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptrace"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// Reload under load: how many local connections, how often each sends a
// request, and the old worker's bound. The pace is modest (500 connections
// at one request per 50 ms each, on a 2-core machine shared with other
// work): the test is about correctness across a reload, not capacity.
const (
	reloadLoadConns    = 500
	reloadLoadInterval = 50 * time.Millisecond
	reloadHardStop     = 8 * time.Second
	// afterReload is how long traffic goes on, and is checked, once the
	// old worker has gone.
	afterReload = 5 * time.Second
)

// connLoad is n local clients, each on its own connection kept alive
// between its requests, each sending one request per interval until stop.
type connLoad struct {
	ok, failed atomic.Int64
	// opened counts connections opened (the first of each client
	// included); reused counts requests sent on a connection that had
	// served one before.
	opened, reused atomic.Int64
	// ready counts clients whose first request succeeded.
	ready    atomic.Int64
	firstErr atomic.Value
	done     chan struct{}
	wg       sync.WaitGroup
}

// loadCounts is a snapshot of a connLoad's counters.
type loadCounts struct{ ok, failed, opened, reused int64 }

func (l *connLoad) counts() loadCounts {
	return loadCounts{l.ok.Load(), l.failed.Load(), l.opened.Load(), l.reused.Load()}
}

func (c loadCounts) sub(o loadCounts) loadCounts {
	return loadCounts{c.ok - o.ok, c.failed - o.failed, c.opened - o.opened, c.reused - o.reused}
}

// startConnLoad starts n clients; newClient(i) makes client i's request
// function, which reports whether the request went on a reused connection.
// The clients start spread over one interval.
func startConnLoad(n int, interval time.Duration, newClient func(i int) func() (reused bool, err error)) *connLoad {
	l := &connLoad{done: make(chan struct{})}
	for i := range n {
		call := newClient(i)
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			wait := time.NewTimer(rand.N(interval))
			defer wait.Stop()
			first := true
			for {
				select {
				case <-l.done:
					return
				case <-wait.C:
				}
				reused, err := call()
				if err != nil {
					l.failed.Add(1)
					l.firstErr.CompareAndSwap(nil, fmt.Errorf("client %d: %w", i, err))
				} else {
					l.ok.Add(1)
					if first {
						first = false
						l.ready.Add(1)
					}
				}
				if reused {
					l.reused.Add(1)
				} else {
					l.opened.Add(1)
				}
				wait.Reset(interval)
			}
		}()
	}
	return l
}

// stop ends the clients and returns their final counts and first failure.
func (l *connLoad) stop() (loadCounts, error) {
	close(l.done)
	l.wg.Wait()
	err, _ := l.firstErr.Load().(error)
	return l.counts(), err
}

// httpConnClient is a local HTTP client on a connection of its own, kept
// alive between requests (a new one when HAProxy closed it). Odd clients
// POST a body: Go's transport replays an idempotent request (the GETs)
// that met a kept-alive connection closing under it, but not a POST, so
// the POSTs fail if HAProxy closes a connection as a request arrives.
func httpConnClient(t *testing.T, url string, i int) func() (bool, error) {
	tr := &http.Transport{MaxConnsPerHost: 1, MaxIdleConnsPerHost: 1, IdleConnTimeout: time.Minute}
	t.Cleanup(tr.CloseIdleConnections)
	client := &http.Client{Timeout: 15 * time.Second, Transport: tr}
	method, body := "GET", ""
	if i%2 == 1 {
		method, body = "POST", "payload"
	}
	return func() (bool, error) {
		var reused bool
		ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
			GotConn: func(g httptrace.GotConnInfo) { reused = g.Reused },
		})
		var rd io.Reader
		if body != "" {
			rd = strings.NewReader(body)
		}
		req, err := http.NewRequestWithContext(ctx, method, url, rd)
		if err != nil {
			return false, err
		}
		resp, err := client.Do(req)
		if err != nil {
			return reused, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			return reused, fmt.Errorf("%s: read body: %w", method, err)
		}
		if resp.StatusCode != 200 || strings.TrimSpace(string(b)) != "hello from server" {
			return reused, fmt.Errorf("%s: status %d %q", method, resp.StatusCode, b)
		}
		return reused, nil
	}
}

// TestReloadUnderLoad: a sidecar reloads for a new upstream while 500
// local clients, each on its own kept-alive connection, and a few clients
// opening a connection per request, call the client's upstream. Not one
// request fails, across the reload and for afterReload after the old
// worker has gone; there is exactly one reload, and the old worker is gone
// within the sidecar's -hard-stop-after. The sidecar that reloads is the
// client's (its local clients' connections move to the new worker) or the
// server's (the client sidecar's pooled connections to it move).
func TestReloadUnderLoad(t *testing.T) {
	for _, side := range []string{"client", "server"} {
		t.Run("http/"+side, func(t *testing.T) {
			m := startReloadMesh(t, "http")
			testReloadUnderLoad(t, m, side)
		})
	}
}

// startReloadMesh is the two-sidecar mesh with protocol proto, both
// sidecars with -hard-stop-after reloadHardStop, and a server application
// that answers HTTP requests or lines on kept connections.
func startReloadMesh(t *testing.T, proto string) *mesh {
	t.Helper()
	app := lineApp(t)
	if proto == "http" {
		app = httpApp(t, "server")
	}
	m := &mesh{consul: testenv.Consul(t, testenv.ConsulOptions{}), ports: testenv.FreePorts(t, 4), app: app}
	m.c = m.consul.Client
	register(t, m.c, "server", m.app, m.ports[0], map[string]any{"protocol": proto})
	m.upstream = api.Upstream{DestinationName: "server", LocalBindPort: m.ports[3], Config: map[string]any{"protocol": proto}}
	register(t, m.c, "client", m.ports[1], m.ports[2], nil, m.upstream)
	args := []string{"-hard-stop-after", reloadHardStop.String()}
	m.server = startSidecar(t, m.consul, "server", args...)
	m.client = startSidecar(t, m.consul, "client", args...)
	return m
}

// testReloadUnderLoad runs the load through m, makes side ("client" or
// "server") reload once for a new upstream, and checks the requests, the
// reload count and the old worker's end.
func testReloadUnderLoad(t *testing.T, m *mesh, side string) {
	port := m.ports[3]
	eventually(t, 10*time.Second, "the mesh serves", serves(port, "hello from server"))
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	reloading := m.client
	if side == "server" {
		reloading = m.server
	}

	kept := startConnLoad(reloadLoadConns, reloadLoadInterval, func(i int) func() (bool, error) {
		return httpConnClient(t, url, i)
	})
	fresh := startConnLoad(4, reloadLoadInterval, func(int) func() (bool, error) {
		call := serves(port, "hello from server")
		return func() (bool, error) { return false, call() }
	})
	stopped := false
	stopAll := func() (keptN, freshN loadCounts, keptErr, freshErr error) {
		stopped = true
		keptN, keptErr = kept.stop()
		freshN, freshErr = fresh.stop()
		return
	}
	defer func() {
		if !stopped {
			stopAll()
		}
	}()
	eventually(t, 30*time.Second, "every kept-alive client has an answer", func() error {
		if n := kept.ready.Load(); n < reloadLoadConns {
			return fmt.Errorf("%d of %d clients answered", n, reloadLoadConns)
		}
		return nil
	})
	before := reloading.reloads(t)
	pl, err := reloading.rt.Procs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	old, ok := pl.Current()
	if !ok {
		t.Fatalf("no current worker: %+v", pl)
	}
	atReload := kept.counts()

	// A new upstream in the registration is one reload; its endpoints do
	// not matter.
	extra := testenv.FreePort(t)
	other := api.Upstream{DestinationName: "other", LocalBindPort: extra, Config: map[string]any{"protocol": "http"}}
	registered := time.Now()
	if side == "client" {
		register(t, m.c, "client", m.ports[1], m.ports[2], nil, m.upstream, other)
	} else {
		register(t, m.c, "server", m.app, m.ports[0], map[string]any{"protocol": "http"}, other)
	}
	eventually(t, 10*time.Second, "the sidecar reloaded", func() error {
		if reloading.reloads(t) <= before {
			return errors.New("not yet")
		}
		return nil
	})
	reloaded := time.Since(registered)
	// The old worker has a bound: -hard-stop-after. Polling adds at most
	// a few ticks to it.
	eventually(t, reloadHardStop+time.Second, "the old worker is gone", func() error {
		pl, err := reloading.rt.Procs(context.Background())
		if err != nil {
			return err
		}
		for _, w := range pl.Workers {
			if w.PID == old.PID {
				return fmt.Errorf("worker %d still there (%d workers)", old.PID, len(pl.Workers))
			}
		}
		return nil
	})
	gone := time.Since(registered)
	atGone := kept.counts()
	// The new upstream's port is bound: the new worker has the new
	// configuration.
	if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", extra), 2*time.Second); err != nil {
		t.Errorf("the new upstream's port: %v", err)
	} else {
		c.Close()
	}
	time.Sleep(afterReload)
	keptN, freshN, keptErr, freshErr := stopAll()

	during, after := atGone.sub(atReload), keptN.sub(atGone)
	t.Logf("after the registration: reload seen at %s, old worker gone at %s", reloaded.Round(time.Millisecond), gone.Round(time.Millisecond))
	t.Logf("kept-alive clients: %d requests ok, %d failed (first: %v); until the old worker went: %d ok, %d failed, %d connections opened; after: %d ok, %d failed, %d on reused connections",
		keptN.ok, keptN.failed, keptErr, during.ok, during.failed, during.opened, after.ok, after.failed, after.reused)
	t.Logf("new connection per request: %d ok, %d failed (first: %v)", freshN.ok, freshN.failed, freshErr)
	if keptN.failed > 0 {
		t.Errorf("%d of %d requests on kept-alive connections failed; first: %v", keptN.failed, keptN.ok+keptN.failed, keptErr)
	}
	if freshN.failed > 0 || freshN.ok == 0 {
		t.Errorf("%d of %d requests on new connections failed; first: %v", freshN.failed, freshN.ok+freshN.failed, freshErr)
	}
	// The clients kept their connections after the move to the new worker.
	if after.ok == 0 || after.reused == 0 {
		t.Errorf("after the old worker went: %d requests ok, %d on reused connections", after.ok, after.reused)
	}
	if got := reloading.reloads(t) - before; got != 1 {
		t.Errorf("%d reloads for one new upstream, want 1", got)
	}
}
