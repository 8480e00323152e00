package runtime

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"go.uber.org/zap"
)

// Why this package owns the socket instead of client-native's runtime
// (NOTES §2, checked against client-native v6.2.0): in master mode its
// SingleRuntime sends "set severity-output number;@1 <cmd>;quit", which the
// master does not know, so error replies are swallowed (SetServerAddr on a
// missing server returns nil); it opens one connection per command; it trims
// the reply and ignores read errors, so a truncated reply looks like success;
// and a payload without a final newline hangs for its 30 s deadline. What is
// sound there, version parsing and comparison, is used (see proc.go).
//
// Framing: a batch runs on a session in interactive ("prompt") mode. The
// master prints its prompt after each reply, so the replies are the pieces
// between prompts, and a batch of n commands is complete after n prompts.
// That survives replies without a trailing empty line (several 2.6 error
// replies have none) and empty replies (state, weight), which splitting on
// blank lines cannot tell apart. A routing error ("Can't find the target
// PID") makes the master close the session: the commands after it come back
// as ErrNotExecuted.
//
// A session is kept for the next batch (maxIdle): connecting and
// entering prompt mode cost as much as a forwarded command (on 2.6.12,
// idle: 175 µs for one "set server" on a new session, 104 µs on a kept
// one), and the sidecar's batches are one or two commands. The master
// closes every session when it re-executes (reload); a batch that finds its
// kept session closed before any reply is retried once on a new session.

// maxIdle is how many sessions a Client keeps open between batches. One:
// the controller sends from one loop, and the 2.6 master serves at most 10
// sessions at once (an 11th waits until one closes; checked on 2.6.12), which
// operators' socat sessions share.
const maxIdle = 1

// Client sends runtime commands to HAProxy's master socket. It is safe for
// concurrent use; Close releases its kept sessions.
type Client struct {
	sock    string
	log     *zap.Logger
	timeout time.Duration

	mu     sync.Mutex
	idle   []*session
	closed bool
}

// session is an open prompt-mode connection to the master.
type session struct {
	conn   net.Conn
	prompt string // as the master prints it, learned from the first one
}

// Option configures a Client.
type Option func(*Client)

// WithTimeout bounds one batch (connect, write, read). Default 10 s.
func WithTimeout(d time.Duration) Option { return func(c *Client) { c.timeout = d } }

// New returns a client for the master socket at path.
func New(path string, log *zap.Logger, opts ...Option) *Client {
	if log == nil {
		log = zap.NewNop()
	}
	c := &Client{sock: path, log: log, timeout: 10 * time.Second}
	for _, o := range opts {
		o(c)
	}
	return c
}

// Socket is the master socket path.
func (c *Client) Socket() string { return c.sock }

// Result is one command's outcome in a batch.
type Result struct {
	Command Command
	Reply   string // HAProxy's reply, payload prompts removed
	Err     error  // nil, a *ReplyError, or ErrNotExecuted
}

// Results is a batch outcome, in command order.
type Results []Result

// Err joins the errors of the batch, or nil when every command succeeded.
func (rs Results) Err() error {
	var errs []error
	for _, r := range rs {
		if r.Err != nil {
			errs = append(errs, r.Err)
		}
	}
	return errors.Join(errs...)
}

// SocatLine is the shell command an operator pastes to send cmd by hand.
// Every word is single-quoted for a POSIX shell, and the command is printed
// with printf, not echo (dash's echo expands backslashes), so pasting it
// runs exactly one shell pipeline that sends exactly cmd. A payload is read
// from the file named by $PEM_FILE, which the operator sets. A command that
// fails Check, which Exec never sends, comes back as a shell comment with
// the command Go-quoted: pasting it runs nothing.
func (c *Client) SocatLine(cmd Command) string {
	if err := cmd.Check(); err != nil {
		return "# not sent: " + strconv.Quote(cmd.String())
	}
	if !printable(c.sock) {
		// Single quotes would keep a newline in the path, but the log
		// line would span lines: say it in one line instead.
		return "# socket path not printable, no socat line: " + strconv.Quote(cmd.String()) + " to " + strconv.Quote(c.sock)
	}
	send := "printf '%s\\n' " + shellQuote(cmd.String())
	if cmd.Payload != "" {
		send = "(" + send + `; grep -v '^$' "$PEM_FILE"; echo)`
	}
	return send + " | socat stdio " + shellQuote("unix-connect:"+c.sock)
}

