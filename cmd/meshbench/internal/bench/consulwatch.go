package bench

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/valyala/fastjson"
)

// WatchConsul is Consul's own notification, the floor of every contender's
// propagation: a blocking query on the health endpoint a contender reads
// (health/connect/<svc> when connect, else health/service/<svc>; passing
// only), each answer's address:port set handed to observe with the time
// it returned, until ctx ends.
//
// It is one more blocking watcher on Consul, and every notification sends
// the whole instance list (about 2-3 KB per connect instance: megabytes
// at a thousand), so it is kept as light as it can be: no gzip (Go's
// transport asks for it by default, and Consul compresses every answer),
// and only the addresses and port read, with fastjson as the sidecar does.
func WatchConsul(ctx context.Context, addr string, connect bool, svc string, observe func(at time.Time, set map[string]bool)) {
	kind := "service"
	if connect {
		kind = "connect"
	}
	var idx uint64
	for ctx.Err() == nil {
		u := fmt.Sprintf("http://%s/v1/health/%s/%s?passing=1&index=%d&wait=60s", addr, kind, svc, idx)
		set, next, err := Health(ctx, consulHTTP, u)
		now := time.Now()
		if err != nil {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if next < idx {
			next = 0 // the index went backwards: start over
		}
		idx = next
		observe(now, set)
	}
}

// consulHTTP is the baseline watch's client: no gzip, no timeout (the
// queries block up to a minute and end with the pass's context).
var consulHTTP = &http.Client{Transport: &http.Transport{DisableCompression: true}}

// Health runs one health query and returns the address:port of each
// instance (the service's address, or its node's when empty) and the
// X-Consul-Index.
func Health(ctx context.Context, client *http.Client, u string) (map[string]bool, uint64, error) {
	if client == nil {
		client = consulHTTP
	}
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
	var buf bytes.Buffer
	if _, err := io.Copy(&buf, resp.Body); err != nil {
		return nil, 0, err
	}
	var p fastjson.Parser
	v, err := p.ParseBytes(buf.Bytes())
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", u, err)
	}
	entries, err := v.Array()
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", u, err)
	}
	set := make(map[string]bool, len(entries))
	for _, e := range entries {
		addr := string(e.GetStringBytes("Service", "Address"))
		if addr == "" {
			addr = string(e.GetStringBytes("Node", "Address"))
		}
		set[net.JoinHostPort(addr, strconv.Itoa(e.GetInt("Service", "Port")))] = true
	}
	return set, idx, nil
}
