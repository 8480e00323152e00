package runtime

import (
	"context"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// The commands that find and close established connections: "show sess"
// lists the worker's streams, "show table <name>" a stick table's entries,
// and "shutdown session <id>" closes one stream. Checked by hand on
// 2.6.12:
//
//	@1 show sess
//	0x55b5677c42f0: proto=tcpv4 src=127.0.0.1:40932 fe=public_listener be=local_app srv=app ts=00 ...
//	0x55b5678dac50: proto=tcpv6 src=::1:33708 fe=public_listener be=local_app srv=app ts=00 ...
//	0x55b5678db2f0: proto=unix_stream src=unix:1 fe=GLOBAL be=<NONE> srv=<none> ts=00 ...
//
//	@1 show table authz_conns
//	# table: authz_conns, type: string, size:1000, used:2
//	0x55b5678db040: key=6AEE...6D43-::1-33708 use=1 exp=0
//	0x7f0f20050a10: key=C881...D7ED-127.0.0.1-48906 use=1 exp=1025
//
// "shutdown session <id>" answers nothing when it closed the stream, "No
// such session (use 'show sess')." when no stream has that address (it
// ended), and "Session pointer expected (use 'show sess')." for an id
// that is not one. "show table <name>" of a table the configuration does
// not declare answers "No such table". An entry that streams track shows
// use=N>0 and stays however old it is (exp=0); once no stream tracks it,
// it goes at its expiry.

// ShowSess lists the current worker's streams.
func ShowSess() Command {
	c, _ := worker(shapeShowSess, "show sess", expectSessions)
	return c
}

// ShowTable lists the entries of the stick table name (the proxy that
// declares it).
func ShowTable(name string) (Command, error) {
	if !ValidIdent(name) {
		return Command{}, fmt.Errorf("%w: table name %q", ErrInvalidArgument, name)
	}
	return worker(shapeShowTable, "show table "+name, expectPrefix("# table: "))
}

// ShutdownSession closes the stream whose id (its address, from "show
// sess") is id. A stream that ended meanwhile is ErrNoSuchSession.
func ShutdownSession(id string) (Command, error) {
	if !isPointer(id) {
		return Command{}, fmt.Errorf("%w: session id %q", ErrInvalidArgument, id)
	}
	return worker(shapeShutdownSession, "shutdown session "+id, expectEmpty)
}

// Session is one stream of "show sess".
type Session struct {
	// ID is the stream's address, which "shutdown session" takes.
	ID string
	// Src is the client's address and port; not valid for a client
	// that is not on IP (the CLI, a unix socket).
	Src netip.AddrPort
	// Frontend is the proxy that accepted the stream ("GLOBAL" for the
	// CLI).
	Frontend string
}

// ParseSessions parses "show sess": one line per stream, "<id>: " and
// space-separated fields, of which it reads src= and fe=. A stream with no
// client connection (an SPOE applet's: "0x560ad761f3d0: proto=? ts=00
// ...") has neither, and leaves Src invalid and Frontend empty, as does a
// src= that is not an IP address and port. An empty reply is no stream. A
// line that does not start with an id is ErrUnrecognizedReply.
func ParseSessions(text string) ([]Session, error) {
	var out []Session
	for _, l := range strings.Split(text, "\n") {
		l = strings.TrimRight(l, "\r ")
		if l == "" {
			continue
		}
		id, rest, ok := strings.Cut(l, ": ")
		if !ok || !isPointer(id) {
			return nil, fmt.Errorf("%w: show sess line %q", ErrUnrecognizedReply, truncate(l, 200))
		}
		s := Session{ID: id}
		var src string
		var hasSrc, hasFe bool
		for _, f := range strings.Fields(rest) {
			switch {
			case !hasSrc && strings.HasPrefix(f, "src="):
				src, hasSrc = f[len("src="):], true
			case !hasFe && strings.HasPrefix(f, "fe="):
				s.Frontend, hasFe = f[len("fe="):], true
			}
		}
		if hasSrc {
			s.Src = parseHostPort(src)
		}
		out = append(out, s)
	}
	return out, nil
}

// parseHostPort reads "<ip>:<port>" as HAProxy prints an address: IPv6
// without brackets ("::1:33708"), so the port is after the last colon.
// Anything else (a zone, a unix socket) gives the zero AddrPort.
func parseHostPort(s string) netip.AddrPort {
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return netip.AddrPort{}
	}
	addr, err := netip.ParseAddr(s[:i])
	if err != nil || addr.Zone() != "" {
		return netip.AddrPort{}
	}
	port, err := strconv.ParseUint(s[i+1:], 10, 16)
	if err != nil || port == 0 || strconv.FormatUint(port, 10) != s[i+1:] {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(addr.Unmap(), uint16(port))
}

// TableEntry is one entry of "show table <name>".
type TableEntry struct {
	Key string
	// Use is the number of streams tracking the entry now.
	Use int
}

// ParseTable parses "show table <name>": a "# table: " line, then one
// line per entry, "<address>: key=<key> use=<n> exp=<ms>" and the data
// the table stores. The key ends at " use=". Any other line is
// ErrUnrecognizedReply.
func ParseTable(text string) ([]TableEntry, error) {
	var out []TableEntry
	for i, l := range strings.Split(strings.TrimSpace(text), "\n") {
		l = strings.TrimRight(l, "\r")
		if i == 0 {
			if !strings.HasPrefix(l, "# table: ") {
				return nil, fmt.Errorf("%w: show table header %q", ErrUnrecognizedReply, truncate(l, 200))
			}
			continue
		}
		if l == "" {
			continue
		}
		ptr, rest, ok := strings.Cut(l, ": key=")
		key, rest, ok2 := strings.Cut(rest, " use=")
		use, _, _ := strings.Cut(rest, " ")
		n, err := strconv.Atoi(use)
		if !ok || !ok2 || !isPointer(ptr) || key == "" || err != nil || n < 0 {
			return nil, fmt.Errorf("%w: show table line %q", ErrUnrecognizedReply, truncate(l, 200))
		}
		out = append(out, TableEntry{Key: key, Use: n})
	}
	return out, nil
}

// Sessions runs "show sess" on the current worker.
func (c *Client) Sessions(ctx context.Context) ([]Session, error) {
	reply, err := c.Do(ctx, ShowSess())
	if err != nil {
		return nil, err
	}
	return ParseSessions(reply)
}

// Table runs "show table <name>" on the current worker.
func (c *Client) Table(ctx context.Context, name string) ([]TableEntry, error) {
	cmd, err := ShowTable(name)
	if err != nil {
		return nil, err
	}
	reply, err := c.Do(ctx, cmd)
	if err != nil {
		return nil, err
	}
	return ParseTable(reply)
}

// OnWorker returns c addressed to the worker process pid ("@!<pid>"): the
// current worker or an old one still finishing its connections after a
// reload, which has its own streams and stick tables (checked on 2.6.12:
// "@!<old pid> show sess", "show table" and "shutdown session" reach it).
// A command for the master itself cannot be readdressed.
func (c Command) OnWorker(pid int) (Command, error) {
	if c.Target == "" {
		return Command{}, fmt.Errorf("%w: %q is a master command", ErrInvalidArgument, c.Line)
	}
	if pid <= 0 || pid > 1<<30 {
		return Command{}, fmt.Errorf("%w: worker pid %d", ErrInvalidArgument, pid)
	}
	c.Target = "@!" + strconv.Itoa(pid)
	if err := c.Check(); err != nil {
		return Command{}, err
	}
	return c, nil
}
