package controller

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// testdata/health_connect_100.json is a real answer of Consul 1.22.3 to
// /v1/health/connect/api?passing=1 with 100 connect-proxy instances
// registered through the catalog (re-encoded without indentation).
const healthAnswerFile = "testdata/health_connect_100.json"

// parse reads a health answer held in memory: see parseEntriesFrom.
func (h *healthReader) parse(body []byte) (entries []healthEntry, bad []error, err error) {
	return h.parseEntriesFrom(bytes.NewReader(body))
}

func TestHealthParse(t *testing.T) {
	real, err := os.ReadFile(healthAnswerFile)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		body    string
		n       int         // entries kept
		first   healthEntry // when n > 0
		bad     []string    // substrings, one per rejected entry
		wantErr string
	}{
		{name: "real answer", body: string(real), n: 100,
			first: healthEntry{ID: "api-1", Address: "127.1.0.1", NodeAddress: "127.1.0.1", Port: 20001, Weight: 1, WarningWeight: 1}},
		{name: "empty list", body: `[]`},
		{name: "node address only, no weights", body: `[{"Node":{"Address":"10.0.0.1"},"Service":{"ID":"a","Address":"","Port":80}}]`, n: 1,
			first: healthEntry{ID: "a", NodeAddress: "10.0.0.1", Port: 80, WarningWeight: 1}},
		{name: "nulls are absent", body: `[{"Node":null,"Service":{"ID":null,"Address":null,"Port":80,"Weights":{"Passing":null}}}]`, n: 1,
			first: healthEntry{Port: 80, WarningWeight: 1}},
		{name: "weight kept", body: `[{"Service":{"ID":"w","Address":"10.0.0.2","Port":81,"Weights":{"Passing":7,"Warning":1}}}]`, n: 1,
			first: healthEntry{ID: "w", Address: "10.0.0.2", Port: 81, Weight: 7, WarningWeight: 1}},
		{name: "bad entries dropped, the others kept",
			body: `[{"Service":{"ID":"s","Address":"10.0.0.3","Port":"80"}},
				{"Node":{"Address":"10.0.0.4"}},
				{"Service":{"ID":"n","Address":10,"Port":80}},
				{"Service":{"ID":"f","Address":"10.0.0.6","Port":80.5}},
				{"Service":{"ID":"w","Address":"10.0.0.7","Port":80,"Weights":{"Passing":"x"}}},
				{"Node":{"Address":[]},"Service":{"ID":"na","Port":80}},
				{"Service":{"ID":"ok","Address":"10.0.0.8","Port":80}}]`, n: 1,
			first: healthEntry{ID: "ok", Address: "10.0.0.8", Port: 80, WarningWeight: 1},
			bad: []string{"instance 0 (s): Service.Port", "instance 1 (): no Service object", "instance 2 (n): Address",
				"instance 3 (f): Service.Port", "instance 4 (w): Service.Weights.Passing", "instance 5 (na): Node.Address"}},
		{name: "absent port is 0 (Consul omits it)", body: `[{"Service":{"ID":"p","Address":"10.0.0.5","SocketPath":"/x.sock"}}]`, n: 1,
			first: healthEntry{ID: "p", Address: "10.0.0.5", WarningWeight: 1}},
		{name: "not JSON", body: `<html>`, wantErr: "answer is not JSON"},
		{name: "truncated", body: string(real[:len(real)/2]), wantErr: "answer is not JSON"},
		{name: "an object, not a list", body: `{"Service":{}}`, wantErr: "not a JSON array"},
		{name: "a long answer, not a list", body: `{"a":"` + strings.Repeat("x", maxNotArray) + `"}`, wantErr: `not a JSON array: it starts with "{\"a\":\"xxxxxxxxxxxxxx..."`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var h healthReader
			entries, bad, err := h.parse([]byte(tt.body))
			// Read a byte at a time, as a slow answer arrives, it reads
			// the same.
			oEntries, oBad, oErr := h.parseEntriesFrom(iotest.OneByteReader(strings.NewReader(tt.body)))
			if fmt.Sprint(oEntries, oBad, oErr) != fmt.Sprint(entries, bad, err) {
				t.Errorf("a byte at a time: %v %v %v; whole: %v %v %v", oEntries, oBad, oErr, entries, bad, err)
			}
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(entries) != tt.n {
				t.Fatalf("%d entries, want %d: %+v", len(entries), tt.n, entries)
			}
			if tt.n > 0 && entries[0] != tt.first {
				t.Errorf("first entry %+v, want %+v", entries[0], tt.first)
			}
			if len(bad) != len(tt.bad) {
				t.Fatalf("rejected %v, want %d", bad, len(tt.bad))
			}
			for i, want := range tt.bad {
				if !strings.Contains(bad[i].Error(), want) {
					t.Errorf("rejected[%d] = %v, want %q", i, bad[i], want)
				}
			}
		})
	}
}

