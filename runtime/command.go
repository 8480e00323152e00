// Package runtime drives HAProxy through its master socket: it builds runtime
// commands from validated values, sends them in batches over one connection,
// classifies every reply, and confirms reloads. It knows HAProxy, not Consul.
package runtime

import (
	"fmt"
	"net/netip"
	"regexp"
	"strings"
)

// Command is one runtime API command. Build commands with the constructors in
// this file: they validate every argument, so no value can smuggle a second
// command (";" or a newline) onto the socket.
type Command struct {
	// Target is the master CLI routing prefix: "@1" (the current worker),
	// "@!<pid>", or "" for a command the master itself answers.
	Target string
	// Line is the command without its routing prefix.
	Line string
	// Payload, when set, is sent after "<<" and ends with an empty line.
	Payload string
	// expect classifies a reply that is not one of the known error sentences.
	expect func(reply string) error
}

// String is the command exactly as it is written on the socket, without the
// payload: the text an operator pastes into socat.
func (c Command) String() string {
	s := c.Line
	if c.Target != "" {
		s = c.Target + " " + s
	}
	if c.Payload != "" {
		s += " <<"
	}
	return s
}

// ServerState is an administrative state accepted by "set server ... state".
type ServerState string

// The states a server can be put in at run time.
const (
	StateReady ServerState = "ready"
	StateDrain ServerState = "drain"
	StateMaint ServerState = "maint"
)

// MaxWeight is the largest absolute weight HAProxy accepts.
const MaxWeight = 256

// identRE is HAProxy's identifier alphabet for proxy and server names
// (src/tools.c invalid_char: letters, digits, '-', '_', '.', ':').
var identRE = regexp.MustCompile(`^[A-Za-z0-9_.:-]{1,64}$`)

// pathRE limits the certificate file names we hand HAProxy: absolute, no
// spaces, no separators the CLI would split on.
var pathRE = regexp.MustCompile(`^/[A-Za-z0-9_./+-]{1,255}$`)

// ValidIdent reports whether s can be used as a backend or server name.
func ValidIdent(s string) bool { return identRE.MatchString(s) }

func checkServer(backend, server string) error {
	if !ValidIdent(backend) {
		return fmt.Errorf("%w: backend name %q", ErrInvalidArgument, backend)
	}
	if !ValidIdent(server) {
		return fmt.Errorf("%w: server name %q", ErrInvalidArgument, server)
	}
	return nil
}

// CheckAddr validates an endpoint address and port the way the runtime API
// needs them: an IP literal (HAProxy 2.6 "set server addr" resolves nothing)
// and a port in 1-65535. HAProxy itself wraps out-of-range ports silently
// (70000 becomes 4464), so the range is checked here.
func CheckAddr(addr string, port int) error {
	if _, err := netip.ParseAddr(addr); err != nil {
		return fmt.Errorf("%w: address %q is not an IP literal", ErrInvalidArgument, addr)
	}
	if port < 1 || port > 65535 {
		return fmt.Errorf("%w: port %d out of range 1-65535", ErrInvalidArgument, port)
	}
	return nil
}

func worker(line string, expect func(string) error) Command {
	return Command{Target: "@1", Line: line, expect: expect}
}

// SetServerAddr points a server at addr:port.
func SetServerAddr(backend, server, addr string, port int) (Command, error) {
	if err := checkServer(backend, server); err != nil {
		return Command{}, err
	}
	if err := CheckAddr(addr, port); err != nil {
		return Command{}, err
	}
	return worker(fmt.Sprintf("set server %s/%s addr %s port %d", backend, server, addr, port), expectAddrChange), nil
}

// SetServerState changes a server's administrative state.
func SetServerState(backend, server string, state ServerState) (Command, error) {
	if err := checkServer(backend, server); err != nil {
		return Command{}, err
	}
	switch state {
	case StateReady, StateDrain, StateMaint:
	default:
		return Command{}, fmt.Errorf("%w: server state %q", ErrInvalidArgument, state)
	}
	return worker(fmt.Sprintf("set server %s/%s state %s", backend, server, state), expectEmpty), nil
}

// SetServerWeight sets a server's absolute weight (0-256).
func SetServerWeight(backend, server string, weight int) (Command, error) {
	if err := checkServer(backend, server); err != nil {
		return Command{}, err
	}
	if weight < 0 || weight > MaxWeight {
		return Command{}, fmt.Errorf("%w: weight %d out of range 0-%d", ErrInvalidArgument, weight, MaxWeight)
	}
	return worker(fmt.Sprintf("set server %s/%s weight %d", backend, server, weight), expectEmpty), nil
}

// ServerOptions are the server keywords "add server" accepts that this
// project uses. A new dynamic server must carry the same TLS settings as the
// template slots, and its certificate files must already be loaded.
type ServerOptions struct {
	Weight  int
	SSL     bool
	CrtFile string
	CAFile  string
	SNI     string // optional constant SNI
	ALPN    string // optional ALPN list, e.g. "h2"
}

var alpnRE = regexp.MustCompile(`^[a-z0-9/.-]+(,[a-z0-9/.-]+)*$`)

