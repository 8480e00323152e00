package runtime

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// hostile are seeds every fuzz target here starts from: IPv6 zones holding
// a second command or a config section, ';', '#', quotes, backslashes,
// spaces, a value that goes on with another server keyword, control
// bytes and non-ASCII.
var hostile = []string{
	"fe80::1%x\n@1 set server local_app/app addr 127.0.0.9 port 9",
	"fe80::1%lo]:80\nprogram pwn\n command /bin/true",
	"fe80::1%x;@1 reload",
	"10.0.0.1 port 9",
	"b;shutdown sessions",
	"s1#x",
	`a'b"c\d`,
	"a\rb\x00c",
	"wéb",
	"::ffff:1.2.3.4",
	"h2 crt /etc/passwd",
}

// commandsOf builds every command this package has from the same fuzzed
// values, and returns those the constructors accepted.
func commandsOf(backend, server, addr, file, token string, port, weight int) []Command {
	var out []Command
	add := func(c Command, err error) {
		if err == nil {
			out = append(out, c)
		}
	}
	add(SetServerAddr(backend, server, addr, port))
	add(SetServerWeight(backend, server, weight))
	add(SetServerState(backend, server, ServerState(token)))
	add(AddServer(backend, server, addr, port, ServerOptions{Weight: weight}))
	add(AddServer(backend, server, addr, port, ServerOptions{Weight: weight, SSL: true, CrtFile: file, CAFile: file, SNI: token, ALPN: token, Proto: token, NoSSLReuse: weight%2 == 0,
		Passive: PassiveCheck{Inter: time.Duration(port) * time.Millisecond, Layer7: weight%3 == 0, ErrorLimit: weight}}))
	add(EnableHealth(backend, server))
	add(SetSSLCert(file, token))
	add(CommitSSLCert(file))
	add(AbortSSLCert(file))
	add(ShowSSLCert(file))
	add(SetMap(file, token, strconv.Itoa(weight)))
	add(AddMap(file, backend+"/"+server, token+"@"+addr))
	add(AddMap(file, backend, token)) // a sources map entry: certificate digest, SPIFFE ID
	add(ShowMap(file))
	add(AddL7Entry(file, "^0123456789abcdef:"+token, "A/"+server+"/"+backend))
	add(DelL7Entry(file, "^0123456789abcdef:"+token))
	add(ClearMap(file))
	add(ShowSSLCAFile(file))
	add(ShowServersState(backend))
	add(ShowTable(backend))
	add(ShutdownSession(token))
	add(ShowSess(), nil)
	return out
}