// TestHealthParseReadError: an answer cut by a failed read is that
// error, not a JSON one, and nothing of it is used: a watch then retries
// rather than serving the entries read before the failure.
func TestHealthParseReadError(t *testing.T) {
	real, err := os.ReadFile(healthAnswerFile)
	if err != nil {
		t.Fatal(err)
	}
	reset := errors.New("connection reset by peer")
	for _, cut := range []int{0, 1, len(real) / 2, len(real) - 1, len(real)} {
		r := io.MultiReader(bytes.NewReader(real[:cut]), iotest.ErrReader(reset))
		var h healthReader
		entries, bad, err := h.parseEntriesFrom(r)
		if !errors.Is(err, reset) || !strings.Contains(err.Error(), "reading the answer") || entries != nil || bad != nil {
			t.Errorf("cut at %d: %d entries, %d bad, err %v; want the read error alone", cut, len(entries), len(bad), err)
		}
	}
}

// TestHealthParseMatchesAPI checks the parser against api's own decoding of
// the same real answer, field by field.
func TestHealthParseMatchesAPI(t *testing.T) {
	body, err := os.ReadFile(healthAnswerFile)
	if err != nil {
		t.Fatal(err)
	}
	var want []*api.ServiceEntry
	if err := json.Unmarshal(body, &want); err != nil {
		t.Fatal(err)
	}
	var h healthReader
	got, bad, err := h.parse(body)
	if err != nil || len(bad) > 0 {
		t.Fatal(err, bad)
	}
	if len(got) != len(want) {
		t.Fatalf("%d entries, api has %d", len(got), len(want))
	}
	for i, w := range want {
		exp := healthEntry{ID: w.Service.ID, Address: w.Service.Address, NodeAddress: w.Node.Address, Port: w.Service.Port,
			Weight: w.Service.Weights.Passing, WarningWeight: w.Service.Weights.Warning}
		switch w.Checks.AggregatedStatus() {
		case api.HealthWarning:
			exp.Warning = true
		case api.HealthCritical, api.HealthMaint:
			exp.Critical = true
		}
		if got[i] != exp {
			t.Errorf("entry %d: %+v, api reads %+v", i, got[i], exp)
		}
	}
}

// BenchmarkHealthDecode: one real answer (100 instances) decoded as api's
// Health().Connect does, and as the watches do.
func BenchmarkHealthDecode(b *testing.B) {
	body, err := os.ReadFile(healthAnswerFile)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("api.ServiceEntry", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		b.ReportAllocs()
		for b.Loop() {
			var out []*api.ServiceEntry
			if err := json.Unmarshal(body, &out); err != nil || len(out) != 100 {
				b.Fatal(err)
			}
		}
	})
	b.Run("healthReader.parse", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		b.ReportAllocs()
		var h healthReader
		for b.Loop() {
			out, _, err := h.parse(body)
			if err != nil || len(out) != 100 {
				b.Fatal(err)
			}
		}
	})
}

