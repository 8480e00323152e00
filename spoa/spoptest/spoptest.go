// Package spoptest is the HAProxy side of SPOP 2.0 (haproxy doc/SPOE.txt,
// section 3), enough to talk to an SPOE agent without HAProxy: it says
// HAPROXY-HELLO, sends NOTIFY frames one at a time and reads the variables
// each ACK sets. spoa's tests and meshbench's authorization workload use it.
//
// Frames: a 4-byte big-endian length, then the type, 4 bytes of flags (FIN),
// stream-id and frame-id as varints, and the payload.
package spoptest

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/haproxy-connect/haproxy-connect/spoa/internal/spopwire"
)

// Frame types.
const (
	FrameHaproxyHello      = 1
	FrameHaproxyDisconnect = 2
	FrameNotify            = 3
	FrameAgentHello        = 101
	FrameAgentDisconnect   = 102
	FrameAck               = 103
)

// Data types.
const (
	typeNull   = 0
	typeBool   = 1
	typeUint32 = 3
	typeInt64  = 4
	typeString = 8
	typeBinary = 9
	flagTrue   = 0x10

	actionSetVar = 1
)

// scopes names the variable scopes of a set-var action, as HAProxy
// prefixes them.
var scopes = [...]string{"proc", "sess", "txn", "req", "res"}

// Conn is one agent connection. It is not safe for concurrent use.
type Conn struct {
	c       net.Conn
	r       *bufio.Reader
	buf     []byte
	stream  uint64
	timeout time.Duration
}

// Dial connects to the agent at addr and exchanges hellos, announcing what
// HAProxy 2.6 announces (pipelining and async). addr is host:port, or a
// unix socket as HAProxy writes it: an absolute path or unix@<path>. Every
// later round trip must finish within timeout.
func Dial(addr, engineID string, timeout time.Duration) (*Conn, error) {
	network := "tcp"
	if p, ok := strings.CutPrefix(addr, "unix@"); ok || strings.HasPrefix(addr, "/") {
		network = "unix"
		if ok {
			addr = p
		}
	}
	c, err := net.DialTimeout(network, addr, timeout)
	if err != nil {
		return nil, err
	}
	s := &Conn{c: c, r: bufio.NewReader(c), timeout: timeout}
	var hello []byte
	hello = putKV(hello, "supported-versions", "2.0")
	hello = putKV(hello, "max-frame-size", uint32(16380))
	hello = putKV(hello, "capabilities", "pipelining,async")
	hello = putKV(hello, "engine-id", engineID)
	typ, _, payload, err := s.roundTrip(FrameHaproxyHello, 0, hello)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("spop hello: %w", err)
	}
	if typ != FrameAgentHello {
		c.Close()
		return nil, fmt.Errorf("spop hello: agent answered frame type %d (% x)", typ, payload)
	}
	return s, nil
}

// Close says goodbye as HAProxy does (HAPROXY-DISCONNECT, status 0), waits
// up to the timeout for the agent's AGENT-DISCONNECT, and closes.
func (s *Conn) Close() error {
	var p []byte
	p = putKV(p, "status-code", uint32(0))
	p = putKV(p, "message", "normal")
	_, _, _, _ = s.roundTrip(FrameHaproxyDisconnect, 0, p)
	return s.c.Close()
}

// Message is one SPOE message with its arguments.
type Message struct {
	Name string
	Args []Arg
}

// Arg is one argument; Value is nil (HAProxy's NULL, a failed sample
// fetch), a string, a uint32 or a []byte.
type Arg struct {
	Name  string
	Value any
}

// encodeMessages is a NOTIFY frame's payload: each message's name, its
// argument count and its arguments.
func encodeMessages(msgs []Message) []byte {
	var p []byte
	for _, m := range msgs {
		p = putBytes(p, []byte(m.Name))
		p = append(p, byte(len(m.Args)))
		for _, a := range m.Args {
			p = putKV(p, a.Name, a.Value)
		}
	}
	return p
}

// Notify sends msgs in one NOTIFY frame on a new stream and returns the
// variables its ACK sets, keyed "scope.name" ("sess.allowed"), with bool,
// string, int64 or []byte values.
func (s *Conn) Notify(msgs ...Message) (map[string]any, error) {
	s.stream++
	p := encodeMessages(msgs)
	typ, sid, payload, err := s.roundTrip(FrameNotify, s.stream, p)
	if err != nil {
		return nil, err
	}
	if typ != FrameAck || sid != s.stream {
		return nil, fmt.Errorf("got frame type %d for stream %d, want an ACK for %d (% x)", typ, sid, s.stream, payload)
	}
	return parseAck(payload)
}

