package spoa

import (
	"context"
	"crypto/x509"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/consul/api"
	"go.uber.org/zap/zaptest"
)

// TestWatchIntentionsIndex drives the watch loop with a fake Consul that
// answers a scripted sequence, and checks the index each query sent and
// the invalidations it caused.
func TestWatchIntentionsIndex(t *testing.T) {
	type reply struct {
		index  uint64
		status int // 0 for 200
	}
	script := []reply{
		{index: 5},              // first answer: invalidate
		{index: 5},              // wait expired, no change
		{index: 7},              // change: invalidate
		{index: 3},              // backwards: reset to 0, invalidate
		{status: 500},           // error: back off, keep the index
		{index: 3},              // from 0: invalidate
		{index: 9, status: 503}, // error again
		{index: 4},              // change: invalidate
	}
	var (
		mu       sync.Mutex
		sent     []string
		problems []string
	)
	done := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/agent/self" {
			_, _ = w.Write([]byte(`{"DebugConfig":{"DefaultIntentionPolicy":"deny"}}`))
			return
		}
		q := r.URL.Query()
		mu.Lock()
		n := len(sent)
		sent = append(sent, q.Get("index"))
		if r.URL.Path != "/v1/connect/intentions/match" || q.Get("by") != "destination" ||
			q.Get("name") != "default/default/web" || !q.Has("cached") || q.Get("wait") == "" {
			problems = append(problems, r.URL.String())
		}
		mu.Unlock()
		if n >= len(script) {
			if n == len(script) {
				close(done)
			}
			<-r.Context().Done() // block like a quiet Consul
			return
		}
		rep := script[n]
		w.Header().Set("X-Consul-Index", strconv.FormatUint(rep.index, 10))
		if rep.status != 0 {
			w.WriteHeader(rep.status)
			return
		}
		// Each answer holds another intention: every one published is
		// a change.
		fmt.Fprintf(w, `{"default/default/web":[{"ID":"i%d","SourceNS":"default","SourceName":"s%d","DestinationNS":"default","DestinationName":"web","Action":"allow"}]}`, n, n)
	}))
	defer srv.Close()
	client, err := api.NewClient(&api.Config{Address: srv.URL})
	if err != nil {
		t.Fatal(err)
	}

	a := newTest(t, &fakeDecider{})
	a.watchMinInterval = 0
	if err := watchScript(t, a, client, done); err != nil {
		t.Errorf("WatchIntentions returned %v after cancel, want nil", err)
	}
	mu.Lock()
	defer mu.Unlock()
	want := []string{"", "5", "5", "7", "", "", "3", "3", "4"}
	if diff := cmp.Diff(want, sent); diff != "" {
		t.Errorf("index sent per query (-want +got):\n%s", diff)
	}
	if len(problems) > 0 {
		t.Errorf("malformed queries: %q", problems)
	}
	if n := a.Stats().Invalidations; n != 5 {
		t.Errorf("%d invalidations, want 5", n)
	}
}

// TestWatchIntentionsHostile: an answer naming another service than the
// one asked is refused and nothing is held; an answer that decides as
// the held one does (the index moved on another service's intentions)
// does not drop the cache; one that decides differently does, and the
// agent then decides from it.
func TestWatchIntentionsHostile(t *testing.T) {
	const deny = `{"ID":"x","SourceNS":"default","SourceName":"client","DestinationNS":"default","DestinationName":"web","Action":"deny"}`
	script := []string{
		`{"default/default/web":[` + deny + `],"default/default/api":[]}`, // not just what was asked
		`{"default/default/web":[]}`,
		`{"default/default/web":[]}`, // same decisions
		`{"default/default/web":[` + deny + `]}`,
	}
	var mu sync.Mutex
	n := 0
	done := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/agent/self" {
			_, _ = w.Write([]byte(`{"DebugConfig":{"ACLsEnabled":false}}`))
			return
		}
		mu.Lock()
		i := n
		n++
		mu.Unlock()
		if i >= len(script) {
			if i == len(script) {
				close(done)
			}
			<-r.Context().Done()
			return
		}
		w.Header().Set("X-Consul-Index", strconv.Itoa(10+i))
		_, _ = w.Write([]byte(script[i]))
	}))
	defer srv.Close()
	client, err := api.NewClient(&api.Config{Address: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	a := New("web", nil, zaptest.NewLogger(t))
	t.Cleanup(func() { a.Close() })
	if err := a.SetRoots(testTD, []*x509.Certificate{testCA().Cert}, nil); err != nil {
		t.Fatal(err)
	}
	a.watchMinInterval = 0
	der := leafDER(t, testCA(), 3, clientID)
	watchScript(t, a, client, done)
	// The refused answer held nothing; the first good one invalidated
	// (default allow), the same one again did not, the deny did.
	if got := a.Stats().Invalidations; got != 2 {
		t.Errorf("%d invalidations, want 2", got)
	}
	if d := a.decide(der, nil); d.allowed || d.undecided || !strings.HasPrefix(d.reason, "Matched L4 intention") {
		t.Errorf("decision %+v, want the deny intention's", d)
	}
}

// watchScript runs a's intentions watch against client until done (the
// scripted answers were all served), then stops it and returns what it
// returned.
func watchScript(t *testing.T, a *Authorizer, client *api.Client, done <-chan struct{}) error {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ret := make(chan error)
	go func() { ret <- a.WatchIntentions(ctx, client) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("script not consumed in 10s")
	}
	cancel()
	return <-ret
}
