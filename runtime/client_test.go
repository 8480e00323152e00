package runtime

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/google/go-cmp/cmp"
)

// Captured from HAProxy 2.6.12's master socket in prompt mode.
const capturedBatch = "master> IP changed from '127.0.0.1' to '127.0.0.9', port changed from '1' to '80' by 'stats socket command'\n\n" +
	"master> No such backend.\n\n" +
	"master> \n" +
	"master> Empty weight string empty or preceded by garbage" +
	"master> + + + Transaction created for certificate /s/leaf.pem!\n\n" +
	"master> Committing /s/leaf.pem.\nSuccess!\n\n" +
	"master> "

func TestSplitReplies(t *testing.T) {
	tests := []struct {
		name string
		out  string
		want []string
	}{
		{"empty output", "", nil},
		{"batch", capturedBatch, []string{
			"IP changed from '127.0.0.1' to '127.0.0.9', port changed from '1' to '80' by 'stats socket command'",
			"No such backend.",
			"",
			"Empty weight string empty or preceded by garbage",
			"Transaction created for certificate /s/leaf.pem!",
			"Committing /s/leaf.pem.\nSuccess!",
		}},
		{"closed early after routing error", "master> \nmaster> Can't find the target PID matching the prefix '@9'\n",
			[]string{"", "Can't find the target PID matching the prefix '@9'"}},
		{"decorated prompt", "master [ReloadCounter:3]> \nmaster [ReloadCounter:3]> ", []string{""}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := splitReplies(tt.out)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("replies (-want +got):\n%s", diff)
			}
		})
	}
	if _, err := splitReplies("garbage"); !errors.Is(err, ErrUnrecognizedReply) {
		t.Errorf("output without a prompt: got %v, want ErrUnrecognizedReply", err)
	}
}

func mustCmd(t *testing.T) func(Command, error) Command {
	return func(c Command, err error) Command {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
}

func TestClassify(t *testing.T) {
	m := mustCmd(t)
	addr := m(SetServerAddr("b", "s1", "10.0.0.1", 80))
	state := m(SetServerState("b", "s1", StateReady))
	weight := m(SetServerWeight("b", "s1", 10))
	add := m(AddServer("b", "d1", "10.0.0.1", 80, ServerOptions{Weight: 1}))
	set := m(SetSSLCert("/s/leaf.pem", "x"))
	commit := m(CommitSSLCert("/s/leaf.pem"))
	setMap := m(SetMap("/s/authz.map", "gen", "5"))
	tests := []struct {
		name  string
		cmd   Command
		reply string
		want  error
	}{
		{"addr changed", addr, "IP changed from '127.0.0.1' to '10.0.0.1', port changed from '1' to '80' by 'stats socket command'", nil},
		{"addr unchanged", addr, "no need to change the addr by 'stats socket command'", nil},
		{"addr port only", addr, "no need to change the addr, port changed from '80' to '81' by 'stats socket command'", nil},
		{"addr invalid", addr, "Invalid addr 'x' by 'stats socket command'", ErrInvalidArgument},
		{"no such server", addr, "No such server.", ErrNoSuchServer},
		{"no such backend", state, "No such backend.", ErrNoSuchBackend},
		{"state ok", state, "", nil},
		{"state unexpected text", state, "Something new.", ErrUnrecognizedReply},
		{"weight ok", weight, "", nil},
		{"weight range", weight, "Absolute weight can only be between 0 and 256 inclusive.", ErrInvalidArgument},
		{"add ok", add, "New server registered.", nil},
		{"add exists", add, "Already exists a server with the same name in backend.", ErrServerExists},
		{"add static lb", add, "Backend must use a dynamic load balancing to support dynamic servers.", ErrNotDynamic},
		{"set cert created", set, "Transaction created for certificate /s/leaf.pem!", nil},
		{"set cert updated", set, "Transaction updated for certificate /s/leaf.pem!", nil},
		{"set cert unknown file", set, "Can't replace a certificate which is not referenced by the configuration!\nCan't update /x!", ErrCertNotReferenced},
		{"set cert bad pem", set, "unable to load certificate from file '/s/leaf.pem'.\nCan't load the payload\nCan't update /s/leaf.pem!", ErrBadCertificate},
		{"commit ok", commit, "Committing /s/leaf.pem.\nSuccess!", nil},
		{"commit failed", commit, "Committing /s/leaf.pem\nunable to do X\nFailed!", ErrCommitFailed},
		{"commit none", commit, "No ongoing transaction! !\nCan't commit /s/leaf.pem!", ErrNoTransaction},
		{"unknown command", state, "Unknown command, but maybe one of the following ones is a better match:\n  help", ErrUnknownCommand},
		{"set map ok", setMap, "", nil},
		{"set map unknown file", setMap, "Unknown map identifier. Please use #<id> or <file>.", ErrNoSuchMap},
		{"set map unknown key", setMap, "entry not found.", ErrNoSuchMapEntry},
		{"routing error", state, "Can't find the target PID matching the prefix '@9'", ErrNoSuchProcess},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := classify(tt.cmd, tt.reply)
			if tt.want == nil {
				if err != nil {
					t.Fatalf("got %v, want success", err)
				}
				return
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
		})
	}
}