// printable reports whether s is printable ASCII only.
func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// shellQuote quotes s as one word for a POSIX shell: inside single quotes
// nothing is special but the single quote itself, which is written as a
// closing quote, a backslash-escaped quote and an opening quote.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// Exec sends cmds in one round trip and classifies each reply. The error is
// non-nil only when the batch could not be exchanged at all (socket
// unreachable, timeout, reply framing lost); per-command failures are in the
// Results.
func (c *Client) Exec(ctx context.Context, cmds ...Command) (Results, error) {
	if len(cmds) == 0 {
		return nil, nil
	}
	// The constructors check their commands; a Command can also be written
	// as a literal, so the whole batch is checked again here, and none of it
	// is sent if one command could smuggle another.
	for _, cmd := range cmds {
		if err := cmd.Check(); err != nil {
			return nil, fmt.Errorf("batch refused, nothing sent: %w", err)
		}
	}
	for _, cmd := range cmds {
		if ce := c.log.Check(zap.DebugLevel, "runtime command"); ce != nil {
			fields := []zap.Field{zap.String("cmd", cmd.String()), zap.String("socat", c.SocatLine(cmd))}
			if cmd.Payload != "" {
				fields = append(fields, zap.Int("payload_bytes", len(cmd.Payload)))
			}
			ce.Write(fields...)
		}
	}
	raw, err := c.exchange(ctx, cmds)
	if err != nil {
		return nil, err
	}
	replies, err := splitReplies(raw)
	if err != nil {
		return nil, fmt.Errorf("batch of %d commands: %w", len(cmds), err)
	}
	rs := make(Results, len(cmds))
	for i, cmd := range cmds {
		rs[i].Command = cmd
		if i >= len(replies) {
			rs[i].Err = fmt.Errorf("%s: %w", cmd.String(), ErrNotExecuted)
			continue
		}
		rs[i].Reply = replies[i]
		rs[i].Err = classify(cmd, replies[i])
		if rs[i].Err != nil {
			c.log.Debug("runtime reply", zap.String("cmd", cmd.String()), zap.String("reply", strings.TrimSpace(replies[i])), zap.Error(rs[i].Err))
		}
	}
	return rs, nil
}

// Do sends one command and returns its reply, or its classified error.
func (c *Client) Do(ctx context.Context, cmd Command) (string, error) {
	rs, err := c.Exec(ctx, cmd)
	if err != nil {
		return "", err
	}
	return rs[0].Reply, rs[0].Err
}

// encodeBatch writes each command, with its payload and the empty line that
// ends it.
func encodeBatch(cmds []Command) []byte {
	var b strings.Builder
	for _, cmd := range cmds {
		b.WriteString(cmd.String())
		b.WriteByte('\n')
		if cmd.Payload != "" {
			b.WriteString(cmd.Payload)
			b.WriteByte('\n')
		}
	}
	return []byte(b.String())
}

// Close closes the kept sessions. Later batches still work, on sessions
// that are closed after use.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.dropIdle()
	return nil
}

// dropIdle closes the kept sessions, which a reload is about to end.
func (c *Client) dropIdle() {
	c.mu.Lock()
	idle := c.idle
	c.idle = nil
	c.mu.Unlock()
	for _, s := range idle {
		_ = s.conn.Close()
	}
}

func (c *Client) takeIdle() *session {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n := len(c.idle); n > 0 {
		s := c.idle[n-1]
		c.idle = c.idle[:n-1]
		return s
	}
	return nil
}

func (c *Client) putIdle(s *session) {
	_ = s.conn.SetDeadline(time.Time{})
	c.mu.Lock()
	if !c.closed && len(c.idle) < maxIdle {
		c.idle = append(c.idle, s)
		s = nil
	}
	c.mu.Unlock()
	if s != nil {
		_ = s.conn.Close()
	}
}

// exchange runs the batch on a kept session, or a new one, and returns the
// output from the prompt that precedes the first reply: what splitReplies
// reads.
func (c *Client) exchange(ctx context.Context, cmds []Command) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	body := encodeBatch(cmds)
	if s := c.takeIdle(); s != nil {
		// The kept session's prompt is not printed again before the first
		// reply: run starts the output with it, as on a new session.
		out, done, err := s.run(ctx, body, len(cmds), s.prompt)
		switch {
		case err == nil && done:
			c.putIdle(s)
			return out, nil
		case len(out) > len(s.prompt) || ctx.Err() != nil:
			// The master answered on this session: what it answered stands.
			_ = s.conn.Close()
			if err != nil {
				return "", c.ioError(ctx, err)
			}
			return out, nil
		}
		// Closed before any reply: the master re-executed since the
		// session's last batch. Start over on a new session.
		_ = s.conn.Close()
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.sock)
	if err != nil {
		return "", fmt.Errorf("%w: %v", ErrMasterUnreachable, err)
	}
	s := &session{conn: conn}
	out, done, err := s.run(ctx, append([]byte("prompt\n"), body...), len(cmds)+1, "")
	if err != nil {
		_ = conn.Close()
		return "", c.ioError(ctx, err)
	}
	if done {
		c.putIdle(s)
	} else {
		_ = conn.Close()
	}
	return out, nil
}

