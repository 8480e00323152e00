// Package runtime drives HAProxy through its master socket: it builds runtime
// commands from validated values, sends them in batches over one connection,
// classifies every reply, and confirms reloads. It knows HAProxy, not Consul;
// of the slot model (package slots) it knows only the operations a plan
// turns into commands (SlotCommands).
package runtime

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/haproxy-connect/haproxy-connect/input"
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
const MaxWeight = input.MaxWeight

// ValidIdent reports whether s can be used as a backend or server name.
func ValidIdent(s string) bool {
	_, err := input.Ident("name", s)
	return err == nil
}

// invalid wraps an input rejection as an invalid argument of this package.
func invalid(err error) error { return fmt.Errorf("%w: %w", ErrInvalidArgument, err) }

func checkServer(backend, server string) error {
	if _, err := input.Ident("backend name", backend); err != nil {
		return invalid(err)
	}
	if _, err := input.Ident("server name", server); err != nil {
		return invalid(err)
	}
	return nil
}

func checkPath(what, file string) error {
	if _, err := input.Path(what, file); err != nil {
		return invalid(err)
	}
	return nil
}

// CheckAddr validates an endpoint address and port the way the runtime API
// needs them (input.Addr, input.Port): an IP literal in canonical form with
// no zone (HAProxy 2.6 "set server addr" resolves nothing, and a zone is
// any bytes, newlines included) and a port in 1-65535 (HAProxy wraps a
// larger one silently: 70000 becomes 4464).
func CheckAddr(addr string, port int) error {
	if _, err := input.Addr(input.FieldAddress, addr); err != nil {
		return invalid(err)
	}
	if _, err := input.Port(input.FieldPort, port); err != nil {
		return invalid(err)
	}
	return nil
}

func checkWeight(weight int) error {
	if _, err := input.Weight(input.FieldWeight, weight); err != nil {
		return invalid(err)
	}
	return nil
}

// The grammar of each command this package builds, with its arguments at
// their narrowest alphabet: the last check before a Command is returned
// (see worker). The constructors validate every argument already, lengths
// included (package input); this holds even if one of them is wrong, since
// a line that matches cannot hold a second command, a comment or a quoted
// string. Long words are unbounded here (checkLine bounds the line): a
// bounded repetition such as {1,255} compiles to that many copies of its
// character class, which every shape holds for the life of the process.
const (
	gIdent  = `[A-Za-z0-9_.:-]+`
	gServer = gIdent + `/` + gIdent
	gAddr   = `[0-9a-f.:]{2,45}`
	gPort   = `[1-9][0-9]{0,4}`
	gWeight = `[0-9]{1,3}`
	gPath   = `/[A-Za-z0-9_./+-]+`
	// A map key, and a map value: one word each, on the CLI line and in a
	// map file (which reads a key, blanks, and the value up to the end of
	// the line; '#' would start a comment). '@', '[', ']', '~' and '?' mean
	// nothing to either (checked on 2.6.12: "add map" and "set map" store
	// "db-7@[fd00::7]:21000" as given, and a map file line holding it
	// loads it so).
	gMapKey   = `[A-Za-z0-9_.:/-]+`
	gMapValue = `[A-Za-z0-9_.:/@\[\]~?-]+`
	// An L7 map entry (package l7, Compile): a regex anchored on a
	// ruleset key, then "<action>/<intention>/<permission>". Words of
	// checkLine; the regex's first character is '^', so a map file line
	// holding it is no comment.
	gL7Pattern = `\^[0-9a-f]{16}:[A-Za-z0-9/._~!()*+,=:@\[\]^?-]*` // checkLine bounds the line
	gL7Value   = `[ADS]/([A-Za-z0-9_.-]+|\*)/[a-z0-9:-]{1,32}`
)

