package spoa

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// A minimal HAProxy side of SPOP 2.0 (doc/SPOE.txt), enough to send
// NOTIFY frames to the agent and read the variables it sets.

const (
	spopString = 8
	spopUint32 = 3
	spopBinary = 9
	spopNull   = 0
	spopBool   = 1
	spopInt64  = 4
)

func putVarint(b []byte, i uint64) []byte {
	if i < 240 {
		return append(b, byte(i))
	}
	b = append(b, byte(i)|240)
	i = (i - 240) >> 4
	for i >= 128 {
		b = append(b, byte(i)|128)
		i = (i - 128) >> 7
	}
	return append(b, byte(i))
}

func getVarint(b []byte) (uint64, []byte, error) {
	if len(b) == 0 {
		return 0, nil, io.ErrUnexpectedEOF
	}
	v, b := uint64(b[0]), b[1:]
	if v < 240 {
		return v, b, nil
	}
	for shift := 4; ; shift += 7 {
		if len(b) == 0 {
			return 0, nil, io.ErrUnexpectedEOF
		}
		c := b[0]
		b = b[1:]
		v += uint64(c) << shift
		if c < 128 {
			return v, b, nil
		}
	}
}

func putBytes(b, s []byte) []byte { return append(putVarint(b, uint64(len(s))), s...) }

// kv is one typed SPOP value: string, uint32, []byte, bool or nil.
func putKV(b []byte, name string, v any) []byte {
	b = putBytes(b, []byte(name))
	switch v := v.(type) {
	case nil:
		return append(b, spopNull)
	case string:
		return putBytes(append(b, spopString), []byte(v))
	case uint32:
		return putVarint(append(b, spopUint32), uint64(v))
	case []byte:
		return putBytes(append(b, spopBinary), v)
	}
	panic(fmt.Sprintf("type %T", v))
}

type spopConn struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

func (s *spopConn) writeFrame(typ byte, streamID, frameID uint64, payload []byte) {
	s.t.Helper()
	f := []byte{typ, 0, 0, 0, 1} // flags: FIN
	f = putVarint(f, streamID)
	f = putVarint(f, frameID)
	f = append(f, payload...)
	if _, err := s.c.Write(append(binary.BigEndian.AppendUint32(nil, uint32(len(f))), f...)); err != nil {
		s.t.Fatal(err)
	}
}

// readFrame returns the type, stream-id, frame-id and payload of a frame.
func (s *spopConn) readFrame() (byte, uint64, uint64, []byte, error) {
	var n [4]byte
	if _, err := io.ReadFull(s.r, n[:]); err != nil {
		return 0, 0, 0, nil, err
	}
	f := make([]byte, binary.BigEndian.Uint32(n[:]))
	if _, err := io.ReadFull(s.r, f); err != nil {
		return 0, 0, 0, nil, err
	}
	if len(f) < 5 {
		return 0, 0, 0, nil, errors.New("short frame")
	}
	typ, b := f[0], f[5:]
	sid, b, err := getVarint(b)
	if err != nil {
		return 0, 0, 0, nil, err
	}
	fid, b, err := getVarint(b)
	return typ, sid, fid, b, err
}

func dialSPOP(t *testing.T, addr string) *spopConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	s := &spopConn{t: t, c: c, r: bufio.NewReader(c)}
	var hello []byte
	hello = putKV(hello, "supported-versions", "2.0")
	hello = putKV(hello, "max-frame-size", uint32(16380))
	hello = putKV(hello, "capabilities", "pipelining,async")
	hello = putKV(hello, "engine-id", "test-engine")
	s.writeFrame(1, 0, 0, hello)
	if typ, _, _, _, err := s.readFrame(); err != nil || typ != 101 {
		t.Fatalf("agent hello: type %d, %v", typ, err)
	}
	return s
}

type message struct {
	name string
	args [][2]any // name, value
}

