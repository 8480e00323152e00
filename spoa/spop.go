package spoa

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/spoa/internal/spopwire"
)

// The agent side of SPOP 2.0 (haproxy doc/SPOE.txt, section 3), as much as
// HAProxy 2.6 uses: the HELLO handshake (with health checks), NOTIFY frames
// answered by ACKs that set variables, and DISCONNECT both ways.
//
// It replaces github.com/criteo/haproxy-spoe-go v1.0.6, which leaked: each
// NOTIFY ran on a worker goroutine that handed its ACK to the connection's
// writer over an unbuffered channel, and the writer stopped when the
// connection went. A worker still deciding at that moment blocked forever
// on the send: one goroutine per NOTIFY in flight at each disconnect (3
// dropped connections with 500 NOTIFYs in flight each left 1 500). It also
// started a goroutine for every NOTIFY no idle worker could take, without
// bound.
//
// Here each connection has one reader; a NOTIFY takes one of a fixed number
// of handler slots shared by every connection (the reader waits for a free
// one, so HAProxy queues rather than the agent growing), and its handler
// writes its own ACK on the connection it came from, under a write deadline.
// A handler whose connection has gone gets a write error and returns.
//
// Capabilities: "pipelining" only. ACKs go out in completion order (a slow
// Consul call for one client does not hold up cached answers for others)
// but always on the NOTIFY's own connection, so "async" (an ACK on any
// connection of the engine, which HAProxy 2.6 looks up only in the queue of
// the thread that owns the connection it arrived on) is never needed.
// No fragmentation: HAProxy 2.6 does not fragment unless the agent says it
// can, and a frame without FIN is refused.

const (
	spopVersion = "2.0"
	// maxFrameSize is what the agent offers: HAProxy's own default
	// (tune.bufsize 16384 minus the 4-byte length).
	maxFrameSize = 16380
	// minFrameSize is the smallest frame size SPOP allows.
	minFrameSize = 256
	// helloTimeout bounds the wait for HAPROXY-HELLO after accept.
	helloTimeout = 5 * time.Second
	// DefaultMaxHandlers bounds the NOTIFY frames handled at once, over
	// every agent connection. A handler holds a goroutine and its frame
	// (16 KiB at most) for a cache hit's microseconds, or for one Consul
	// call (900 ms at most; calls for one source are coalesced). 256 covers
	// a burst of 256 new sources at once and bounds that memory to about
	// 6 MiB; past it, HAProxy waits for a slot within its own 1 s
	// processing timeout.
	DefaultMaxHandlers = 256
)

// Frame types (SPOE.txt 3.2.2).
const (
	frameUnset             = 0
	frameHAProxyHello      = 1
	frameHAProxyDisconnect = 2
	frameNotify            = 3
	frameAgentHello        = 101
	frameAgentDisconnect   = 102
	frameAck               = 103

	flagFin = 1
)

// Typed data (SPOE.txt 3.1).
const (
	typeNull   = 0
	typeBool   = 1
	typeInt32  = 2
	typeUint32 = 3
	typeInt64  = 4
	typeUint64 = 5
	typeIPv4   = 6
	typeIPv6   = 7
	typeString = 8
	typeBinary = 9
	flagTrue   = 0x10

	actionSetVar = 1
	scopeSession = 1
	scopeTxn     = 2
)

// DISCONNECT status codes (SPOE.txt 3.5).
const (
	statusNormal           = 0
	statusIO               = 1
	statusTimeout          = 2
	statusTooBig           = 3
	statusInvalid          = 4
	statusNoVersion        = 5
	statusNoMaxFrameSize   = 6
	statusNoCapabilities   = 7
	statusBadVersion       = 8
	statusBadMaxFrameSize  = 9
	statusNoFragmentation  = 10
	statusResourceExceeded = 13
)

// spopError ends a connection with an AGENT-DISCONNECT carrying status.
type spopError struct {
	status uint32
	msg    string
}

func (e *spopError) Error() string { return fmt.Sprintf("spop status %d: %s", e.status, e.msg) }

func protocolErr(status uint32, format string, args ...any) error {
	return &spopError{status: status, msg: fmt.Sprintf(format, args...)}
}

var errTruncated = spopwire.ErrTruncated

