package runtime

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// Replies as HAProxy 2.6.12 printed them (by hand, with socat).
const (
	showSess2612 = `0x55b5677c42f0: proto=tcpv4 src=127.0.0.1:40932 fe=public_listener be=local_app srv=app ts=00 epoch=0 age=1s calls=2 rate=2 cpu=0 lat=0 rq[f=848202h,i=0,an=00h,rx=59m59s,wx=,ax=] rp[f=80048202h,i=0,an=00h,rx=59m59s,wx=,ax=] scf=[8,0h,fd=14] scb=[8,1h,fd=15] exp=4s rc=0 c_exp=
0x55b5678dac50: proto=tcpv6 src=::1:33708 fe=public_listener be=local_app srv=app ts=00 epoch=0 age=1s calls=2 rate=2 cpu=0 lat=0 rq[f=848202h,i=0,an=00h,rx=59m59s,wx=,ax=] rp[f=80048202h,i=0,an=00h,rx=59m59s,wx=,ax=] scf=[8,0h,fd=13] scb=[8,1h,fd=16] exp=4s rc=0 c_exp=
0x55b5678db2f0: proto=unix_stream src=unix:1 fe=GLOBAL be=<NONE> srv=<none> ts=00 epoch=0 age=0s calls=1 rate=1 cpu=0 lat=0 rq[f=c08002h,i=0,an=00h,rx=10s,wx=,ax=] rp[f=80008002h,i=0,an=00h,rx=,wx=,ax=] scf=[8,0h,fd=17] scb=[8,1h,fd=-1] exp=9s rc=0 c_exp=

`
	showTable2612 = `# table: authz_conns, type: string, size:1000, used:2
0x55b5678db040: key=6AEE2B18D72B2CF0D80AF2AFB6E5D3B907480671DF32F2F55BB89A023CD26D43-::1-33708 use=1 exp=0
0x7f0f20050a10: key=C8816B7FC7A28D2D7F58697EB7BB1B8C98D0A5B1E80778C24782AC536432D7ED-127.0.0.1-48906 use=0 exp=1025

`
)

func TestParseSessions(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     []Session
		err      error
	}{
		{name: "2.6.12", in: showSess2612, want: []Session{
			{ID: "0x55b5677c42f0", Src: netip.MustParseAddrPort("127.0.0.1:40932"), Frontend: "public_listener"},
			{ID: "0x55b5678dac50", Src: netip.MustParseAddrPort("[::1]:33708"), Frontend: "public_listener"},
			{ID: "0x55b5678db2f0", Frontend: "GLOBAL"},
		}},
		{name: "empty", in: "\n"},
		{name: "v4-mapped is unmapped", in: "0x1: proto=tcpv6 src=::ffff:10.0.0.1:5 fe=f\n",
			want: []Session{{ID: "0x1", Src: netip.MustParseAddrPort("10.0.0.1:5"), Frontend: "f"}}},
		{name: "zone is no address", in: "0x1: src=fe80::1%eth0:5 fe=f\n", want: []Session{{ID: "0x1", Frontend: "f"}}},
		{name: "port 0 is no address", in: "0x1: src=10.0.0.1:0 fe=f\n", want: []Session{{ID: "0x1", Frontend: "f"}}},
		{name: "port with sign is no address", in: "0x1: src=10.0.0.1:+5 fe=f\n", want: []Session{{ID: "0x1", Frontend: "f"}}},
		{name: "first src wins", in: "0x1: src=10.0.0.1:5 fe=f src=10.0.0.2:6\n",
			want: []Session{{ID: "0x1", Src: netip.MustParseAddrPort("10.0.0.1:5"), Frontend: "f"}}},
		{name: "error sentence", in: "Permission denied\n", err: ErrUnrecognizedReply},
		{name: "no id", in: "src=10.0.0.1:5 fe=f\n", err: ErrUnrecognizedReply},
		{name: "id without colon", in: "0x1 src=10.0.0.1:5 fe=f\n", err: ErrUnrecognizedReply},
		{name: "id not hex", in: "0xZZ: src=10.0.0.1:5 fe=f\n", err: ErrUnrecognizedReply},
		{name: "spoe applet", in: "0x560ad761f3d0: proto=? ts=00 epoch=0 age=1s calls=1 rate=1 cpu=0 lat=0 rq[f=848202h,i=0,an=00h,rx=,wx=,ax=] rp[f=80048202h,i=0,an=00h,rx=2m59s,wx=,ax=] scf=[8,40h,fd=-1] scb=[8,1h,fd=14] exp=2m59s rc=0 c_exp=\n",
			want: []Session{{ID: "0x560ad761f3d0"}}},
		{name: "no frontend", in: "0x1: src=10.0.0.1:5\n", want: []Session{{ID: "0x1", Src: netip.MustParseAddrPort("10.0.0.1:5")}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseSessions(tc.in)
			if !errors.Is(err, tc.err) {
				t.Fatalf("err = %v, want %v", err, tc.err)
			}
			if diff := cmp.Diff(tc.want, got, cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); diff != "" {
				t.Errorf("sessions (-want +got):\n%s", diff)
			}
		})
	}
}