func TestCommandValidation(t *testing.T) {
	bad := []struct {
		name string
		fn   func() (Command, error)
	}{
		{"semicolon in backend", func() (Command, error) { return SetServerState("b;shutdown", "s1", StateReady) }},
		{"newline in server", func() (Command, error) { return SetServerState("b", "s1\nshow info", StateReady) }},
		{"space in server", func() (Command, error) { return SetServerWeight("b", "s 1", 1) }},
		{"hostname address", func() (Command, error) { return SetServerAddr("b", "s1", "example.com", 80) }},
		{"port wraps in haproxy", func() (Command, error) { return SetServerAddr("b", "s1", "10.0.0.1", 70000) }},
		{"port zero", func() (Command, error) { return SetServerAddr("b", "s1", "10.0.0.1", 0) }},
		{"weight high", func() (Command, error) { return SetServerWeight("b", "s1", 257) }},
		{"weight negative", func() (Command, error) { return SetServerWeight("b", "s1", -1) }},
		{"bogus state", func() (Command, error) { return SetServerState("b", "s1", "up") }},
		{"relative cert path", func() (Command, error) { return SetSSLCert("leaf.pem", "x") }},
		{"cert path with space", func() (Command, error) { return CommitSSLCert("/a b.pem") }},
		{"empty payload", func() (Command, error) { return SetSSLCert("/a.pem", "\n\n") }},
		{"map value with space", func() (Command, error) { return SetMap("/a.map", "gen", "1 2") }},
		{"map key with newline", func() (Command, error) { return SetMap("/a.map", "g\nshow info", "1") }},
		{"zone with newline", func() (Command, error) {
			return SetServerAddr("b", "s1", "fe80::1%x\n@1 set server local_app/app addr 127.0.0.9 port 9", 80)
		}},
		{"zone with semicolon", func() (Command, error) { return SetServerAddr("b", "s1", "fe80::1%x;@1 reload", 80) }},
		{"zone with space", func() (Command, error) { return SetServerAddr("b", "s1", "fe80::1%a b", 80) }},
		{"zone in add server", func() (Command, error) {
			return AddServer("b", "d1", "fe80::1%lo]:80\nprogram pwn", 80, ServerOptions{})
		}},
		{"ipv4-mapped", func() (Command, error) { return SetServerAddr("b", "s1", "::ffff:1.2.3.4", 80) }},
		{"leading zero", func() (Command, error) { return SetServerAddr("b", "s1", "10.0.0.01", 80) }},
		{"hash in server", func() (Command, error) { return SetServerState("b", "s1#x", StateReady) }},
		{"quote in backend", func() (Command, error) { return SetServerWeight("b'x", "s1", 1) }},
		{"non-ascii server", func() (Command, error) { return SetServerWeight("b", "sé", 1) }},
		{"show servers newline", func() (Command, error) { return ShowServersState("b\nreload") }},
		{"add server sni injection", func() (Command, error) {
			return AddServer("b", "d1", "10.0.0.1", 80, ServerOptions{SSL: true, CrtFile: "/a.pem", CAFile: "/b.pem", SNI: "x) crt /etc/passwd"})
		}},
		{"add server proto injection", func() (Command, error) {
			return AddServer("b", "d1", "10.0.0.1", 80, ServerOptions{SSL: true, CrtFile: "/a.pem", CAFile: "/b.pem", Proto: "h2 crt /etc/passwd"})
		}},
		{"add server proto with newline", func() (Command, error) {
			return AddServer("b", "d1", "10.0.0.1", 80, ServerOptions{SSL: true, CrtFile: "/a.pem", CAFile: "/b.pem", Proto: "h2\nreload"})
		}},
		{"passive check without interval", func() (Command, error) {
			return AddServer("b", "d1", "10.0.0.1", 80, ServerOptions{Passive: PassiveCheck{ErrorLimit: 3}})
		}},
		{"passive check error limit negative", func() (Command, error) {
			return AddServer("b", "d1", "10.0.0.1", 80, ServerOptions{Passive: PassiveCheck{Inter: time.Second, ErrorLimit: -1}})
		}},
		{"passive check error limit too large", func() (Command, error) {
			return AddServer("b", "d1", "10.0.0.1", 80, ServerOptions{Passive: PassiveCheck{Inter: time.Second, ErrorLimit: MaxErrorLimit + 1}})
		}},
		{"passive check interval too long", func() (Command, error) {
			return AddServer("b", "d1", "10.0.0.1", 80, ServerOptions{Passive: PassiveCheck{Inter: 2 * time.Hour, ErrorLimit: 3}})
		}},
		{"enable health newline", func() (Command, error) { return EnableHealth("b", "s1\nreload") }},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := tt.fn(); !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("got %v, want ErrInvalidArgument", err)
			}
		})
	}
}