// Send writes msgs in one NOTIFY frame on a new stream without waiting for
// its ACK (HAProxy pipelines), and returns the stream id.
func (s *Conn) Send(msgs ...Message) (uint64, error) {
	s.stream++
	p := encodeMessages(msgs)
	_ = s.c.SetDeadline(time.Now().Add(s.timeout))
	return s.stream, s.writeFrame(FrameNotify, s.stream, p)
}

// Drop closes the connection without a goodbye, as a crashed or killed
// HAProxy worker does.
func (s *Conn) Drop() error { return s.c.Close() }

// ReadFrame reads the next frame the agent sends unasked (a disconnect),
// within the timeout.
func (s *Conn) ReadFrame() (typ byte, payload []byte, err error) {
	_ = s.c.SetDeadline(time.Now().Add(s.timeout))
	typ, _, payload, err = s.readFrame()
	return typ, payload, err
}

func (s *Conn) roundTrip(typ byte, stream uint64, payload []byte) (byte, uint64, []byte, error) {
	_ = s.c.SetDeadline(time.Now().Add(s.timeout))
	if err := s.writeFrame(typ, stream, payload); err != nil {
		return 0, 0, nil, err
	}
	rtyp, sid, b, err := s.readFrame()
	if err == nil && rtyp == FrameAgentDisconnect && typ != FrameHaproxyDisconnect {
		return rtyp, 0, b, fmt.Errorf("agent disconnected: % x", b)
	}
	return rtyp, sid, b, err
}

func (s *Conn) writeFrame(typ byte, stream uint64, payload []byte) error {
	f := append(s.buf[:0], 0, 0, 0, 0, typ, 0, 0, 0, 1) // length, type, flags FIN
	f = spopwire.PutVarint(f, stream)
	f = spopwire.PutVarint(f, 1) // frame-id
	f = append(f, payload...)
	binary.BigEndian.PutUint32(f, uint32(len(f)-4))
	s.buf = f
	_, err := s.c.Write(f)
	return err
}

func (s *Conn) readFrame() (byte, uint64, []byte, error) {
	var n [4]byte
	if _, err := io.ReadFull(s.r, n[:]); err != nil {
		return 0, 0, nil, err
	}
	fr := make([]byte, binary.BigEndian.Uint32(n[:]))
	if _, err := io.ReadFull(s.r, fr); err != nil {
		return 0, 0, nil, err
	}
	if len(fr) < 5 {
		return 0, 0, nil, errors.New("short spop frame")
	}
	typ, b := fr[0], fr[5:]
	sid, b, err := spopwire.Varint(b)
	if err != nil {
		return 0, 0, nil, err
	}
	_, b, err = spopwire.Varint(b) // frame-id
	return typ, sid, b, err
}

// parseAck reads the set-var actions of an ACK payload.
func parseAck(b []byte) (map[string]any, error) {
	vars := map[string]any{}
	for len(b) > 0 {
		if len(b) < 3 || b[0] != actionSetVar || b[1] != 3 || int(b[2]) >= len(scopes) {
			return nil, fmt.Errorf("unexpected action % x", b)
		}
		scope := scopes[b[2]]
		n, rest, err := spopwire.Varint(b[3:])
		if err != nil || uint64(len(rest)) < n+1 {
			return nil, fmt.Errorf("bad variable name in % x", b)
		}
		name := scope + "." + string(rest[:n])
		typ, rest := rest[n], rest[n+1:]
		switch typ & 0x0f {
		case typeBool:
			vars[name] = typ&flagTrue != 0
		case typeString, typeBinary:
			l, r, err := spopwire.Varint(rest)
			if err != nil || uint64(len(r)) < l {
				return nil, fmt.Errorf("bad value of %s in % x", name, b)
			}
			if typ&0x0f == typeString {
				vars[name] = string(r[:l])
			} else {
				vars[name] = append([]byte(nil), r[:l]...)
			}
			rest = r[l:]
		case typeInt64:
			v, r, err := spopwire.Varint(rest)
			if err != nil {
				return nil, fmt.Errorf("bad value of %s in % x", name, b)
			}
			vars[name], rest = int64(v), r
		default:
			return nil, fmt.Errorf("variable %s has unexpected type %d", name, typ)
		}
		b = rest
	}
	return vars, nil
}

func putBytes(b, s []byte) []byte { return append(spopwire.PutVarint(b, uint64(len(s))), s...) }

// putKV appends a key and a typed value.
func putKV(b []byte, key string, v any) []byte {
	b = putBytes(b, []byte(key))
	switch v := v.(type) {
	case nil:
		return append(b, typeNull)
	case string:
		return putBytes(append(b, typeString), []byte(v))
	case uint32:
		return spopwire.PutVarint(append(b, typeUint32), uint64(v))
	case []byte:
		return putBytes(append(b, typeBinary), v)
	}
	panic(fmt.Sprintf("spoptest: unsupported argument type %T", v))
}
