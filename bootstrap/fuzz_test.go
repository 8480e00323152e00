package bootstrap

import (
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/haproxy-connect/haproxy-connect/slots"
)

// lineRE lists every line shape Render may produce once its variable parts
// are validated values. A line that matches none means some input reached
// the configuration unvalidated.
var lineRE = regexp.MustCompile(`^(` + strings.Join([]string{
	`# [^\n]*`,
	``,
	`global`, `defaults`, `    master-worker`,
	`    hard-stop-after \d+ms`,
	`    ssl-default-(bind|server)-options ssl-min-ver TLSv1\.2`,
	`    tune\.ssl\.default-dh-param 2048`,
	`    log stdout format raw local0 info`,
	`    log global`, `    no log`, `    option (http|tcp)log`,
	`    log-format "[^"\n]*"`,
	`    timeout (connect|client|server|http-request|http-keep-alive) \d+(ms|s|m|h)`,
	`(frontend|backend) [A-Za-z0-9_.-]+`,
	`    mode (tcp|http)`,
	`    bind [0-9a-fA-F.:\[\]]+ ssl crt-list /[A-Za-z0-9_./+-]+ ca-file /[A-Za-z0-9_./+-]+ verify required( alpn h2,http/1\.1)?`,
	`    bind [0-9a-fA-F.:\[\]]+`,
	`    filter spoe engine intentions config /[A-Za-z0-9_./+-]+`,
	`    tcp-request inspect-delay 5s`,
	`    tcp-request content reject unless \{ var\(sess\.hc\.allowed\) -m bool \}`,
	`    acl authz_stale str\(gen\),map_str_int\(/[A-Za-z0-9_./+-]+,0\),sub\(sess\.hc\.gen\) -m int gt 0`,
	`    http-request unset-var\(sess\.hc\.allowed\) if authz_stale`,
	`    http-request send-spoe-group intentions authz if !\{ var\(sess\.hc\.allowed\) -m found \}`,
	`    http-request deny deny_status 403 unless \{ var\(sess\.hc\.allowed\) -m bool \}`,
	`    http-request deny deny_status 503 unless \{ var\(sess\.hc\.allowed\) -m found \}`,
	`    http-request reject if !\{ var\(sess\.hc\.allowed\) -m found \} \{ stopping \}`,
	`    option redispatch`,
	`    retry-on conn-failure empty-response`,
	`    default_backend [A-Za-z0-9_.-]+`,
	`    balance roundrobin`,
	`    default-server ssl crt /[A-Za-z0-9_./+-]+ ca-file /[A-Za-z0-9_./+-]+ verify required( alpn h2(,http/1\.1)?)?`,
	`    server app [0-9a-fA-F.:\[\]]+`,
	`    server agent unix@/[A-Za-z0-9_./+-]+`,
	`    server s\d+ [0-9a-fA-F.:\[\]]+ weight \d+`,
	`    server-template s \d+-\d+ 127\.0\.0\.1:1 disabled`,
}, "|") + `)$`)

// FuzzRender feeds arbitrary strings and numbers into every field that can
// come from Consul. Render must either reject the spec or produce only
// known line shapes, with exactly one frontend and backend per upstream.
func FuzzRender(f *testing.F) {
	f.Add("web", "api", "127.0.0.1", 9191, "tcp", "10.0.0.1", 21000, 1, "127.0.0.1", 8080, "dc2", int64(250))
	f.Add("web", "api\n    server x 1.1.1.1:1", "::1", 1, "http", "fd00::1", 65535, 256, "::1", 1, "", int64(0))
	f.Add("w;b", "a b", "1.2.3.4 ", 0, "grpc\n", "10.0.0.1 port 1", 70000, 999, "localhost", -1, "dc 1", int64(-5))
	f.Fuzz(func(t *testing.T, service, dest, bindAddr string, bindPort int, protocol, epAddr string, epPort, weight int, localAddr string, localPort int, dc string, timeoutMS int64) {
		s := baseSpec()
		s.Service = service
		s.Public.LocalAddr, s.Public.LocalPort, s.Public.Protocol = localAddr, localPort, protocol
		s.Public.ConnectTimeout = time.Duration(timeoutMS) * time.Millisecond
		name, err := UpstreamName(dest, dc)
		if err != nil {
			name = "up_" + dest // let Render see the raw value too
		}
		_, table, _ := slots.Plan(slots.New(name, SlotPrefix, 4), []slots.Endpoint{{Addr: epAddr, Port: epPort, Weight: weight}})
		if len(table.Slots) > 0 && !table.Slots[0].Used {
			// Bypass the planner's own validation: Render must hold on its own.
			table.Slots[0] = slots.Slot{Name: "s1", Used: true, Addr: epAddr, Port: epPort, Weight: weight}
		}
		s.Upstreams = []Upstream{{Name: name, Destination: dest, BindAddr: bindAddr, BindPort: bindPort, Protocol: protocol,
			ConnectTimeout: time.Duration(timeoutMS) * time.Millisecond, Slots: table}}
		out, err := Render(s)
		if err != nil {
			return
		}
		frontends, backends := 0, 0
		for _, line := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
			if !lineRE.MatchString(line) {
				t.Fatalf("unexpected config line %q from inputs service=%q dest=%q bind=%q proto=%q ep=%q local=%q", line, service, dest, bindAddr, protocol, epAddr, localAddr)
			}
			if strings.HasPrefix(line, "frontend ") {
				frontends++
			}
			if strings.HasPrefix(line, "backend ") {
				backends++
			}
		}
		if frontends != 2 || backends != 3 {
			t.Fatalf("%d frontends and %d backends, want 2 and 3", frontends, backends)
		}
	})
}