// AddServer adds a dynamic server. HAProxy 2.6 needs a backend with a dynamic
// balance algorithm, and the server starts in maintenance: "state ready"
// puts it in service. (Adding it with the "enabled" keyword instead would
// save that command, but on 2.6.12 such a server shows as up and never gets
// traffic: it is left out of load balancing, and requests get 503.)
func AddServer(backend, server, addr string, port int, o ServerOptions) (Command, error) {
	if err := checkServer(backend, server); err != nil {
		return Command{}, err
	}
	if err := CheckAddr(addr, port); err != nil {
		return Command{}, err
	}
	if o.Weight < 0 || o.Weight > MaxWeight {
		return Command{}, fmt.Errorf("%w: weight %d out of range 0-%d", ErrInvalidArgument, o.Weight, MaxWeight)
	}
	host := addr
	if strings.Contains(addr, ":") {
		host = "[" + addr + "]"
	}
	line := fmt.Sprintf("add server %s/%s %s:%d weight %d", backend, server, host, port, o.Weight)
	if o.SSL {
		for _, f := range []string{o.CrtFile, o.CAFile} {
			if !pathRE.MatchString(f) {
				return Command{}, fmt.Errorf("%w: certificate path %q", ErrInvalidArgument, f)
			}
		}
		line += fmt.Sprintf(" ssl crt %s ca-file %s verify required", o.CrtFile, o.CAFile)
		if o.SNI != "" {
			if !identRE.MatchString(o.SNI) {
				return Command{}, fmt.Errorf("%w: sni %q", ErrInvalidArgument, o.SNI)
			}
			line += " sni str(" + o.SNI + ")"
		}
		if o.ALPN != "" {
			if !alpnRE.MatchString(o.ALPN) {
				return Command{}, fmt.Errorf("%w: alpn %q", ErrInvalidArgument, o.ALPN)
			}
			line += " alpn " + o.ALPN
		}
	}
	return worker(line, expectPrefix("New server registered.")), nil
}

// SetSSLCert opens (or updates) a transaction that replaces the certificate
// stored under file with pem (certificate chain and key). HAProxy ends a
// payload at the first empty line, so blank lines are removed, and a final
// newline is ensured.
func SetSSLCert(file, pem string) (Command, error) {
	if !pathRE.MatchString(file) {
		return Command{}, fmt.Errorf("%w: certificate path %q", ErrInvalidArgument, file)
	}
	payload := PayloadLines(pem)
	if payload == "" {
		return Command{}, fmt.Errorf("%w: empty certificate payload for %s", ErrInvalidArgument, file)
	}
	c := worker("set ssl cert "+file, expectAny("Transaction created for certificate", "Transaction updated for certificate"))
	c.Payload = payload
	return c, nil
}

// CommitSSLCert commits the open transaction on file.
func CommitSSLCert(file string) (Command, error) {
	if !pathRE.MatchString(file) {
		return Command{}, fmt.Errorf("%w: certificate path %q", ErrInvalidArgument, file)
	}
	return worker("commit ssl cert "+file, expectCommit), nil
}

// AbortSSLCert drops the open transaction on file.
func AbortSSLCert(file string) (Command, error) {
	if !pathRE.MatchString(file) {
		return Command{}, fmt.Errorf("%w: certificate path %q", ErrInvalidArgument, file)
	}
	return worker("abort ssl cert "+file, expectPrefix("Transaction aborted for certificate")), nil
}

// mapKeyRE and mapValueRE bound what "set map" may carry: one token each.
var (
	mapKeyRE   = regexp.MustCompile(`^[A-Za-z0-9_.:/-]{1,128}$`)
	mapValueRE = regexp.MustCompile(`^[A-Za-z0-9_.:/-]{1,128}$`)
)

// SetMap changes the value of an existing key in the map loaded from file.
func SetMap(file, key, value string) (Command, error) {
	if !pathRE.MatchString(file) {
		return Command{}, fmt.Errorf("%w: map path %q", ErrInvalidArgument, file)
	}
	if !mapKeyRE.MatchString(key) || !mapValueRE.MatchString(value) {
		return Command{}, fmt.Errorf("%w: map entry %q %q", ErrInvalidArgument, key, value)
	}
	return worker(fmt.Sprintf("set map %s %s %s", file, key, value), expectEmpty), nil
}

// ShowServersState lists the servers of backend ("" for all backends).
func ShowServersState(backend string) (Command, error) {
	if backend != "" && !ValidIdent(backend) {
		return Command{}, fmt.Errorf("%w: backend name %q", ErrInvalidArgument, backend)
	}
	return worker(strings.TrimSpace("show servers state "+backend), expectPrefix("1\n")), nil
}

// ShowSSLCert describes the certificate stored under file.
func ShowSSLCert(file string) (Command, error) {
	if !pathRE.MatchString(file) {
		return Command{}, fmt.Errorf("%w: certificate path %q", ErrInvalidArgument, file)
	}
	return worker("show ssl cert "+file, expectPrefix("Filename: ")), nil
}

// ShowInfo is the worker's "show info".
func ShowInfo() Command { return worker("show info", expectPrefix("Name: ")) }

// ShowProc is the master's process list.
func ShowProc() Command {
	return Command{Line: "show proc", expect: expectPrefix("#<PID>")}
}

// PayloadLines prepares text for a "<<" payload: no empty lines (HAProxy
// ends the payload at the first one), no carriage returns, one final newline.
func PayloadLines(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(strings.ReplaceAll(s, "\r", ""), "\n") {
		if strings.TrimSpace(l) == "" {
			continue
		}
		b.WriteString(l)
		b.WriteByte('\n')
	}
	return b.String()
}