// frame is one decoded SPOP frame.
type frame struct {
	typ     byte
	flags   uint32
	stream  uint64
	id      uint64
	payload []byte
}

// agentConn is one connection from HAProxy.
type agentConn struct {
	a   *Authorizer
	c   net.Conn
	r   *bufio.Reader
	log *zap.Logger
	max int // negotiated frame size

	wmu sync.Mutex // one frame written at a time
}

// serveConn runs one agent connection until HAProxy or the agent ends it.
// It returns once the connection is closed; handlers it started may still
// be finishing, and their ACK writes then fail.
func (a *Authorizer) serveConn(c net.Conn) {
	ac := &agentConn{a: a, c: c, r: bufio.NewReaderSize(c, 4096), log: a.log, max: maxFrameSize}
	defer c.Close()
	err := ac.run()
	var pe *spopError
	switch {
	case err == nil:
	case errors.As(err, &pe):
		a.log.Warn("spoe agent connection refused", zap.Uint32("status", pe.status), zap.String("reason", pe.msg))
		ac.disconnect(pe.status, pe.msg)
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed):
		// HAProxy closed, or Close did.
	default:
		a.log.Debug("spoe agent connection ended", zap.Error(err))
	}
}

func (ac *agentConn) run() error {
	_ = ac.c.SetReadDeadline(time.Now().Add(helloTimeout))
	f, err := ac.readFrame()
	if err != nil {
		return err
	}
	if f.typ != frameHAProxyHello {
		return protocolErr(statusInvalid, "frame type %d before HAPROXY-HELLO", f.typ)
	}
	healthcheck, err := ac.hello(f)
	if err != nil {
		return err
	}
	if healthcheck {
		return nil
	}
	for {
		_ = ac.c.SetReadDeadline(time.Now().Add(agentIdleTimeout))
		f, err := ac.readFrame()
		if err != nil {
			return err
		}
		switch f.typ {
		case frameNotify:
			if f.flags&flagFin == 0 {
				return protocolErr(statusNoFragmentation, "fragmented NOTIFY (the agent does not announce fragmentation)")
			}
			if !ac.a.acquire() {
				return net.ErrClosed
			}
			go func() {
				defer ac.a.release()
				ac.ack(f)
			}()
		case frameHAProxyDisconnect:
			ac.disconnect(statusNormal, "normal")
			return nil
		case frameUnset, frameHAProxyHello:
			return protocolErr(statusInvalid, "unexpected frame type %d", f.typ)
		default:
			// "Unknown frames may be silently skipped" (SPOE.txt 3.2.2).
		}
	}
}

// helloInfo is what the agent uses of a HAPROXY-HELLO.
type helloInfo struct {
	maxFrame    int  // the frame size both sides use
	pipelining  bool // HAProxy offers it
	healthcheck bool
}

// parseHello reads a HAPROXY-HELLO payload (a KV list) and negotiates the
// frame size (SPOE.txt 3.2.4). Errors carry their DISCONNECT status.
func parseHello(b []byte) (helloInfo, error) {
	var versions, caps string
	var haveVersions, haveCaps, haveMax bool
	var theirMax uint64
	var h helloInfo
	for len(b) > 0 {
		key, rest, err := getString(b)
		if err != nil {
			return h, protocolErr(statusInvalid, "HAPROXY-HELLO: %v", err)
		}
		v, rest, err := getValue(rest)
		if err != nil {
			return h, protocolErr(statusInvalid, "HAPROXY-HELLO %q: %v", key, err)
		}
		b = rest
		switch key {
		case "supported-versions":
			versions, haveVersions = string(v.bytes), v.typ == typeString
		case "max-frame-size":
			theirMax, haveMax = v.uint, v.typ == typeUint32
		case "capabilities":
			caps, haveCaps = string(v.bytes), v.typ == typeString
		case "healthcheck":
			h.healthcheck = v.typ == typeBool && v.boolean
		}
	}
	switch {
	case !haveVersions:
		return h, protocolErr(statusNoVersion, "HAPROXY-HELLO has no supported-versions")
	case !haveMax:
		return h, protocolErr(statusNoMaxFrameSize, "HAPROXY-HELLO has no max-frame-size")
	case !haveCaps:
		return h, protocolErr(statusNoCapabilities, "HAPROXY-HELLO has no capabilities")
	case !supportsV2(versions):
		return h, protocolErr(statusBadVersion, "HAProxy supports SPOP %q, the agent 2.0", versions)
	case theirMax < minFrameSize:
		return h, protocolErr(statusBadMaxFrameSize, "max-frame-size %d is below %d", theirMax, minFrameSize)
	}
	h.maxFrame = int(min(theirMax, maxFrameSize))
	for c := range strings.SplitSeq(caps, ",") {
		if strings.TrimSpace(c) == "pipelining" {
			h.pipelining = true
		}
	}
	return h, nil
}

