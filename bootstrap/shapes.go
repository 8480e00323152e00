package bootstrap

import (
	"fmt"
	"regexp"
	"strings"
)

// Pieces of the line shapes: what a validated value can look like once
// rendered (input.Addr, input.Ident, input.Path and integers).
const (
	shapeAddrPort = `(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-f:.]{2,45}\]):\d{1,5}`
	shapeIdent    = `[A-Za-z0-9_.:-]{1,160}`
	shapePath     = `/[A-Za-z0-9_./+-]{1,255}`
)

// configLines lists every line shape Render may produce. It is the
// contract between the renderer and HAProxy's parser: a line that matches
// none means some value reached the configuration unvalidated (or ended a
// line early, as an IPv6 zone holding "\nprogram x\n command ..." would),
// and Render refuses the configuration. A new kind of line needs its shape
// here.
var configLines = regexp.MustCompile(`^(` + strings.Join([]string{
	`# [ -~]*`,
	``,
	`global`, `defaults`, `    master-worker`,
	`    hard-stop-after \d+ms`,
	`    nbthread \d{1,2}`,
	`    ssl-default-(bind|server)-options ssl-min-ver TLSv1\.2`,
	`    tune\.ssl\.default-dh-param 2048`,
	`    log stdout format raw local0 info`,
	`    log global`, `    no log`, `    option (http|tcp)log`,
	`    log-format "[ !#-~]*"`,
	`    timeout (connect|client|server|http-request|http-keep-alive) \d+(ms|s|m|h)`,
	`(frontend|backend) ` + shapeIdent,
	`    mode (tcp|http)`,
	`    bind ` + shapeAddrPort + ` ssl crt ` + shapePath + ` ca-file ` + shapePath + ` verify required( alpn h2,http/1\.1)?`,
	`    bind ` + shapeAddrPort,
	`    filter spoe engine intentions config ` + shapePath,
	`    tcp-request inspect-delay 5s`,
	`    tcp-request content reject unless \{ var\(sess\.hc\.allowed\) -m bool \}`,
	`    acl authz_stale str\(gen\),map_str_int\(` + shapePath + `,0\),sub\(sess\.hc\.gen\) -m int gt 0`,
	`    http-request unset-var\(sess\.hc\.allowed\) if authz_stale`,
	`    http-request send-spoe-group intentions authz if !\{ var\(sess\.hc\.allowed\) -m found \}`,
	`    http-request deny deny_status 403 unless \{ var\(sess\.hc\.allowed\) -m bool \}`,
	`    http-request deny deny_status 503 unless \{ var\(sess\.hc\.allowed\) -m found \}`,
	`    http-request reject if !\{ var\(sess\.hc\.allowed\) -m found \} \{ stopping \}`,
	`    option redispatch`,
	`    retry-on conn-failure empty-response`,
	`    http-reuse always`,
	`    default_backend ` + shapeIdent,
	`    balance roundrobin`,
	`    default-server ssl crt ` + shapePath + ` ca-file ` + shapePath + ` verify required( alpn (h2|h2,http/1\.1))?`,
	`    server (app|agent) ` + shapeAddrPort,
	`    server s\d+ ` + shapeAddrPort + ` weight \d{1,3}`,
	`    server-template s \d+-\d+ 127\.0\.0\.1:1 disabled`,
}, "|") + `)$`)

// CheckConfig checks rendered configuration text: every line has a shape of
// configLines, every indented line belongs to a section, and no frontend or
// backend is declared twice. Render runs it on everything it returns.
func CheckConfig(cfg string) error {
	if !strings.HasSuffix(cfg, "\n") {
		return fmt.Errorf("%w: rendered configuration does not end with a newline", ErrInvalid)
	}
	inSection := false
	seen := map[string]bool{}
	for i, line := range strings.Split(strings.TrimSuffix(cfg, "\n"), "\n") {
		if !configLines.MatchString(line) {
			return fmt.Errorf("%w: rendered configuration line %d %q has no known shape", ErrInvalid, i+1, line)
		}
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "    "):
			if !inSection {
				return fmt.Errorf("%w: rendered configuration line %d %q is outside any section", ErrInvalid, i+1, line)
			}
		default:
			if seen[line] {
				return fmt.Errorf("%w: rendered configuration declares %q twice", ErrInvalid, line)
			}
			seen[line] = true
			inSection = true
		}
	}
	return nil
}
