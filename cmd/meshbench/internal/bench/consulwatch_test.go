package bench

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
)

func TestHealth(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Accept-Encoding") != "" {
			t.Errorf("Accept-Encoding %q: the baseline must not ask Consul to compress", r.Header.Get("Accept-Encoding"))
		}
		w.Header().Set("X-Consul-Index", "42")
		_, _ = w.Write([]byte(`[{"Node":{"Address":"10.0.0.1"},"Service":{"Address":"127.1.0.5","Port":2000,"Proxy":{"Upstreams":[]}},"Checks":[]},
			{"Node":{"Address":"10.0.0.2"},"Service":{"Address":"","Port":3000}}]`))
	}))
	defer srv.Close()
	set, idx, err := Health(context.Background(), nil, srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	if idx != 42 {
		t.Errorf("index = %d, want 42", idx)
	}
	want := map[string]bool{"127.1.0.5:2000": true, "10.0.0.2:3000": true}
	if len(set) != len(want) || !set["127.1.0.5:2000"] || !set["10.0.0.2:3000"] {
		t.Errorf("set = %v, want %v", set, want)
	}
}