// hello answers HAPROXY-HELLO and reports whether it was a health check.
func (ac *agentConn) hello(f frame) (healthcheck bool, err error) {
	h, err := parseHello(f.payload)
	if err != nil {
		return false, err
	}
	ac.max = h.maxFrame
	caps := ""
	if h.pipelining {
		caps = "pipelining"
	}
	var p []byte
	p = putString(p, "version")
	p = putTypedString(p, spopVersion)
	p = putString(p, "max-frame-size")
	p = putUint32(p, uint32(ac.max))
	p = putString(p, "capabilities")
	p = putTypedString(p, caps)
	return h.healthcheck, ac.write(frameAgentHello, 0, 0, p)
}

// supportsV2 reports whether a supported-versions list ("2.0, 1.5")
// includes SPOP 2.x (a major version implies its earlier minors).
func supportsV2(versions string) bool {
	for v := range strings.SplitSeq(versions, ",") {
		if major, _, _ := strings.Cut(strings.TrimSpace(v), "."); major == "2" {
			return true
		}
	}
	return false
}

// ack answers one NOTIFY on this connection. A write error (the connection
// has gone) closes the connection, which ends its reader too.
func (ac *agentConn) ack(f frame) {
	if err := ac.write(frameAck, f.stream, f.id, ac.a.handle(f.payload)); err != nil {
		ac.log.Debug("spoe ACK not sent; the connection is gone", zap.Uint64("stream", f.stream), zap.Error(err))
		ac.c.Close()
	}
}

// disconnect sends AGENT-DISCONNECT (best effort: the connection closes
// right after it either way).
func (ac *agentConn) disconnect(status uint32, msg string) {
	var p []byte
	p = putString(p, "status-code")
	p = putUint32(p, status)
	p = putString(p, "message")
	p = putTypedString(p, msg)
	_ = ac.write(frameAgentDisconnect, 0, 0, p)
}

// readFrame reads one frame: the length within the deadline already set,
// the rest within frameTimeout.
func (ac *agentConn) readFrame() (frame, error) {
	var n [4]byte
	if _, err := io.ReadFull(ac.r, n[:]); err != nil {
		return frame{}, err
	}
	size := binary.BigEndian.Uint32(n[:])
	if size > uint32(ac.max) {
		return frame{}, protocolErr(statusTooBig, "frame of %d bytes, max-frame-size is %d", size, ac.max)
	}
	_ = ac.c.SetReadDeadline(time.Now().Add(frameTimeout))
	b := make([]byte, size)
	if _, err := io.ReadFull(ac.r, b); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return frame{}, protocolErr(statusTimeout, "frame not received within %s", frameTimeout)
		}
		return frame{}, err
	}
	if len(b) < 5 {
		return frame{}, protocolErr(statusInvalid, "frame of %d bytes", len(b))
	}
	f := frame{typ: b[0], flags: binary.BigEndian.Uint32(b[1:5])}
	var err error
	rest := b[5:]
	if f.stream, rest, err = spopwire.Varint(rest); err != nil {
		return frame{}, protocolErr(statusInvalid, "stream-id: %v", err)
	}
	if f.id, rest, err = spopwire.Varint(rest); err != nil {
		return frame{}, protocolErr(statusInvalid, "frame-id: %v", err)
	}
	f.payload = rest
	return f, nil
}