// TestHealthConnectConsul runs the query against a real agent: passing
// instances only, the blocking query waking on a change, and Consul's errors.
func TestHealthConnectConsul(t *testing.T) {
	c := testenv.Consul(t, testenv.ConsulOptions{})
	register := func(i int, status string) {
		t.Helper()
		id, node, addr := fmt.Sprintf("api-%d", i), fmt.Sprintf("node-%d", i), fmt.Sprintf("127.1.0.%d", i)
		_, err := c.Client.Catalog().Register(&api.CatalogRegistration{Node: node, Address: addr,
			Service: &api.AgentService{ID: id, Service: "api-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Port: 21000 + i,
				Weights: api.AgentWeights{Passing: i, Warning: 1},
				Proxy:   &api.AgentServiceConnectProxyConfig{DestinationServiceName: "api"}},
			Check: &api.AgentCheck{Node: node, CheckID: "alive", Name: "alive", Status: status, ServiceID: id}}, nil)
		if err != nil {
			t.Fatal(err)
		}
	}
	register(1, api.HealthPassing)
	register(2, api.HealthCritical)
	register(3, api.HealthPassing)
	register(4, api.HealthWarning)

	cfg := &api.Config{Address: c.Addr}
	if _, err := api.NewClient(cfg); err != nil {
		t.Fatal(err)
	}
	q := newHealthReader(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	entries, bad, index, at, err := q.connect(ctx, "api", "", 0, time.Minute)
	if err != nil || len(bad) > 0 {
		t.Fatal(err, bad)
	}
	if at.IsZero() || index == 0 {
		t.Errorf("at %v, index %d", at, index)
	}
	var ids []string
	for _, e := range entries {
		ids = append(ids, fmt.Sprintf("%s@%s:%d/w%d", e.ID, e.NodeAddress, e.Port, e.Weight))
	}
	if got := strings.Join(ids, " "); got != "api-1@127.1.0.1:21001/w1 api-3@127.1.0.3:21003/w3" {
		t.Errorf("passing entries: %s", got)
	}

	// Without "passing" (a chain target whose subset says OnlyPassing =
	// false): the warning instance too, with its warning weight; never
	// the critical one.
	a, err := q.connectFiltered(ctx, "api", "", "", false, 0, time.Minute)
	if err != nil || len(a.bad) > 0 {
		t.Fatal(err, a.bad)
	}
	ids = nil
	for _, e := range a.usable {
		ids = append(ids, fmt.Sprintf("%s/w%d", e.ID, e.Weight))
	}
	for _, e := range a.standby {
		ids = append(ids, "standby "+e.ID)
	}
	if got := strings.Join(ids, " "); got != "api-1/w1 api-3/w3 api-4/w1 standby api-2" {
		t.Errorf("entries not only passing: %s", got)
	}
	// The standby query: only the instances with a check that does not
	// pass, from Consul's filter; for a watch of passing ones, the warning
	// one is standby too.
	for _, tt := range []struct {
		onlyPassing bool
		want        string
	}{{true, "api-2 api-4"}, {false, "api-2"}} {
		a, err := q.standby(ctx, "api", "", tt.onlyPassing)
		if err != nil || len(a.bad) > 0 || len(a.usable) > 0 {
			t.Fatal(err, a.bad, a.usable)
		}
		ids = nil
		for _, e := range a.standby {
			ids = append(ids, e.ID)
		}
		if got := strings.Join(ids, " "); got != tt.want {
			t.Errorf("standby entries, only passing %t: %s, want %s", tt.onlyPassing, got, tt.want)
		}
	}
	// No change within the wait: the same index comes back.
	_, _, same, _, err := q.connect(ctx, "api", "", index, 200*time.Millisecond)
	if err != nil || same != index {
		t.Errorf("idle blocking query: index %d (was %d), err %v", same, index, err)
	}

	// A change wakes the blocking query.
	woke := make(chan error, 1)
	go func() {
		entries, _, next, _, err := q.connect(ctx, "api", "", index, time.Minute)
		if err == nil && (next <= index || len(entries) != 3) {
			err = fmt.Errorf("after the change: index %d (was %d), %d entries", next, index, len(entries))
		}
		woke <- err
	}()
	time.Sleep(100 * time.Millisecond)
	register(2, api.HealthPassing)
	select {
	case err := <-woke:
		if err != nil {
			t.Error(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the blocking query did not wake on a change")
	}

	// Consul's refusals come back as errors that say what Consul said.
	if _, _, _, _, err := q.connect(ctx, "api", "nowhere", 0, time.Minute); err == nil || !strings.Contains(err.Error(), "Consul answered 500") || !strings.Contains(err.Error(), "No path to datacenter") {
		t.Errorf("unknown datacenter: %v", err)
	}
	// A service with no instances is an empty list, not an error.
	if entries, _, _, _, err := q.connect(ctx, "nothing", "", 0, time.Minute); err != nil || len(entries) != 0 {
		t.Errorf("unknown service: %v, %v", entries, err)
	}
}

// TestACLFilteredIsLogged: an answer Consul filtered for the token is
// logged once when it starts, not for every answer, and once when it ends.
func TestACLFilteredIsLogged(t *testing.T) {
	var filtered atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if filtered.Load() {
			w.Header().Set("X-Consul-Results-Filtered-By-ACLs", "true")
		}
		w.Header().Set("X-Consul-Index", "7")
		fmt.Fprint(w, "[]")
	}))
	defer srv.Close()
	core, logs := observer.New(zap.InfoLevel)
	c, err := New(Config{Consul: &api.Config{Address: strings.TrimPrefix(srv.URL, "http://")}, ProxyID: "web-sidecar-proxy",
		StateDir: t.TempDir(), SPOASocket: "/state/spoa.sock", Log: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []bool{false, true, true, true, false, false} {
		filtered.Store(f)
		if _, _, _, _, err := c.health.connect(context.Background(), "api", "", 0, time.Second); err != nil {
			t.Fatal(err)
		}
	}
	var got []string
	for _, e := range logs.All() {
		got = append(got, e.Level.String()+" "+e.Message[:min(len(e.Message), 40)])
	}
	want := []string{"warn consul leaves instances of an upstream o", "info consul no longer leaves instances of an "}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("log lines (-want +got):\n%s", diff)
	}
}

// TestHealthNotOnlyPassing: what a chain target whose resolver subset says
// OnlyPassing = false uses: the worst check of an instance decides, a
// warning one takes its warning weight, and the others are standby.
func TestHealthNotOnlyPassing(t *testing.T) {
	entry := func(id, weights string, statuses ...string) string {
		var checks []string
		for _, st := range statuses {
			checks = append(checks, fmt.Sprintf(`{"Status":%q}`, st))
		}
		return fmt.Sprintf(`{"Service":{"ID":%q,"Address":"10.0.0.1","Port":80%s},"Checks":[%s]}`, id, weights, strings.Join(checks, ","))
	}
	tests := []struct {
		name    string
		body    string
		want    string // id/weight, usable ones
		standby string // ids
		bad     int
	}{
		{"passing", `[` + entry("a", `,"Weights":{"Passing":5,"Warning":2}`, "passing", "passing") + `]`, "a/5", "", 0},
		{"warning takes the warning weight", `[` + entry("a", `,"Weights":{"Passing":5,"Warning":2}`, "passing", "warning") + `]`, "a/2", "", 0},
		{"warning without weights: 1", `[` + entry("a", "", "warning") + `]`, "a/1", "", 0},
		{"warning weight 0: standby", `[` + entry("a", `,"Weights":{"Passing":5,"Warning":0}`, "warning") + `]`, "", "a", 0},
		{"critical node check: standby", `[` + entry("a", "", "critical", "passing") + `]`, "", "a", 0},
		{"critical beats warning", `[` + entry("a", "", "warning", "critical") + `]`, "", "a", 0},
		{"maintenance is critical", `[` + entry("a", "", "maintenance") + `]`, "", "a", 0},
		{"unknown status: standby", `[` + entry("a", "", "bogus") + `]`, "", "a", 0},
		{"no checks: usable", `[{"Service":{"ID":"a","Address":"10.0.0.1","Port":80}}]`, "a/0", "", 0},
		{"checks not a list: refused", `[{"Service":{"ID":"a","Address":"10.0.0.1","Port":80},"Checks":{}}]`, "", "", 1},
		{"warning weight not a number: refused", `[` + entry("a", `,"Weights":{"Warning":"x"}`, "warning") + `]`, "", "", 1},
		{"mixed", `[` + entry("a", "", "passing") + `,` + entry("b", "", "critical") + `,` + entry("c", `,"Weights":{"Passing":3,"Warning":1}`, "warning") + `]`, "a/0 c/1", "b", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var h healthReader
			entries, bad, err := h.parse([]byte(tt.body))
			if err != nil {
				t.Fatal(err)
			}
			usable, standby := split(entries, false)
			var got, gotStandby []string
			for _, e := range usable {
				got = append(got, fmt.Sprintf("%s/%d", e.ID, e.Weight))
			}
			for _, e := range standby {
				gotStandby = append(gotStandby, e.ID)
			}
			if g, gs := strings.Join(got, " "), strings.Join(gotStandby, " "); g != tt.want || gs != tt.standby || len(bad) != tt.bad {
				t.Errorf("usable %q, standby %q, %d refused; want %q, %q, %d", g, gs, len(bad), tt.want, tt.standby, tt.bad)
			}
		})
	}
	// Which watches keep instances with warnings.
	for _, tt := range []struct {
		u    Upstream
		want bool
	}{
		{Upstream{Name: "up_web"}, true},
		{Upstream{Name: "up_web:web::dc1", Target: "web::dc1"}, false},
		{Upstream{Name: "up_web:web:v1:dc1", Target: "web:v1:dc1", OnlyPassing: true}, true},
	} {
		if got := onlyPassing(tt.u); got != tt.want {
			t.Errorf("onlyPassing(%s) = %v, want %v", tt.u.Name, got, tt.want)
		}
	}
}