func TestEncodeBatch(t *testing.T) {
	m := mustCmd(t)
	got := string(encodeBatch([]Command{
		m(SetServerAddr("b", "s1", "::1", 8080)),
		m(SetSSLCert("/s/leaf.pem", "-----BEGIN X-----\r\nabc\n\n-----END X-----")),
		ShowProc(),
	}))
	want := "@1 set server b/s1 addr ::1 port 8080\n@1 set ssl cert /s/leaf.pem <<\n-----BEGIN X-----\nabc\n-----END X-----\n\nshow proc\n"
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("batch (-want +got):\n%s", diff)
	}
}

func TestParseProcList(t *testing.T) {
	text := `#<PID>          <type>          <reloads>       <uptime>        <version>
2596            master          2 [failed: 1]   0d00h01m52s     2.6.12-1+deb12u4
# workers
7418            worker          0               0d00h00m01s     2.6.12-1+deb12u4
# old workers
3555            worker          1               0d00h01m39s     2.6.12-1+deb12u4
# programs
`
	got, err := ParseProcList(text)
	if err != nil {
		t.Fatal(err)
	}
	want := ProcList{
		Master: Process{PID: 2596, Type: "master", Reloads: 2, Failed: 1, Version: "2.6.12-1+deb12u4"},
		Workers: []Process{
			{PID: 7418, Type: "worker", Reloads: 0, Version: "2.6.12-1+deb12u4"},
			{PID: 3555, Type: "worker", Reloads: 1, Version: "2.6.12-1+deb12u4"},
		},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if cur, ok := got.Current(); !ok || cur.PID != 7418 {
		t.Errorf("current worker = %v %v, want 7418", cur, ok)
	}
	if !got.AtLeast(2, 6) || got.AtLeast(2, 7) {
		t.Errorf("AtLeast wrong for %s", got.Master.Version)
	}
	if _, err := ParseProcList("Unknown command."); !errors.Is(err, ErrUnrecognizedReply) {
		t.Errorf("garbage: got %v", err)
	}
}

func TestParseServersState(t *testing.T) {
	text := "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n" +
		"3 b 1 s1 127.0.0.3 2 4 1 1 5 1 0 0 8 0 0 0 - 81 - 0 0 - - 0\n" +
		"3 b 2 s2 127.0.0.1 0 5 5 1 5 1 0 0 8 0 0 0 - 1 - 0 0 - - 0\n"
	got, err := ParseServersState(text)
	if err != nil {
		t.Fatal(err)
	}
	want := []ServerStatus{
		{Backend: "b", Name: "s1", Addr: "127.0.0.3", Port: 81, OpState: OpRunning, AdminState: AdminConfigMaint, Weight: 1},
		{Backend: "b", Name: "s2", Addr: "127.0.0.1", Port: 1, OpState: OpStopped, AdminState: 5, Weight: 5},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if got[0].Maint() || !got[1].Maint() {
		t.Errorf("maint flags wrong")
	}
	if _, err := ParseServersState("3 b 1 s1"); !errors.Is(err, ErrUnrecognizedReply) {
		t.Errorf("garbage: got %v", err)
	}
}

func TestParseCertInfo(t *testing.T) {
	text := "Filename: /s/leaf.pem\nStatus: Used\nSerial: 08C5\nnotBefore: Nov 23 18:25:00 2026 GMT\nnotAfter: Nov 24 18:25:00 2026 GMT\nSubject Alternative Name: URI:spiffe://x/ns/default/dc/dc1/svc/web\nSubject: /CN=b\n"
	got, err := ParseCertInfo(text)
	if err != nil {
		t.Fatal(err)
	}
	if got.Serial != "08C5" || !strings.Contains(got.SAN, "svc/web") || got.NotAfter != "Nov 24 18:25:00 2026 GMT" {
		t.Errorf("got %+v", got)
	}
}

// TestSessionRunFraming feeds a session the captured batch output a few
// bytes at a time (prompts split across reads) and checks when a batch is
// complete: after the expected number of prompts, or at an early close.
func TestSessionRunFraming(t *testing.T) {
	tests := []struct {
		name     string
		prompt   string // a kept session's: the output starts with it
		out      string
		want     int
		close    bool
		wantDone bool
	}{
		{"complete batch on a new session", "", capturedBatch, 7, false, true},
		{"closed early", "", "master> \nmaster> Can't find the target PID matching the prefix '@9'\n", 3, true, false},
		{"not a master", "", "HTTP/1.1 400 Bad Request\r\n" + strings.Repeat("x", 80), 2, true, false},
		// On a kept session the master prints no prompt before the first
		// reply; the prefix must not count as one.
		{"kept session", "master> ", "\nmaster> \nmaster> ", 2, false, true},
		{"kept session, short of prompts", "master> ", "\nmaster> ", 2, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			client, server := net.Pipe()
			defer client.Close()
			go func() {
				_, _ = io.Copy(io.Discard, io.LimitReader(server, 5)) // the request
				for i := 0; i < len(tt.out); i += 3 {
					if _, err := server.Write([]byte(tt.out[i:min(i+3, len(tt.out))])); err != nil {
						return
					}
				}
				if tt.close {
					server.Close()
				}
			}()
			s := &session{conn: client, prompt: tt.prompt}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			out, done, err := s.run(ctx, []byte("x\ny\nz"), tt.want, tt.prompt)
			if tt.name == "not a master" {
				if !errors.Is(err, ErrUnrecognizedReply) {
					t.Fatalf("err %v, want ErrUnrecognizedReply", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if done != tt.wantDone || out != tt.prompt+tt.out || s.prompt != "master> " {
				t.Errorf("done %v (want %v), prompt %q, out %q", done, tt.wantDone, s.prompt, out)
			}
		})
	}
}

// TestBufString: a reply that fills most of its buffer becomes a string
// over that buffer; a short one is copied, so that a substring kept from
// it does not hold the whole buffer.
func TestBufString(t *testing.T) {
	short := append(make([]byte, 0, 4096), "master> "...)
	s := bufString(short)
	if s != "master> " || unsafe.StringData(s) == &short[0] {
		t.Errorf("short reply %q not copied", s)
	}
	long := bytes.Repeat([]byte("x"), 3000)
	if s := bufString(long); s != string(long) || unsafe.StringData(s) != &long[0] {
		t.Error("long reply copied")
	}
}
