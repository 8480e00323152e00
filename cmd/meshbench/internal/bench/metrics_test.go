package bench

import (
	"strings"
	"testing"

	"github.com/haproxy-connect/haproxy-connect/scrape"
)

func TestDecisions(t *testing.T) {
	parse := func(text string) scrape.Families {
		f, err := scrape.Parse(strings.NewReader(text))
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	m := "# TYPE haproxy_connect_authz_decisions_total counter\n" +
		"haproxy_connect_authz_decisions_total{result=\"allow\"} 16082\n" +
		"haproxy_connect_authz_decisions_total{result=\"deny\"} 3\n" +
		"haproxy_connect_authz_decisions_total{result=\"undecided\"} 7\n" +
		"haproxy_connect_authz_cache_hits_total 16080\n"
	if got, err := Decisions(parse(m)); err != nil || got != 16085 {
		t.Errorf("got %d, %v; want 16085 (allow and deny)", got, err)
	}
	if _, err := Decisions(parse("other 1\n")); err == nil {
		t.Error("metrics without decisions parsed")
	}
}