func TestParseTable(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     []TableEntry
		err      error
	}{
		{name: "2.6.12", in: showTable2612, want: []TableEntry{
			{Key: "6AEE2B18D72B2CF0D80AF2AFB6E5D3B907480671DF32F2F55BB89A023CD26D43-::1-33708", Use: 1},
			{Key: "C8816B7FC7A28D2D7F58697EB7BB1B8C98D0A5B1E80778C24782AC536432D7ED-127.0.0.1-48906", Use: 0},
		}},
		{name: "empty table", in: "# table: authz_conns, type: string, size:1000, used:0\n\n"},
		{name: "data after exp", in: "# table: t, type: binary, size:100, used:1\n0x5: key=0715A1 use=2 exp=590332 gpt0=4\n",
			want: []TableEntry{{Key: "0715A1", Use: 2}}},
		{name: "no header", in: "0x5: key=k use=1 exp=0\n", err: ErrUnrecognizedReply},
		{name: "no use", in: "# table: t\n0x5: key=k exp=0\n", err: ErrUnrecognizedReply},
		{name: "negative use", in: "# table: t\n0x5: key=k use=-1 exp=0\n", err: ErrUnrecognizedReply},
		{name: "empty key", in: "# table: t\n0x5: key= use=1 exp=0\n", err: ErrUnrecognizedReply},
		{name: "error sentence", in: "No such table\n", err: ErrUnrecognizedReply},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseTable(tc.in)
			if !errors.Is(err, tc.err) {
				t.Fatalf("err = %v, want %v", err, tc.err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("entries (-want +got):\n%s", diff)
			}
		})
	}
}

// The replies of the three commands are classified as HAProxy 2.6.12
// gives them.
func TestSessionCommandReplies(t *testing.T) {
	show, _ := ShowTable("authz_conns")
	shut, err := ShutdownSession("0x55b5677c42f0")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		cmd   Command
		reply string
		err   error
	}{
		{ShowSess(), showSess2612, nil},
		{ShowSess(), "", nil},
		{ShowSess(), "Permission denied\n", ErrPermission},
		{show, showTable2612, nil},
		{show, "No such table\n\n", ErrNoSuchTable},
		{shut, "\n", nil},
		{shut, "No such session (use 'show sess').\n\n", ErrNoSuchSession},
		{shut, "Session pointer expected (use 'show sess').\n\n", ErrInvalidArgument},
		{shut, "Done.\n", ErrUnrecognizedReply},
	} {
		if err := classify(tc.cmd, tc.reply); !errors.Is(err, tc.err) {
			t.Errorf("%s: reply %q: err = %v, want %v", tc.cmd, tc.reply, err, tc.err)
		}
	}
	for _, bad := range []string{"", "0x", "55b5677c42f0", "0x55B5677C42F0", "0x1 ", "0x1;@1 reload", "0x12345678901234567"} {
		if c, err := ShutdownSession(bad); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("ShutdownSession(%q) = %q, %v; want ErrInvalidArgument", bad, c, err)
		}
	}
	if c, err := ShowTable("t x"); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("ShowTable(%q) = %q, %v; want ErrInvalidArgument", "t x", c, err)
	}
}

// FuzzParseSessions: whatever "show sess" and "show table" replies hold,
// the parsers do not panic, every stream id they return is one
// ShutdownSession accepts, and every key is one line.
func FuzzParseSessions(f *testing.F) {
	f.Add(showSess2612)
	f.Add(showTable2612)
	for _, h := range hostile {
		f.Add("0x1: src=" + h + ":1 fe=" + h + "\n")
		f.Add("# table: t\n0x1: key=" + h + " use=1 exp=0\n")
	}
	f.Fuzz(func(t *testing.T, reply string) {
		ss, err := ParseSessions(reply)
		if err == nil {
			for _, s := range ss {
				if _, err := ShutdownSession(s.ID); err != nil {
					t.Fatalf("parsed id %q refused: %v", s.ID, err)
				}
				if s.Src.IsValid() && (s.Src.Addr().Zone() != "" || s.Src.Port() == 0) {
					t.Fatalf("parsed address %v", s.Src)
				}
			}
		}
		es, err := ParseTable(reply)
		if err == nil {
			for _, e := range es {
				if e.Key == "" || strings.ContainsAny(e.Key, "\n") || e.Use < 0 {
					t.Fatalf("parsed entry %+v", e)
				}
			}
		}
	})
}

func TestOnWorker(t *testing.T) {
	c, err := ShowSess().OnWorker(31511)
	if err != nil || c.String() != "@!31511 show sess" {
		t.Errorf("OnWorker = %q, %v", c, err)
	}
	for _, pid := range []int{0, -1, 1<<30 + 1} {
		if _, err := ShowSess().OnWorker(pid); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("OnWorker(%d): %v, want ErrInvalidArgument", pid, err)
		}
	}
	if _, err := ShowProc().OnWorker(1); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("a master command readdressed: %v", err)
	}
}
