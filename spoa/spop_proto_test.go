package spoa

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/haproxy-connect/haproxy-connect/spoa/internal/spopwire"
)

// rawConn speaks SPOP frame by frame, to drive the agent where spoptest
// (which only does what HAProxy does) cannot.
type rawConn struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

func dialRaw(t *testing.T, addr string) *rawConn {
	t.Helper()
	c, err := net.Dial("unix", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return &rawConn{t: t, c: c, r: bufio.NewReader(c)}
}

func (r *rawConn) send(typ byte, flags uint32, stream uint64, payload []byte) {
	r.t.Helper()
	b := make([]byte, 4, 64+len(payload))
	b = append(b, typ)
	b = binary.BigEndian.AppendUint32(b, flags)
	b = spopwire.PutVarint(b, stream)
	b = spopwire.PutVarint(b, 1)
	b = append(b, payload...)
	binary.BigEndian.PutUint32(b, uint32(len(b)-4))
	if _, err := r.c.Write(b); err != nil {
		r.t.Fatal(err)
	}
}

// recv returns the next frame's type and stream, and its payload decoded
// as a KV list (nil for an ACK).
func (r *rawConn) recv() (byte, uint64, map[string]any, error) {
	var n [4]byte
	if _, err := io.ReadFull(r.r, n[:]); err != nil {
		return 0, 0, nil, err
	}
	b := make([]byte, binary.BigEndian.Uint32(n[:]))
	if _, err := io.ReadFull(r.r, b); err != nil {
		return 0, 0, nil, err
	}
	typ := b[0]
	stream, rest, err := spopwire.Varint(b[5:])
	if err != nil {
		return 0, 0, nil, err
	}
	if _, rest, err = spopwire.Varint(rest); err != nil {
		return 0, 0, nil, err
	}
	if typ == frameAck {
		return typ, stream, nil, nil
	}
	kv := map[string]any{}
	for len(rest) > 0 {
		var k string
		var v value
		if k, rest, err = getString(rest); err == nil {
			v, rest, err = getValue(rest)
		}
		if err != nil {
			return 0, 0, nil, err
		}
		switch v.typ {
		case typeString:
			kv[k] = string(v.bytes)
		default:
			kv[k] = v.uint
		}
	}
	return typ, stream, kv, nil
}

// closed reports whether the agent closed the connection.
func (r *rawConn) closed() bool {
	_, err := r.r.ReadByte()
	return errors.Is(err, io.EOF)
}

// kvList encodes key/value pairs (string, uint32 or bool values).
func kvList(kv ...any) []byte {
	var b []byte
	for i := 0; i < len(kv); i += 2 {
		b = putString(b, kv[i].(string))
		switch v := kv[i+1].(type) {
		case string:
			b = putTypedString(b, v)
		case uint32:
			b = putUint32(b, v)
		case bool:
			t := byte(typeBool)
			if v {
				t |= flagTrue
			}
			b = append(b, t)
		}
	}
	return b
}

// haproxyHello is what HAProxy 2.6 sends, with overrides.
func haproxyHello(overrides ...any) []byte {
	kv := map[string]any{"supported-versions": "2.0", "max-frame-size": uint32(16380), "capabilities": "pipelining,async", "engine-id": "E1"}
	order := []string{"supported-versions", "max-frame-size", "capabilities", "engine-id", "healthcheck"}
	for i := 0; i < len(overrides); i += 2 {
		kv[overrides[i].(string)] = overrides[i+1]
	}
	var list []any
	for _, k := range order {
		if v, ok := kv[k]; ok && v != nil {
			list = append(list, k, v)
		}
	}
	return kvList(list...)
}

func startAgent(t *testing.T) string {
	t.Helper()
	a := newTest(t, &fakeDecider{allowed: map[string]bool{clientID: true}})
	sock := filepath.Join(t.TempDir(), "spoa.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = a.Serve(ln) }()
	return sock
}

// TestSPOPHello: the handshake's answers and refusals (SPOE.txt 3.2.4-5).
func TestSPOPHello(t *testing.T) {
	sock := startAgent(t)
	type want struct {
		Type   byte
		KV     map[string]any
		Closed bool
	}
	hello := func(max uint64, caps string) map[string]any {
		return map[string]any{"version": "2.0", "max-frame-size": max, "capabilities": caps}
	}
	refused := func(status uint64) map[string]any { return map[string]any{"status-code": status} }
	tests := []struct {
		name  string
		typ   byte
		hello []byte
		want  want
	}{
		{"haproxy 2.6", frameHAProxyHello, haproxyHello(), want{frameAgentHello, hello(16380, "pipelining"), false}},
		{"smaller frames", frameHAProxyHello, haproxyHello("max-frame-size", uint32(1024)), want{frameAgentHello, hello(1024, "pipelining"), false}},
		{"larger frames", frameHAProxyHello, haproxyHello("max-frame-size", uint32(65536)), want{frameAgentHello, hello(16380, "pipelining"), false}},
		{"no pipelining offered", frameHAProxyHello, haproxyHello("capabilities", "async"), want{frameAgentHello, hello(16380, ""), false}},
		{"versions list", frameHAProxyHello, haproxyHello("supported-versions", " 2.0 , 1.5"), want{frameAgentHello, hello(16380, "pipelining"), false}},
		{"health check", frameHAProxyHello, haproxyHello("healthcheck", true), want{frameAgentHello, hello(16380, "pipelining"), true}},
		{"no version", frameHAProxyHello, haproxyHello("supported-versions", nil), want{frameAgentDisconnect, refused(statusNoVersion), true}},
		{"no max-frame-size", frameHAProxyHello, haproxyHello("max-frame-size", nil), want{frameAgentDisconnect, refused(statusNoMaxFrameSize), true}},
		{"no capabilities", frameHAProxyHello, haproxyHello("capabilities", nil), want{frameAgentDisconnect, refused(statusNoCapabilities), true}},
		{"version 1 only", frameHAProxyHello, haproxyHello("supported-versions", "1.0"), want{frameAgentDisconnect, refused(statusBadVersion), true}},
		{"frames below 256 bytes", frameHAProxyHello, haproxyHello("max-frame-size", uint32(255)), want{frameAgentDisconnect, refused(statusBadMaxFrameSize), true}},
		{"max-frame-size as a string", frameHAProxyHello, haproxyHello("max-frame-size", "16380"), want{frameAgentDisconnect, refused(statusNoMaxFrameSize), true}},
		{"truncated", frameHAProxyHello, haproxyHello()[:10], want{frameAgentDisconnect, refused(statusInvalid), true}},
		{"notify first", frameNotify, nil, want{frameAgentDisconnect, refused(statusInvalid), true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := dialRaw(t, sock)
			r.send(tt.typ, flagFin, 0, tt.hello)
			typ, _, kv, err := r.recv()
			if err != nil {
				t.Fatal(err)
			}
			delete(kv, "message")
			// Closed: EOF comes at once. Open: it still answers.
			closed := true
			if !tt.want.Closed {
				r.send(frameNotify, flagFin, 1, kvList())
				typ, _, _, err := r.recv()
				closed = err != nil || typ != frameAck
			} else if !r.closed() {
				closed = false
			}
			got := want{typ, kv, closed}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("answer (-want +got):\n%s", diff)
			}
		})
	}
}

// TestSPOPFrames: frames after the handshake.
func TestSPOPFrames(t *testing.T) {
	sock := startAgent(t)
	notify := kvList() // an empty message list: not ours, an empty ACK
	big := make([]byte, 2000)
	tests := []struct {
		name       string
		typ        byte
		flags      uint32
		payload    []byte
		wantType   byte
		wantStatus uint64 // for a disconnect
	}{
		{"notify", frameNotify, flagFin, notify, frameAck, 0},
		{"fragmented notify", frameNotify, 0, notify, frameAgentDisconnect, statusNoFragmentation},
		{"frame over the negotiated size", frameNotify, flagFin, big, frameAgentDisconnect, statusTooBig},
		{"haproxy disconnects", frameHAProxyDisconnect, flagFin, kvList("status-code", uint32(0), "message", "normal"), frameAgentDisconnect, statusNormal},
		{"second hello", frameHAProxyHello, flagFin, haproxyHello(), frameAgentDisconnect, statusInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := dialRaw(t, sock)
			r.send(frameHAProxyHello, flagFin, 0, haproxyHello("max-frame-size", uint32(1024)))
			if typ, _, _, err := r.recv(); err != nil || typ != frameAgentHello {
				t.Fatalf("hello: %d, %v", typ, err)
			}
			// An unknown frame type is skipped (SPOE.txt 3.2.2).
			r.send(42, flagFin, 0, []byte{1, 2, 3})
			r.send(tt.typ, tt.flags, 7, tt.payload)
			typ, stream, kv, err := r.recv()
			if err != nil {
				t.Fatal(err)
			}
			if typ != tt.wantType {
				t.Fatalf("frame type %d, want %d (%v)", typ, tt.wantType, kv)
			}
			switch typ {
			case frameAck:
				if stream != 7 {
					t.Errorf("ACK for stream %d, want 7", stream)
				}
			case frameAgentDisconnect:
				if kv["status-code"] != tt.wantStatus {
					t.Errorf("disconnect %v, want status %d", kv, tt.wantStatus)
				}
				if !r.closed() {
					t.Error("connection still open after AGENT-DISCONNECT")
				}
			}
		})
	}
}