// FuzzCommands: whatever the constructors accept is exactly one command on
// the wire (plus, for a payload, lines that cannot end it early), passes
// Check, and carries the values it was given as whole words: the address
// and names round-trip.
func FuzzCommands(f *testing.F) {
	f.Add("up_web", "s1", "10.0.0.1", "/s/leaf.pem", "ready", 21000, 1)
	f.Add("up_web", "s1", "fd00::1", "/s/leaf.pem", "h2", 1, 256)
	for _, h := range hostile {
		f.Add("up_web", "s1", h, "/s/leaf.pem", "ready", 80, 1)
		f.Add(h, "s1", "10.0.0.1", h, h, 70000, -1)
		f.Add("up_web", h, "10.0.0.1", "/s/"+h, "gen", 0, 257)
	}
	f.Add("authz_conns", "s1", "10.0.0.1", "/s/leaf.pem", "0x55b5677c42f0", 80, 1)
	f.Add("0:allow", "web", "10.0.0.1", "/s/l7.map", "[^:]*:/a[.]b(?!.)", 80, 1)
	f.Add("0:allow", "*", "10.0.0.1", "/s/l7.map", "GET:/a$b|c&d%e;f", 80, 1)
	f.Add("authz_conns", "s1", "10.0.0.1", "/s/leaf.pem", "0x55b5677c42f0\n@1 shutdown sessions server local_app/app", 80, 1)
	// A tcp listener's sources map entry, as the controller adds it, and
	// SPIFFE IDs that would end the line or add words.
	f.Add("438879D607FA038518C01306BB2A72700997A360D1578C46DD9B83BC85515D9F", "s1", "10.0.0.1", "/s/sources.map", "spiffe://2fad43b6-81f1-5688-b702-44a6bf413c44.consul/ns/default/dc/dc1/svc/client", 80, 1)
	f.Add("438879D607FA038518C01306BB2A72700997A360D1578C46DD9B83BC85515D9F", "s1", "10.0.0.1", "/s/sources.map", "spiffe://td.consul/ns/default/dc/dc1/svc/a b\n@1 shutdown sessions", 80, 1)
	f.Add("438879D607FA038518C01306BB2A72700997A360D1578C46DD9B83BC85515D9F", "s1", "10.0.0.1", "/s/sources.map", "spiffe://td.consul/ns/default/dc/dc1/svc/a;@1 reload", 80, 1)
	f.Fuzz(func(t *testing.T, backend, server, addr, file, token string, port, weight int) {
		for _, c := range commandsOf(backend, server, addr, file, token, port, weight) {
			if err := c.Check(); err != nil {
				t.Fatalf("constructor returned %q, which fails Check: %v", c.String(), err)
			}
			wire := string(encodeBatch([]Command{c}))
			lines := strings.Split(strings.TrimSuffix(wire, "\n"), "\n")
			if lines[0] != c.String() || strings.ContainsAny(lines[0], ";#'\"\\\r\x00%") {
				t.Fatalf("first line %q of %q", lines[0], wire)
			}
			if c.Payload == "" && len(lines) != 1 {
				t.Fatalf("%d lines on the wire for %q", len(lines), wire)
			}
			for _, l := range lines[1:] {
				if l == "" && l != lines[len(lines)-1] {
					t.Fatalf("payload of %q has an empty line before its end", c.String())
				}
			}
			words := strings.Split(c.Line, " ")
			if strings.HasPrefix(c.Line, "set server ") && words[3] == "addr" {
				if len(words) != 7 || words[2] != backend+"/"+server || words[4] != addr || words[6] != strconv.Itoa(port) {
					t.Fatalf("set server addr %q does not carry %q %q %q %d", c.Line, backend, server, addr, port)
				}
			}
		}
	})
}

// FuzzSocatLine: the logged socat line is one line, and it is either a
// shell comment (for a command Exec refuses) or the fixed pipeline whose
// quoted words unquote to exactly the command and the socket.
func FuzzSocatLine(f *testing.F) {
	f.Add("@1", "show info", "", "/tmp/s/master.sock")
	f.Add("@1", "set ssl cert /s/leaf.pem", "-----BEGIN X-----\nabc\n", "/tmp/it's/master.sock")
	for _, h := range hostile {
		f.Add("@1", "set server b/s1 addr "+h+" port 1", "", "/tmp/s/master.sock")
		f.Add("", "show proc", h, h)
		f.Add(h, "show info", "", "/tmp/s/master.sock")
	}
	f.Fuzz(func(t *testing.T, target, line, payload, sock string) {
		c := New(sock, nil)
		cmd := Command{Target: target, Line: line, Payload: payload}
		got := c.SocatLine(cmd)
		if strings.ContainsAny(got, "\n\r") {
			t.Fatalf("socat line spans lines: %q", got)
		}
		if cmd.Check() != nil || !printable(sock) {
			if !strings.HasPrefix(got, "# ") {
				t.Fatalf("refused command %q logged as %q", cmd.String(), got)
			}
			return
		}
		rest, ok := strings.CutPrefix(got, `printf '%s\n' `)
		if payload != "" {
			rest, ok = strings.CutPrefix(got, `(printf '%s\n' `)
		}
		if !ok {
			t.Fatalf("socat line %q", got)
		}
		word, rest, ok := unquote(rest)
		if !ok || word != cmd.String() {
			t.Fatalf("command word %q from %q, want %q", word, got, cmd.String())
		}
		if payload != "" {
			if rest, ok = strings.CutPrefix(rest, `; grep -v '^$' "$PEM_FILE"; echo)`); !ok {
				t.Fatalf("socat line %q", got)
			}
		}
		if rest, ok = strings.CutPrefix(rest, " | socat stdio "); !ok {
			t.Fatalf("socat line %q", got)
		}
		word, rest, ok = unquote(rest)
		if !ok || rest != "" || word != "unix-connect:"+sock {
			t.Fatalf("socket word %q (rest %q) from %q", word, rest, got)
		}
	})
}

