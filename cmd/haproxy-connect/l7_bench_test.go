package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// TestL7KeepAliveRate measures the keep-alive request rate through
// client sidecar -> server sidecar -> app for a source under an L7
// intention (three permissions: deny /admin, deny X-Debug present, allow
// the rest; every request runs them all and is allowed by the last) and
// for a source under an L4 allow, paired: the same server sidecar, wrk
// against each source's upstream in turn, rounds alternating; once with
// one path (every L7 request the same shape: HAProxy's remembered allows)
// and once with a random path per request (every L7 request asks the
// agent). It reports the median rates and the ratios. It asserts nothing on speed (it only
// fails when a request fails), and runs only when asked (about a minute):
//
//	HC_L7_BENCH=1 go test -count=1 -run TestL7KeepAliveRate -v ./cmd/haproxy-connect/
func TestL7KeepAliveRate(b *testing.T) {
	if os.Getenv("HC_L7_BENCH") == "" {
		b.Skip("a measurement: set HC_L7_BENCH=1 to run it")
	}
	const (
		rounds  = 12
		seconds = 2
		conns   = 16
	)
	wrk, err := exec.LookPath("wrk")
	if err != nil {
		b.Skip("wrk not installed")
	}
	consul := testenv.Consul(b, testenv.ConsulOptions{DefaultDeny: true})
	c := consul.Client
	httpServiceDefaults(b, c, "server")
	ports := testenv.FreePorts(b, 7)
	register(b, c, "server", httpApp(b, "server"), ports[0], map[string]any{"protocol": "http"})
	up := func(port int) api.Upstream {
		return api.Upstream{DestinationName: "server", LocalBindPort: port, Config: map[string]any{"protocol": "http"}}
	}
	register(b, c, "l7client", ports[1], ports[2], nil, up(ports[3]))
	register(b, c, "l4client", ports[4], ports[5], nil, up(ports[6]))
	if _, _, err := c.ConfigEntries().Set(&api.ServiceIntentionsConfigEntry{
		Kind: api.ServiceIntentions, Name: "server",
		Sources: []*api.SourceIntention{
			{Name: "l7client", Permissions: []*api.IntentionPermission{denyPrefix("/admin"), denyHeader("X-Debug"), allowRest()}},
			{Name: "l4client", Action: api.IntentionActionAllow},
		},
	}, nil); err != nil {
		b.Fatal(err)
	}
	// No access log: it costs the same for both, and this measures the
	// decisions.
	// The server at log level info, as in production: at debug the
	// agent writes a line per L7 decision.
	startSidecar(b, consul, "server", "-access-log=false", "-log-level", "info")
	startSidecar(b, consul, "l7client", "-access-log=false")
	startSidecar(b, consul, "l4client", "-access-log=false")
	eventually(b, 10*time.Second, "both sources served", func() error {
		for _, p := range []int{ports[3], ports[6]} {
			if err := get200(p)(); err != nil {
				return err
			}
		}
		return nil
	})
	rateRE := regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	non2xx := regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
	// unique.lua gives every request its own path: none repeats a
	// request shape, so each L7 request is the agent's.
	script := filepath.Join(b.TempDir(), "unique.lua")
	if err := os.WriteFile(script, []byte(`request = function() return wrk.format("GET", "/r/" .. math.random(1, 1000000000)) end`+"\n"), 0o644); err != nil {
		b.Fatal(err)
	}
	run := func(port int, unique bool) float64 {
		args := []string{"-t2", fmt.Sprintf("-c%d", conns), fmt.Sprintf("-d%ds", seconds)}
		if unique {
			args = append(args, "-s", script)
		}
		out, err := exec.Command(wrk, append(args, fmt.Sprintf("http://127.0.0.1:%d/", port))...).CombinedOutput()
		if err != nil {
			b.Fatalf("wrk: %v\n%s", err, out)
		}
		if m := non2xx.FindSubmatch(out); m != nil {
			b.Fatalf("wrk got %s non-2xx responses:\n%s", m[1], out)
		}
		m := rateRE.FindSubmatch(out)
		if m == nil {
			b.Fatalf("no rate in wrk output:\n%s", out)
		}
		r, _ := strconv.ParseFloat(string(m[1]), 64)
		return r
	}
	type cell struct {
		name   string
		port   int
		unique bool
	}
	cells := []cell{{"L4 allow, one path", ports[6], false}, {"L7, one path (remembered allows)", ports[3], false},
		{"L4 allow, unique paths", ports[6], true}, {"L7, unique paths (agent per request)", ports[3], true}}
	rates := make([][]float64, len(cells))
	for i := range rounds {
		// Alternate the order, so that a drift in the machine's load
		// weighs on every cell.
		for k := range cells {
			j := k
			if i%2 == 1 {
				j = len(cells) - 1 - k
			}
			rates[j] = append(rates[j], run(cells[j].port, cells[j].unique))
		}
	}
	med := func(xs []float64) float64 { s := slices.Clone(xs); slices.Sort(s); return s[len(s)/2] }
	for j, c := range cells {
		b.Logf("%-40s median %7.0f req/s, rounds %.0f", c.name, med(rates[j]), rates[j])
	}
	// Each round's L7 run sits next to its L4 run: the median of the
	// rounds' ratios is less swayed by the machine's other load than the
	// ratio of the medians.
	paired := func(l7, l4 []float64) float64 {
		r := make([]float64, len(l7))
		for i := range l7 {
			r[i] = l7[i] / l4[i]
		}
		return med(r) * 100
	}
	b.Logf("keep-alive, wrk -t2 -c%d -d%ds, %d rounds: L7 ÷ L4, ratio of medians / median of paired ratios: one path %.1f %% / %.1f %%, unique paths %.1f %% / %.1f %%",
		conns, seconds, rounds, med(rates[1])/med(rates[0])*100, paired(rates[1], rates[0]), med(rates[3])/med(rates[2])*100, paired(rates[3], rates[2]))
}