var (
	shapeSetAddr   = regexp.MustCompile(`^set server ` + gServer + ` addr ` + gAddr + ` port ` + gPort + `$`)
	shapeSetState  = regexp.MustCompile(`^set server ` + gServer + ` state (ready|drain|maint)$`)
	shapeSetWeight = regexp.MustCompile(`^set server ` + gServer + ` weight ` + gWeight + `$`)
	shapeAddServer = regexp.MustCompile(`^add server ` + gServer + ` (` + gAddr + `|\[` + gAddr + `\]):` + gPort + ` weight ` + gWeight +
		`( ssl crt ` + gPath + ` ca-file ` + gPath + ` verify required( sni str\(` + gIdent + `\))?( alpn [a-z0-9/.-]+(,[a-z0-9/.-]+)*)?( proto [a-z0-9]{1,16})?( no-ssl-reuse)?)?` +
		`( check( check-ssl)? inter [0-9]{1,10}ms observe layer[47] error-limit [0-9]{1,5} on-error mark-down)?$`)
	shapeEnableHealth = regexp.MustCompile(`^enable health ` + gServer + `$`)
	shapeSSLCert      = regexp.MustCompile(`^(set|commit|abort|show) ssl cert ` + gPath + `$`)
	shapeSetMap       = regexp.MustCompile(`^(set|add) map ` + gPath + ` ` + gMapKey + ` ` + gMapValue + `$`)
	shapeShowMap      = regexp.MustCompile(`^show map ` + gPath + `$`)
	shapeL7Map        = regexp.MustCompile(`^(add map ` + gPath + ` ` + gL7Pattern + ` ` + gL7Value + `|del map ` + gPath + ` ` + gL7Pattern + `|clear map ` + gPath + `)$`)
	shapeShowCAFile   = regexp.MustCompile(`^show ssl ca-file ` + gPath + `$`)
	shapeShowServers  = regexp.MustCompile(`^show servers state( ` + gIdent + `)?$`)
	shapeShowSess     = regexp.MustCompile(`^show sess$`)
	shapeShowTable    = regexp.MustCompile(`^show table ` + gIdent + `$`)
	// A stream's id is its address in the worker, as "show sess" prints it.
	shapeShutdownSession = regexp.MustCompile(`^shutdown session 0x[0-9a-f]{1,16}$`)
)

// worker builds a command for the current worker, refusing a line outside
// its grammar.
func worker(shape *regexp.Regexp, line string, expect func(string) error) (Command, error) {
	if !shape.MatchString(line) {
		return Command{}, fmt.Errorf("%w: %q is outside the command's grammar", ErrInvalidArgument, line)
	}
	c := Command{Target: "@1", Line: line, expect: expect}
	if err := c.Check(); err != nil {
		return Command{}, err
	}
	return c, nil
}

// targetRE is a master CLI routing prefix: none, "@<n>" or "@!<pid>".
var targetRE = regexp.MustCompile(`^(@!?[0-9]{1,10})?$`)

// Check is the grammar every command must satisfy to be sent, whoever built
// it: one command, so nothing in it can make the master CLI (which splits on
// newlines and on ';') run a second one. The line is printable ASCII words
// separated by single spaces, with none of ';', '#', quotes or backslash,
// and no "<<" (a payload is only ever announced by Payload). A payload is
// lines of printable ASCII, none of them empty (an empty line ends it), and
// a final newline. Exec refuses a batch holding a command that fails it.
func (c Command) Check() error {
	if !targetRE.MatchString(c.Target) {
		return fmt.Errorf("%w: routing prefix %q", ErrInvalidArgument, c.Target)
	}
	if err := checkLine(c.Line); err != nil {
		return fmt.Errorf("%w: command %q: %v", ErrInvalidArgument, c.Line, err)
	}
	if c.Payload == "" {
		return nil
	}
	if !strings.HasSuffix(c.Payload, "\n") {
		return fmt.Errorf("%w: payload of %q does not end with a newline", ErrInvalidArgument, c.Line)
	}
	for _, l := range strings.Split(strings.TrimSuffix(c.Payload, "\n"), "\n") {
		if l == "" {
			return fmt.Errorf("%w: payload of %q has an empty line, which would end it early", ErrInvalidArgument, c.Line)
		}
		for i := 0; i < len(l); i++ {
			if l[i] < 0x20 || l[i] > 0x7e {
				return fmt.Errorf("%w: payload of %q has byte %#x", ErrInvalidArgument, c.Line, l[i])
			}
		}
	}
	return nil
}

