package churn

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"
)

// pollPeriod paces the polling of a HAProxy contender: one "show
// servers state" every millisecond, and never more than half of the time
// busy polling (after a poll that took d, the next starts d later at the
// earliest). A tight loop (about 0.5 ms a poll with a few dozen servers,
// several ms with a thousand) keeps the master, the worker and this process
// busy, close to a whole CPU of the two this machine has, which slows the
// contender and Consul it measures. The resolution is about 1 ms, or twice a
// poll's duration with large backends; the mean poll interval is reported.
const pollPeriod = time.Millisecond

// pollLoop observes a polled contender until ctx ends.
func pollLoop(ctx context.Context, poll func(context.Context) (map[string]bool, error), tl *timeline) {
	for ctx.Err() == nil {
		start := time.Now()
		now, err := poll(ctx)
		if err == nil {
			tl.observe(time.Now(), now)
		}
		// On error, the master socket refused the connection while it
		// re-executes (a reload): retry at the same pace.
		took := time.Since(start)
		time.Sleep(max(pollPeriod-took, took))
	}
}

// watchConsul is Consul's own notification: a blocking query on the
// health endpoint the contender reads (health/connect for api,
// health/service for api-plain, passing only), timestamped when it returns.
//
// It is one more blocking watcher on Consul, and every notification sends
// the whole instance list (about 3 KB per connect instance: 300 KB at 100
// live), so it is kept as light as it can be: no gzip (Go's transport asks
// for it by default, and Consul compresses every answer), and only the
// address and port decoded.
func watchConsul(ctx context.Context, addr string, connect bool, svc string, tl *timeline) {
	kind := "service"
	if connect {
		kind = "connect"
	}
	var idx uint64
	for ctx.Err() == nil {
		u := fmt.Sprintf("http://%s/v1/health/%s/%s?passing=1&index=%d&wait=60s", addr, kind, svc, idx)
		set, next, err := health(ctx, consulHTTP, u)
		now := time.Now()
		if err != nil {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if next < idx {
			next = 0 // the index went backwards: start over
		}
		idx = next
		tl.observe(now, set)
	}
}

// consulHTTP is the baseline watch's client: no gzip, no timeout (the
// queries block up to a minute and end with the pass's context).
var consulHTTP = &http.Client{Transport: &http.Transport{DisableCompression: true}}

// health runs one health query and returns the address:port of each
// instance and the X-Consul-Index.
func health(ctx context.Context, client *http.Client, u string) (map[string]bool, uint64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, 0, fmt.Errorf("%s: status %d", u, resp.StatusCode)
	}
	idx, err := strconv.ParseUint(resp.Header.Get("X-Consul-Index"), 10, 64)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: X-Consul-Index: %w", u, err)
	}
	var entries []struct {
		Node    struct{ Address string }
		Service struct {
			Address string
			Port    int
		}
	}
	if err := json.NewDecoder(resp.Body).Decode(&entries); err != nil {
		return nil, 0, err
	}
	set := make(map[string]bool, len(entries))
	for _, e := range entries {
		addr := e.Service.Address
		if addr == "" {
			addr = e.Node.Address
		}
		set[net.JoinHostPort(addr, strconv.Itoa(e.Service.Port))] = true
	}
	return set, idx, nil
}