// write sends one frame with the FIN flag, within frameTimeout. A payload
// that does not fit the negotiated size is refused (it cannot happen with
// the variables this agent sets: their values are shorter than the NOTIFY
// that carried the certificate).
func (ac *agentConn) write(typ byte, stream, id uint64, payload []byte) error {
	b := make([]byte, 4, 4+5+20+len(payload))
	b = append(b, typ, 0, 0, 0, flagFin)
	b = spopwire.PutVarint(b, stream)
	b = spopwire.PutVarint(b, id)
	b = append(b, payload...)
	if len(b)-4 > ac.max {
		return fmt.Errorf("frame of %d bytes exceeds max-frame-size %d", len(b)-4, ac.max)
	}
	binary.BigEndian.PutUint32(b, uint32(len(b)-4))
	ac.wmu.Lock()
	defer ac.wmu.Unlock()
	_ = ac.c.SetWriteDeadline(time.Now().Add(frameTimeout))
	_, err := ac.c.Write(b)
	return err
}

// value is one decoded typed datum.
type value struct {
	typ     byte
	boolean bool
	uint    uint64 // int32, uint32, int64, uint64 (as sent)
	bytes   []byte // string, binary, ipv4, ipv6
}

// getValue decodes one typed datum.
func getValue(b []byte) (value, []byte, error) {
	if len(b) == 0 {
		return value{}, nil, errTruncated
	}
	v := value{typ: b[0] & 0x0f}
	flags, b := b[0]&0xf0, b[1:]
	var err error
	switch v.typ {
	case typeNull:
	case typeBool:
		v.boolean = flags&flagTrue != 0
	case typeInt32, typeUint32, typeInt64, typeUint64:
		v.uint, b, err = spopwire.Varint(b)
	case typeIPv4, typeIPv6:
		n := 4
		if v.typ == typeIPv6 {
			n = 16
		}
		if len(b) < n {
			return value{}, nil, errTruncated
		}
		v.bytes, b = b[:n], b[n:]
	case typeString, typeBinary:
		v.bytes, b, err = getBytes(b)
	default:
		return value{}, nil, fmt.Errorf("unknown data type %d", v.typ)
	}
	return v, b, err
}

// typeName names a data type for log lines.
func typeName(t byte) string {
	names := [...]string{"null", "bool", "int32", "uint32", "int64", "uint64", "ipv4", "ipv6", "string", "binary"}
	if int(t) < len(names) {
		return names[t]
	}
	return fmt.Sprintf("type %d", t)
}

func getBytes(b []byte) ([]byte, []byte, error) {
	n, b, err := spopwire.Varint(b)
	if err != nil {
		return nil, nil, err
	}
	if n > uint64(len(b)) {
		return nil, nil, errTruncated
	}
	return b[:n], b[n:], nil
}

func getString(b []byte) (string, []byte, error) {
	s, b, err := getBytes(b)
	return string(s), b, err
}

func putString(b []byte, s string) []byte { return append(spopwire.PutVarint(b, uint64(len(s))), s...) }

func putTypedString(b []byte, s string) []byte { return putString(append(b, typeString), s) }

func putUint32(b []byte, v uint32) []byte {
	return spopwire.PutVarint(append(b, typeUint32), uint64(v))
}

// setVar is one set-var action (session scope with appendActions,
// transaction scope with appendTxnActions).
type setVar struct {
	name  string
	value any // bool, string or int64
}

// appendActions encodes set-var actions in the session scope (SPOE.txt 3.4).
func appendActions(b []byte, vars []setVar) []byte { return appendScoped(b, scopeSession, vars) }

// appendTxnActions encodes set-var actions in the transaction scope.
func appendTxnActions(b []byte, vars []setVar) []byte { return appendScoped(b, scopeTxn, vars) }

func appendScoped(b []byte, scope byte, vars []setVar) []byte {
	for _, v := range vars {
		b = append(b, actionSetVar, 3, scope)
		b = putString(b, v.name)
		switch x := v.value.(type) {
		case bool:
			t := byte(typeBool)
			if x {
				t |= flagTrue
			}
			b = append(b, t)
		case string:
			b = putTypedString(b, x)
		case int64:
			b = spopwire.PutVarint(append(b, typeInt64), uint64(x))
		default:
			panic(fmt.Sprintf("spoa: set-var of type %T", x))
		}
	}
	return b
}

// acquire takes a handler slot, waiting for one; false once Close began.
func (a *Authorizer) acquire() bool {
	select {
	case a.slots <- struct{}{}:
		return true
	case <-a.ctx.Done():
		return false
	}
}

func (a *Authorizer) release() { <-a.slots }
