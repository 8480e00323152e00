package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	dto "github.com/prometheus/client_model/go"

	"github.com/haproxy-connect/haproxy-connect/scrape"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// dashboardFile is the Grafana dashboard shipped in the repository.
const dashboardFile = "../../deploy/grafana/haproxy-connect.json"

// dashboardPanel is the part of a Grafana panel the test reads: rows hold
// panels when collapsed.
type dashboardPanel struct {
	Title   string                  `json:"title"`
	Type    string                  `json:"type"`
	Targets []struct{ Expr string } `json:"targets"`
	Panels  []dashboardPanel        `json:"panels"`
}

// metricNameRE finds the series names in a PromQL expression: every
// metric this project and HAProxy serve starts with haproxy_, and no
// PromQL function, label or variable does.
var metricNameRE = regexp.MustCompile(`\bhaproxy_[a-z0-9_]+`)

// dashboardQueries returns, per panel title, the metric names its
// queries read. Every panel but rows must query something.
func dashboardQueries(t *testing.T) map[string][]string {
	t.Helper()
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Panels     []dashboardPanel `json:"panels"`
		Templating struct {
			List []struct {
				Name  string `json:"name"`
				Query any    `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	out := map[string][]string{}
	var walk func([]dashboardPanel)
	walk = func(ps []dashboardPanel) {
		for _, p := range ps {
			walk(p.Panels)
			if p.Type == "row" {
				continue
			}
			var names []string
			for _, tg := range p.Targets {
				names = append(names, metricNameRE.FindAllString(tg.Expr, -1)...)
			}
			if len(names) == 0 {
				t.Errorf("panel %q queries no haproxy_ series", p.Title)
			}
			out[p.Title] = names
		}
	}
	walk(d.Panels)
	// The variables' queries name series too.
	for _, v := range d.Templating.List {
		q, _ := json.Marshal(v.Query)
		if names := metricNameRE.FindAllString(string(q), -1); len(names) > 0 {
			out["variable "+v.Name] = names
		}
	}
	return out
}

// onMetrics reports whether name is a series in fams: a family, or the
// _bucket, _sum or _count series of a histogram family.
func onMetrics(fams scrape.Families, name string) bool {
	if f := fams[name]; f != nil && len(f.GetMetric()) > 0 {
		return true
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(name, suffix); ok {
			if f := fams[base]; f != nil && f.GetType() == dto.MetricType_HISTOGRAM && len(f.GetMetric()) > 0 {
				return true
			}
		}
	}
	return false
}

// TestDashboardSeriesExist: every series a panel of the shipped Grafana
// dashboard queries is on the sidecars' /metrics (real HAProxy, real
// Consul) after endpoint churn and a deny, with traffic flowing through
// the upstream before, during and after. The client sidecar serves the
// upstream's series, the server sidecar the decisions; a dashboard
// queries every sidecar, so the union is checked, and each sidecar serves
// HAProxy's series beside its own.
func TestDashboardSeriesExist(t *testing.T) {
	queries := dashboardQueries(t)
	if len(queries) < 10 {
		t.Fatalf("%d panels in %s, want the dashboard's (10 or more)", len(queries), dashboardFile)
	}

	m := startMesh(t, testenv.ConsulOptions{}, "http")
	eventually(t, 10*time.Second, "the upstream serves", serves(m.ports[3], "hello from server"))
	stop := load(get200(m.ports[3]))

	// Churn: endpoints come and go, each applied through the runtime API.
	for i := range 3 {
		id := fmt.Sprintf("server-extra-%d", i)
		port := addServerEndpoint(t, m.c, id, m.ports[0])
		eventually(t, 10*time.Second, id+" in service", m.client.inBackend("up_server", port))
		if err := m.c.Agent().ServiceDeregister(id); err != nil {
			t.Fatal(err)
		}
		eventually(t, 10*time.Second, id+" out of service", func() error {
			if m.client.inBackend("up_server", port)() == nil {
				return errors.New("still in service")
			}
			return nil
		})
	}
	ok, failed, first := stop()
	if ok == 0 || failed > 0 {
		t.Errorf("calls during churn: %d of %d failed; first: %v", failed, ok+failed, first)
	}

	// A deny: the next requests get 403 from the server sidecar.
	intention(t, m.c, "client", "server", api.IntentionActionDeny)
	eventually(t, 10*time.Second, "denied", func() error {
		if code, _, err := get(m.ports[3]); err != nil || code != 403 {
			return fmt.Errorf("status %d %v, want 403", code, err)
		}
		return nil
	})

	client, err := m.client.metrics()
	if err != nil {
		t.Fatal(err)
	}
	server, err := m.server.metrics()
	if err != nil {
		t.Fatal(err)
	}
	for i, f := range []scrape.Families{client, server} {
		if v, err := f.Value("haproxy_connect_haproxy_exporter_up"); err != nil || v != 1 {
			t.Errorf("haproxy_connect_haproxy_exporter_up = %v %v, want 1", v, err)
		}
		s := []*sidecar{m.client, m.server}[i]
		if out := s.out.String(); strings.Contains(out, "metrics collection failed") || strings.Contains(out, "exporter not read") {
			t.Errorf("%s logged a failed collection:\n%s", s.id, out)
		}
		t.Logf("%s: %d metric families, %d of them HAProxy's", s.id, len(f), countPrefix(f, "haproxy_", "haproxy_connect_"))
	}
	titles := make([]string, 0, len(queries))
	for title := range queries {
		titles = append(titles, title)
	}
	slices.Sort(titles)
	for _, title := range titles {
		for _, name := range queries[title] {
			if !onMetrics(client, name) && !onMetrics(server, name) {
				t.Errorf("panel %q: %s on neither sidecar's /metrics", title, name)
			}
		}
	}

	// The churn, the traffic and the deny are in the series, not only
	// their names.
	checks := []struct {
		what  string
		f     scrape.Families
		name  string
		label []string
	}{
		{"requests through the upstream", client, "haproxy_backend_http_requests_total", []string{"proxy", "up_server"}},
		{"propagations of the churn", client, "haproxy_connect_endpoint_propagation_seconds_count", nil},
		{"denies", server, "haproxy_connect_authz_decisions_total", []string{"result", "deny"}},
		{"403s on the public listener", server, "haproxy_frontend_http_responses_total", []string{"proxy", "public_listener", "code", "4xx"}},
	}
	for _, c := range checks {
		if v, err := c.f.Value(c.name, c.label...); err != nil || v < 1 {
			t.Errorf("%s: %s%q = %v %v, want 1 or more", c.what, c.name, c.label, v, err)
		}
	}
	if n, err := client.Value("haproxy_connect_upstream_endpoints", "upstream", "up_server"); err != nil || n != 1 {
		t.Errorf("up_server endpoints after the churn = %v %v, want 1", n, err)
	}
}

// countPrefix counts the families whose name starts with prefix and not
// with except.
func countPrefix(f scrape.Families, prefix, except string) int {
	n := 0
	for name := range f {
		if strings.HasPrefix(name, prefix) && !strings.HasPrefix(name, except) {
			n++
		}
	}
	return n
}