// unquote reads one word made of POSIX single-quoted strings and
// backslash-escaped single quotes, as shellQuote writes it, and returns it
// with what follows.
func unquote(s string) (word, rest string, ok bool) {
	var b strings.Builder
	for len(s) > 0 {
		switch {
		case s[0] == '\'':
			end := strings.IndexByte(s[1:], '\'')
			if end < 0 {
				return "", "", false
			}
			b.WriteString(s[1 : 1+end])
			s = s[2+end:]
			ok = true
		case strings.HasPrefix(s, `\'`):
			b.WriteByte('\'')
			s = s[2:]
		default:
			return b.String(), s, ok
		}
	}
	return b.String(), "", ok
}

// TestSocatLinePastes runs the logged line in a real shell, with socat
// replaced by a script that records its arguments and what it reads: one
// pipeline, which sends exactly the command, to exactly the socket, even
// when the socket's path holds a quote or a space.
func TestSocatLinePastes(t *testing.T) {
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh")
	}
	dir := t.TempDir()
	fake := "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$OUT.args\"\ncat > \"$OUT.stdin\"\n"
	if err := os.WriteFile(filepath.Join(dir, "socat"), []byte(fake), 0o755); err != nil {
		t.Fatal(err)
	}
	pem := filepath.Join(dir, "leaf.pem")
	if err := os.WriteFile(pem, []byte("-----BEGIN X-----\nabc\n\n-----END X-----\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	m := mustCmd(t)
	tests := []struct {
		name, sock string
		cmd        Command
		stdin      string
	}{
		{"worker command", "/tmp/s/master.sock", m(SetServerAddr("up_web", "s1", "fd00::1", 21000)), "@1 set server up_web/s1 addr fd00::1 port 21000\n"},
		{"master command, odd socket path", "/tmp/it's a dir;x/master.sock", ShowProc(), "show proc\n"},
		{"payload", "/tmp/s/master.sock", m(SetSSLCert("/s/leaf.pem", "x")), "@1 set ssl cert /s/leaf.pem <<\n-----BEGIN X-----\nabc\n-----END X-----\n\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := filepath.Join(dir, "out")
			line := New(tt.sock, nil).SocatLine(tt.cmd)
			cmd := exec.Command(sh, "-c", line)
			cmd.Env = append(os.Environ(), "PATH="+dir+":"+os.Getenv("PATH"), "OUT="+out, "PEM_FILE="+pem)
			if b, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("%s: %v\n%s", line, err, b)
			}
			args, _ := os.ReadFile(out + ".args")
			stdin, _ := os.ReadFile(out + ".stdin")
			if string(args) != "stdio\nunix-connect:"+tt.sock+"\n" || string(stdin) != tt.stdin {
				t.Fatalf("%s\nsocat got args %q and stdin %q, want stdin %q", line, args, stdin, tt.stdin)
			}
		})
	}
}

// TestExecRefusesInjection: a batch holding one command that would smuggle
// another is refused whole, and nothing reaches the socket.
func TestExecRefusesInjection(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "m.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c := New(sock, nil, WithTimeout(time.Second))
	defer c.Close()
	for _, bad := range []Command{
		{Target: "@1", Line: "set server b/s1 addr fe80::1%x\n@1 set server local_app/app addr 127.0.0.9 port 9 port 80"},
		{Target: "@1", Line: "show info; reload"},
		{Target: "@1;", Line: "reload"},
		{Target: "@1", Line: "show info # x"},
		{Target: "@1", Line: "set ssl cert /a.pem", Payload: "abc\n\nreload\n"},
	} {
		_, err := c.Exec(context.Background(), ShowInfo(), bad)
		if !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("%q: got %v, want ErrInvalidArgument", bad.String(), err)
		}
	}
	// A dial returns once the connection is queued on the listener, so
	// one made by Exec would be accepted at once here.
	_ = ln.(*net.UnixListener).SetDeadline(time.Now())
	if conn, err := ln.Accept(); err == nil {
		conn.Close()
		t.Fatal("a refused batch reached the socket")
	}
}