// notify sends one NOTIFY frame and returns the variables the ACK sets, as
// "scope:name" -> value.
func (s *spopConn) notify(streamID uint64, msgs ...message) (map[string]any, error) {
	s.t.Helper()
	var p []byte
	for _, m := range msgs {
		p = putBytes(p, []byte(m.name))
		p = append(p, byte(len(m.args)))
		for _, a := range m.args {
			p = putKV(p, a[0].(string), a[1])
		}
	}
	s.writeFrame(3, streamID, 1, p)
	typ, sid, _, b, err := s.readFrame()
	if err != nil {
		return nil, err
	}
	if typ != 103 || sid != streamID {
		return nil, fmt.Errorf("got frame type %d for stream %d, want an ACK for %d", typ, sid, streamID)
	}
	vars := map[string]any{}
	for len(b) > 0 {
		if len(b) < 3 || b[0] != 1 || b[1] != 3 {
			return nil, fmt.Errorf("unexpected action % x", b)
		}
		scope := b[2]
		name, rest, err := getVarint(b[3:])
		if err != nil || uint64(len(rest)) < name+1 {
			return nil, fmt.Errorf("bad action name: % x", b)
		}
		key := fmt.Sprintf("%d:%s", scope, rest[:name])
		typ, rest := rest[name], rest[name+1:]
		switch typ & 0x0f {
		case spopBool:
			vars[key] = typ&0x10 != 0
		case spopString:
			n, r, err := getVarint(rest)
			if err != nil || uint64(len(r)) < n {
				return nil, fmt.Errorf("bad string: % x", rest)
			}
			vars[key], rest = string(r[:n]), r[n:]
		case spopInt64:
			n, r, err := getVarint(rest)
			if err != nil {
				return nil, fmt.Errorf("bad int64: % x", rest)
			}
			vars[key], rest = int64(n), r
		default:
			return nil, fmt.Errorf("unexpected type %d", typ)
		}
		b = rest
	}
	return vars, nil
}

func TestHandlerOverSPOP(t *testing.T) {
	ca := testenv.NewCA(t, "root")
	der := leafDER(t, ca, 1, clientID)
	a := newTest(t, &fakeDecider{allowed: map[string]bool{clientID: true}})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- a.Serve(ln) }()
	s := dialSPOP(t, ln.Addr().String())

	auth := func(args ...[2]any) message { return message{name: "authorize", args: args} }
	const sess = "1:" // VarScopeSession
	deny := map[string]any{sess + "allowed": false, sess + "source": "-", sess + "gen": int64(0)}
	allow := map[string]any{sess + "allowed": true, sess + "source": clientID, sess + "gen": int64(0)}
	tests := []struct {
		name string
		msgs []message
		want map[string]any
	}{
		{"allowed", []message{auth([2]any{"cert", der})}, allow},
		{"null cert (fetch failed)", []message{auth([2]any{"cert", nil})}, deny},
		{"empty cert", []message{auth([2]any{"cert", []byte{}})}, deny},
		{"cert as a string", []message{auth([2]any{"cert", string(der)})}, deny},
		{"no cert argument", []message{auth([2]any{"other", der})}, deny},
		{"garbage", []message{auth([2]any{"cert", []byte("garbage")})}, deny},
		{"another message only", []message{{name: "other", args: [][2]any{{"cert", der}}}}, map[string]any{}},
		{"after another message", []message{{name: "other", args: [][2]any{{"x", "y"}}}, auth([2]any{"cert", der})}, allow},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := s.notify(uint64(i+1), tt.msgs...)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("variables (-want +got):\n%s", diff)
			}
		})
	}

	// Close drops the established agent connection: HAProxy gets no
	// further answer on it and refuses.
	a.Close()
	if err := <-served; err != nil {
		t.Errorf("Serve: %v", err)
	}
	for {
		typ, _, _, _, err := s.readFrame()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("agent connection still open after Close")
			}
			break
		}
		if typ != 102 { // the library may say goodbye first
			t.Fatalf("frame type %d after Close", typ)
		}
	}
}