func checkLine(l string) error {
	if l == "" {
		return errors.New("empty")
	}
	if len(l) > 2048 {
		return errors.New("too long")
	}
	if l[0] == ' ' || l[len(l)-1] == ' ' || strings.Contains(l, "  ") {
		return errors.New("leading, trailing or double space")
	}
	for i := 0; i < len(l); i++ {
		b := l[i]
		switch {
		case b < 0x20 || b > 0x7e:
			return fmt.Errorf("byte %#x", b)
		case strings.IndexByte(";#'\"\\`$<>|&{}%", b) >= 0:
			return fmt.Errorf("character %q", b)
		}
	}
	return nil
}

// SetServerAddr points a server at addr:port.
func SetServerAddr(backend, server, addr string, port int) (Command, error) {
	if err := checkServer(backend, server); err != nil {
		return Command{}, err
	}
	if err := CheckAddr(addr, port); err != nil {
		return Command{}, err
	}
	return worker(shapeSetAddr, fmt.Sprintf("set server %s/%s addr %s port %d", backend, server, addr, port), expectAddrChange)
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
	return worker(shapeSetState, fmt.Sprintf("set server %s/%s state %s", backend, server, state), expectEmpty)
}

// SetServerWeight sets a server's absolute weight (0-256).
func SetServerWeight(backend, server string, weight int) (Command, error) {
	if err := checkServer(backend, server); err != nil {
		return Command{}, err
	}
	if err := checkWeight(weight); err != nil {
		return Command{}, err
	}
	return worker(shapeSetWeight, fmt.Sprintf("set server %s/%s weight %d", backend, server, weight), expectEmpty)
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
	// Proto is the mux the server speaks whatever ALPN negotiates
	// (optional, e.g. "h2").
	Proto string
	// NoSSLReuse: every connection makes a full handshake ("no-ssl-reuse"),
	// none resumes a session of an earlier one.
	NoSSLReuse bool
	// Passive is the passive health check of the template slots'
	// default-server line, which 2.6 does not apply to a dynamic server.
	Passive PassiveCheck
}

// PassiveCheck makes HAProxy watch the traffic to a server and mark it
// down after ErrorLimit errors in a row, then check it every Inter with
// a connection (a TLS handshake for an ssl server) and put it back after
// two good ones. Layer7 counts a 5xx answer as an error too (http
// mode); otherwise only failed connections count. ErrorLimit 0: off.
type PassiveCheck struct {
	Inter      time.Duration
	Layer7     bool
	ErrorLimit int
}

// MaxErrorLimit bounds PassiveCheck.ErrorLimit.
const MaxErrorLimit = 10000

// options renders the check's server keywords. A template slot's checks
// inherit TLS from its "ssl" server (a handshake, L6OK); a dynamic server's
// do not on 2.6 (a bare connection, L4OK) unless asked with "check-ssl".
func (p PassiveCheck) options(ssl bool) (string, error) {
	if p.ErrorLimit == 0 {
		return "", nil
	}
	if p.ErrorLimit < 0 || p.ErrorLimit > MaxErrorLimit {
		return "", fmt.Errorf("%w: error-limit %d out of range 1-%d", ErrInvalidArgument, p.ErrorLimit, MaxErrorLimit)
	}
	if p.Inter < time.Millisecond || p.Inter > time.Hour {
		return "", fmt.Errorf("%w: check interval %s out of range 1ms-1h", ErrInvalidArgument, p.Inter)
	}
	layer := 4
	if p.Layer7 {
		layer = 7
	}
	check := " check"
	if ssl {
		check += " check-ssl"
	}
	return fmt.Sprintf("%s inter %dms observe layer%d error-limit %d on-error mark-down", check, p.Inter.Milliseconds(), layer, p.ErrorLimit), nil
}