// FuzzSPOPDecode: no input makes the HELLO or NOTIFY decoders panic (the
// HELLO is decoded outside the handler's recover), the L7 message's
// included.
func FuzzSPOPDecode(f *testing.F) {
	f.Add(haproxyHello())
	f.Add(haproxyHello("healthcheck", true))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	msg := putString(nil, "authorize")
	msg = append(msg, 1)
	msg = putString(msg, "cert")
	f.Add(append(putString(append(msg, typeBinary), "x"), 0xf0))
	f.Add(append(msg, typeIPv6, 1, 2))
	f.Add(append(msg, 0x0f))
	f.Add(l7Message(clientID, "GET", "/admin", hdrsBin("x-debug", "1")))
	f.Add(namedAuthorizeMessage([]byte("x"), ""))
	f.Add(namedAuthorizeMessage([]byte("x"), clientID)[:20])
	f.Add(httpAuthorizeMessage(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = parseHello(b)
		// Only an authorize message carries anything.
		if m := readAuthorizeArgs(b); !m.seen && (m.argErr != nil || m.der != nil || m.httpListener || m.unnamed) {
			t.Errorf("no authorize message, yet %+v", m)
		}
		// The L7 message: decoding, then deciding what was decoded.
		if seen, r := readL7(b); seen && r.err == nil && r.req.Header != nil {
			r.req.Header("x-debug")
		}
	})
}