func (c *Client) ioError(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("master socket %s: %w", c.sock, ctx.Err())
	}
	return fmt.Errorf("master socket %s: %w", c.sock, err)
}

// run writes req and reads until want prompts have come back (done), or
// until the master closes the session (not done, no error: a routing error
// closes it). It learns the session's prompt from the first one. The output
// starts with prefix, which is not counted.
//
// A reply can be large ("show stat" of every server is about 400 bytes per
// server), so the output is read into one buffer and returned as a string
// over that buffer's memory, without a copy.
func (s *session) run(ctx context.Context, req []byte, want int, prefix string) (out string, done bool, err error) {
	if dl, ok := ctx.Deadline(); ok {
		_ = s.conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = s.conn.SetDeadline(time.Now()) })
	defer stop()

	// Write while reading: a large batch fills both socket buffers.
	werr := make(chan error, 1)
	go func() {
		_, err := s.conn.Write(req)
		werr <- err
	}()
	buf := append(make([]byte, 0, 4096), prefix...)
	seen, from := 0, len(prefix) // prompts counted, and where counting resumes
	for seen < want {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, rerr := s.conn.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if s.prompt == "" {
			if m := promptRE.Find(buf); m != nil { // prefix is empty here
				s.prompt = string(m)
			} else if len(buf) > 64 || rerr != nil && len(buf) > 0 {
				<-werr
				return "", false, fmt.Errorf("%w: output does not start with a master prompt: %q", ErrUnrecognizedReply, truncate(string(buf), 120))
			}
		}
		if s.prompt != "" {
			for {
				i := bytes.Index(buf[from:], []byte(s.prompt))
				if i < 0 {
					// A prompt may be split across reads.
					from = max(from, len(buf)-len(s.prompt)+1)
					break
				}
				seen++
				from += i + len(s.prompt)
			}
		}
		if rerr != nil {
			// A write error after the master closed early (routing error)
			// is expected: the replies read so far tell what ran.
			<-werr
			if errors.Is(rerr, io.EOF) || isReset(rerr) {
				return bufString(buf), false, nil
			}
			return bufString(buf), false, rerr
		}
	}
	if err := <-werr; err != nil {
		return bufString(buf), false, err
	}
	return bufString(buf), true, nil
}

// bufString is buf as a string, without a copy when most of buf's capacity
// is used (a large reply). The caller must not write to buf afterwards:
// run's buffer is its own and is dropped on return. A short reply is
// copied: a substring of it kept for long (a certificate's serial, a
// version) would otherwise hold the whole 4 KB buffer.
func bufString(buf []byte) string {
	if len(buf) < cap(buf)/2 {
		return string(buf)
	}
	return unsafe.String(unsafe.SliceData(buf), len(buf))
}

// promptRE matches the interactive prompt the master prints: "master> " on
// 2.6; later versions decorate it ("master [ReloadCounter:1]> "), so the
// prompt is taken from the start of the output, which is always a prompt.
var promptRE = regexp.MustCompile(`^master[^\n>]*> `)

// payloadPromptRE matches the "+ " the CLI echoes for each payload line.
var payloadPromptRE = regexp.MustCompile(`^(\+ )+`)

// splitReplies cuts the output of one prompt-mode session into replies.
// Each reply keeps its text without the trailing empty line.
func splitReplies(out string) ([]string, error) {
	if out == "" {
		return nil, nil
	}
	prompt := promptRE.FindString(out)
	if prompt == "" {
		return nil, fmt.Errorf("%w: output does not start with a master prompt: %q", ErrUnrecognizedReply, truncate(out, 120))
	}
	parts := strings.Split(out[len(prompt):], prompt)
	// The last piece follows the prompt printed after the last reply, before
	// "quit" closes: it is empty. When the master closed the session early
	// there is no such prompt, and the last piece is a reply.
	if parts[len(parts)-1] == "" {
		parts = parts[:len(parts)-1]
	}
	for i, p := range parts {
		if strings.HasPrefix(p, "+ ") { // ReplaceAllString copies even without a match
			p = payloadPromptRE.ReplaceAllString(p, "")
		}
		p = strings.TrimSuffix(p, "\n")
		p = strings.TrimSuffix(p, "\n")
		parts[i] = p
	}
	return parts, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