var (
	alpnRE  = regexp.MustCompile(`^[a-z0-9/.-]+(,[a-z0-9/.-]+)*$`)
	protoRE = regexp.MustCompile(`^[a-z0-9]{1,16}$`)
)

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
	if err := checkWeight(o.Weight); err != nil {
		return Command{}, err
	}
	host := addr
	if strings.Contains(addr, ":") {
		host = "[" + addr + "]"
	}
	line := fmt.Sprintf("add server %s/%s %s:%d weight %d", backend, server, host, port, o.Weight)
	if o.SSL {
		for _, f := range []string{o.CrtFile, o.CAFile} {
			if err := checkPath("certificate path", f); err != nil {
				return Command{}, err
			}
		}
		line += fmt.Sprintf(" ssl crt %s ca-file %s verify required", o.CrtFile, o.CAFile)
		if o.SNI != "" {
			if _, err := input.Ident("sni", o.SNI); err != nil {
				return Command{}, invalid(err)
			}
			line += " sni str(" + o.SNI + ")"
		}
		if o.ALPN != "" {
			if !alpnRE.MatchString(o.ALPN) {
				return Command{}, fmt.Errorf("%w: alpn %q", ErrInvalidArgument, o.ALPN)
			}
			line += " alpn " + o.ALPN
		}
		if o.Proto != "" {
			if !protoRE.MatchString(o.Proto) {
				return Command{}, fmt.Errorf("%w: proto %q", ErrInvalidArgument, o.Proto)
			}
			line += " proto " + o.Proto
		}
		if o.NoSSLReuse {
			line += " no-ssl-reuse"
		}
	}
	check, err := o.Passive.options(o.SSL)
	if err != nil {
		return Command{}, err
	}
	line += check
	return worker(shapeAddServer, line, expectPrefix("New server registered."))
}

// EnableHealth starts the health checks of a server added with "check":
// on 2.6 a dynamic server's checks stay off until this command.
func EnableHealth(backend, server string) (Command, error) {
	if err := checkServer(backend, server); err != nil {
		return Command{}, err
	}
	return worker(shapeEnableHealth, fmt.Sprintf("enable health %s/%s", backend, server), expectEmpty)
}

// SetSSLCert opens (or updates) a transaction that replaces the certificate
// stored under file with pem (certificate chain and key). HAProxy ends a
// payload at the first empty line, so blank lines are removed, and a final
// newline is ensured.
func SetSSLCert(file, pem string) (Command, error) {
	if err := checkPath("certificate path", file); err != nil {
		return Command{}, err
	}
	payload := PayloadLines(pem)
	if payload == "" {
		return Command{}, fmt.Errorf("%w: empty certificate payload for %s", ErrInvalidArgument, file)
	}
	c, err := worker(shapeSSLCert, "set ssl cert "+file, expectAny("Transaction created for certificate", "Transaction updated for certificate"))
	if err != nil {
		return Command{}, err
	}
	c.Payload = payload
	if err := c.Check(); err != nil {
		return Command{}, err
	}
	return c, nil
}

// CommitSSLCert commits the open transaction on file.
func CommitSSLCert(file string) (Command, error) {
	if err := checkPath("certificate path", file); err != nil {
		return Command{}, err
	}
	return worker(shapeSSLCert, "commit ssl cert "+file, expectCommit)
}

// AbortSSLCert drops the open transaction on file.
func AbortSSLCert(file string) (Command, error) {
	if err := checkPath("certificate path", file); err != nil {
		return Command{}, err
	}
	return worker(shapeSSLCert, "abort ssl cert "+file, expectPrefix("Transaction aborted for certificate"))
}

// mapKeyRE and mapValueRE bound what "set map" and "add map" may carry:
// one word each (gMapKey, gMapValue), of at most maxMapKey and maxMapValue
// bytes.
var (
	mapKeyRE   = regexp.MustCompile(`^` + gMapKey + `$`)
	mapValueRE = regexp.MustCompile(`^` + gMapValue + `$`)
)

const (
	maxMapKey   = 200
	maxMapValue = 512
	// maxL7Value is the longest L7 map value: an action, an intention
	// name of at most 128 bytes (or "*") and a permission of at most 32.
	maxL7Value = len("A//") + 128 + 32
)

