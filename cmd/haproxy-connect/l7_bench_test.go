package main

import (
	"fmt"
	"os"
	"os/exec"
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
// against each source's upstream in turn, rounds alternating. It reports
// the median rates and their ratio. It asserts nothing on speed (it only
// fails when a request fails), and runs only when asked (about a minute):
//
//	HC_L7_BENCH=1 go test -count=1 -run TestL7KeepAliveRate -v ./cmd/haproxy-connect/
func TestL7KeepAliveRate(b *testing.T) {
	if os.Getenv("HC_L7_BENCH") == "" {
		b.Skip("a measurement: set HC_L7_BENCH=1 to run it")
	}
	const (
		rounds  = 5
		seconds = 5
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
	startSidecar(b, consul, "server", "-access-log=false")
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
	run := func(port int) float64 {
		out, err := exec.Command(wrk, "-t2", fmt.Sprintf("-c%d", conns), fmt.Sprintf("-d%ds", seconds),
			fmt.Sprintf("http://127.0.0.1:%d/", port)).CombinedOutput()
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
	var l7, l4 []float64
	for i := range rounds {
		// Alternate which goes first, so that a drift in the machine's
		// load weighs on both.
		if i%2 == 0 {
			l4 = append(l4, run(ports[6]))
			l7 = append(l7, run(ports[3]))
		} else {
			l7 = append(l7, run(ports[3]))
			l4 = append(l4, run(ports[6]))
		}
	}
	med := func(xs []float64) float64 { s := slices.Clone(xs); slices.Sort(s); return s[len(s)/2] }
	b.Logf("keep-alive, wrk -t2 -c%d -d%ds, %d rounds: L4 allow %v req/s, L7 permissions %v req/s", conns, seconds, rounds, l4, l7)
	b.Logf("median: L4 allow %.0f req/s, L7 permissions %.0f req/s: L7 at %.1f %% of L4", med(l4), med(l7), med(l7)/med(l4)*100)
}
