package churn

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
)

// loadHTTP opens a new connection per request: every request goes
// through the listener (and, across a reload, the new worker) and the
// backend's choice of server. Its timeout is what fails a stalled one.
var loadHTTP = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// steadyLoad sends GET requests to port at rate per second, each on a new
// connection, on an open schedule (bench.StartOpenLoop) until the returned
// stop is called: a request is sent when due, whatever the ones before it
// are doing, and timed from when it was due, so that a stall of the data
// plane (or of the generator itself, on busy CPUs) shows in the latencies
// of every request it held instead of thinning the requests sent.
func steadyLoad(ctx context.Context, port, rate int) (stop func() bench.LoadResult) {
	_, stop = bench.StartOpenLoop(ctx, loadHTTP, fmt.Sprintf("http://127.0.0.1:%d/", port), float64(rate), 0)
	return stop
}