// ValidMapEntry reports whether key and value can be a map entry that
// SetMap and AddMap send (and a map file line holds as one entry).
func ValidMapEntry(key, value string) bool {
	return len(key) <= maxMapKey && len(value) <= maxMapValue && mapKeyRE.MatchString(key) && mapValueRE.MatchString(value)
}

func mapCommand(verb, file, key, value string) (Command, error) {
	if err := checkPath("map path", file); err != nil {
		return Command{}, err
	}
	if !ValidMapEntry(key, value) {
		return Command{}, fmt.Errorf("%w: map entry %q %q", ErrInvalidArgument, key, value)
	}
	return worker(shapeSetMap, fmt.Sprintf("%s map %s %s %s", verb, file, key, value), expectEmpty)
}

// SetMap changes the value of an existing key in the map loaded from file
// (of every entry with that key). A missing key is ErrNoSuchMapEntry.
func SetMap(file, key, value string) (Command, error) { return mapCommand("set", file, key, value) }

// AddMap adds an entry to the map loaded from file. A key may be added
// twice; a lookup then finds the first, and SetMap changes both.
func AddMap(file, key, value string) (Command, error) { return mapCommand("add", file, key, value) }

// AddL7Entry appends an entry of the L7 map loaded from file (a regex
// map: the first entry matching a subject, in the order entries were
// added, gives its value). A pattern HAProxy's regex engine refuses is
// ErrInvalidArgument.
func AddL7Entry(file, pattern, value string) (Command, error) {
	if err := checkPath("map path", file); err != nil {
		return Command{}, err
	}
	if len(value) > maxL7Value {
		return Command{}, fmt.Errorf("%w: L7 map value %q longer than %d bytes", ErrInvalidArgument, value, maxL7Value)
	}
	return worker(shapeL7Map, fmt.Sprintf("add map %s %s %s", file, pattern, value), expectEmpty)
}

// DelL7Entry removes every entry of the L7 map loaded from file with
// this pattern. None is ErrNoSuchMapEntry.
func DelL7Entry(file, pattern string) (Command, error) {
	if err := checkPath("map path", file); err != nil {
		return Command{}, err
	}
	return worker(shapeL7Map, fmt.Sprintf("del map %s %s", file, pattern), expectEmpty)
}

// ClearMap removes every entry of the map loaded from file (an L7 map, or
// a listener's sources map).
func ClearMap(file string) (Command, error) {
	if err := checkPath("map path", file); err != nil {
		return Command{}, err
	}
	return worker(shapeL7Map, "clear map "+file, expectEmpty)
}

// ShowMap lists the entries of the map loaded from file; a map the
// configuration does not load is ErrNoSuchMap.
func ShowMap(file string) (Command, error) {
	if err := checkPath("map path", file); err != nil {
		return Command{}, err
	}
	return worker(shapeShowMap, "show map "+file, expectMapEntries)
}

// ShowSSLCAFile describes the CA certificates loaded from file (2.6 has
// the command; "commit ssl ca-file" is what 2.6 must not be sent).
func ShowSSLCAFile(file string) (Command, error) {
	if err := checkPath("CA file path", file); err != nil {
		return Command{}, err
	}
	return worker(shapeShowCAFile, "show ssl ca-file "+file, expectPrefix("Filename: "))
}

// ShowServersState lists the servers of backend ("" for all backends).
func ShowServersState(backend string) (Command, error) {
	if backend != "" {
		if _, err := input.Ident("backend name", backend); err != nil {
			return Command{}, invalid(err)
		}
	}
	return worker(shapeShowServers, strings.TrimSpace("show servers state "+backend), expectPrefix("1\n"))
}

// ShowSSLCert describes the certificate stored under file.
func ShowSSLCert(file string) (Command, error) {
	if err := checkPath("certificate path", file); err != nil {
		return Command{}, err
	}
	return worker(shapeSSLCert, "show ssl cert "+file, expectPrefix("Filename: "))
}

// ShowInfo is the worker's "show info".
func ShowInfo() Command {
	return Command{Target: "@1", Line: "show info", expect: expectPrefix("Name: ")}
}

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
