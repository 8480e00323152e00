package spoa

import (
	"errors"
	"net"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/haproxy-connect/haproxy-connect/spoa/spoptest"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

func TestHandlerOverSPOP(t *testing.T) {
	ca := testenv.NewCA(t, "root")
	der := leafDER(t, ca, 1, clientID)
	f := &fakeDecider{allowed: map[string]bool{clientID: true}}
	a := newTest(t, f)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- a.Serve(ln) }()
	s, err := spoptest.Dial(ln.Addr().String(), "test-engine", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}

	arg := func(name string, v any) spoptest.Arg { return spoptest.Arg{Name: name, Value: v} }
	auth := func(args ...spoptest.Arg) spoptest.Message { return spoptest.Message{Name: "authorize", Args: args} }
	deny := map[string]any{"sess.allowed": false, "sess.source": "-", "sess.gen": int64(0)}
	allow := map[string]any{"sess.allowed": true, "sess.source": clientID, "sess.gen": int64(0)}
	// Consul failing for a key not in the cache: the source and no
	// verdict, so HAProxy refuses this request and asks again on the next.
	consulDown := func() { f.set(func(f *fakeDecider) { f.err = errors.New("agent down") }) }
	consulUp := func() { f.set(func(f *fakeDecider) { f.err = nil }) }
	renewed := leafDER(t, ca, 2, clientID)
	tests := []struct {
		name string
		do   func()
		msgs []spoptest.Message
		want map[string]any
	}{
		{"allowed", nil, []spoptest.Message{auth(arg("cert", der))}, allow},
		{"null cert (fetch failed)", nil, []spoptest.Message{auth(arg("cert", nil))}, deny},
		{"empty cert", nil, []spoptest.Message{auth(arg("cert", []byte{}))}, deny},
		{"cert as a string", nil, []spoptest.Message{auth(arg("cert", string(der)))}, deny},
		{"no cert argument", nil, []spoptest.Message{auth(arg("other", der))}, deny},
		{"garbage", nil, []spoptest.Message{auth(arg("cert", []byte("garbage")))}, deny},
		{"another message only", nil, []spoptest.Message{{Name: "other", Args: []spoptest.Arg{arg("cert", der)}}}, map[string]any{}},
		{"after another message", nil, []spoptest.Message{{Name: "other", Args: []spoptest.Arg{arg("x", "y")}}, auth(arg("cert", der))}, allow},
		{"consul down, cached", consulDown, []spoptest.Message{auth(arg("cert", der))}, allow},
		{"consul down, not cached", nil, []spoptest.Message{auth(arg("cert", renewed))}, map[string]any{"sess.source": clientID}},
		{"consul back", consulUp, []spoptest.Message{auth(arg("cert", renewed))}, allow},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.do != nil {
				tt.do()
			}
			got, err := s.Notify(tt.msgs...)
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
		typ, _, err := s.ReadFrame()
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
