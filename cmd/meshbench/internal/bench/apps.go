package bench

import (
	"io"
	"net"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"
)

// CountingApp is the HTTP app: a fixed body, keep-alive, counting the
// connections it accepts.
type CountingApp struct {
	Port int
	Body string
	n    atomic.Int64
}

// Accepted is the number of connections accepted so far.
func (a *CountingApp) Accepted() (int64, error) { return a.n.Load(), nil }

type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// StartCountingApp serves body on a free loopback port until e closes.
func StartCountingApp(e *Env, body string) (*CountingApp, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	a := &CountingApp{Port: ln.Addr().(*net.TCPAddr).Port, Body: body}
	length := strconv.Itoa(len(body))
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", length)
		w.Header().Set("Content-Type", "text/plain")
		_, _ = io.WriteString(w, body)
	}), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(countingListener{ln, &a.n})
	e.Defer(func() { srv.Close() })
	return a, nil
}
