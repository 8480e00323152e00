package tcpdeny

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/haproxy-connect/haproxy-connect/authzgen"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/spoa"
)

// fakeRuntime answers each command (by its text) from replies, and
// records what was sent.
type fakeRuntime struct {
	replies map[string]runtime.Result
	sent    []string
}

func (f *fakeRuntime) Exec(_ context.Context, cmds ...runtime.Command) (runtime.Results, error) {
	rs := make(runtime.Results, len(cmds))
	for i, c := range cmds {
		f.sent = append(f.sent, c.String())
		r, ok := f.replies[c.String()]
		if len(f.replies) == 0 {
			return nil, fmt.Errorf("%w: dial: no such file", runtime.ErrMasterUnreachable)
		}
		if !ok {
			return nil, fmt.Errorf("unexpected command %q", c)
		}
		r.Command = c
		rs[i] = r
	}
	return rs, nil
}

// fakeJudge answers from a table by certificate, and counts calls.
type fakeJudge struct {
	verdicts map[[32]byte]spoa.RecheckResult
	calls    int
}

func (f *fakeJudge) Recheck(sum [32]byte) (string, spoa.RecheckResult, string) {
	f.calls++
	r, ok := f.verdicts[sum]
	if !ok {
		return "-", spoa.RecheckUnknown, "not known"
	}
	return fmt.Sprintf("spiffe://td/svc/%X", sum[:2]), r, "intention"
}

var (
	certA, certB, certC = sha256.Sum256([]byte("a")), sha256.Sum256([]byte("b")), sha256.Sum256([]byte("c"))
)

func key(sum [32]byte, addr string, port int) string { return fmt.Sprintf("%X-%s-%d", sum, addr, port) }

func table(lines ...string) string {
	s := "# table: authz_conns, type: string, size:200000, used:9\n"
	for i, l := range lines {
		s += fmt.Sprintf("0x%x: key=%s exp=0\n", 0x1000+i, l)
	}
	return s + "\n"
}

func sess(id, src, fe string) string {
	return id + ": proto=tcpv4 src=" + src + " fe=" + fe + " be=local_app srv=app ts=00 epoch=0 age=1s calls=2\n"
}

const (
	showProc  = "show proc"
	showTable = "@!100 show table authz_conns"
	showSess  = "@!100 show sess"
	// procs: the current worker 100 and an old one, 90, finishing its
	// connections after a reload.
	procOne = `#<PID>          <type>          <reloads>       <uptime>        <version>
1               master          0 [failed: 0]   0d00h01m52s     2.6.12-1+deb12u4
# workers
100             worker          0               0d00h00m01s     2.6.12-1+deb12u4
# programs
`
	procTwo = `#<PID>          <type>          <reloads>       <uptime>        <version>
1               master          1 [failed: 0]   0d00h01m52s     2.6.12-1+deb12u4
# workers
100             worker          0               0d00h00m01s     2.6.12-1+deb12u4
# old workers
90              worker          1               0d00h01m39s     2.6.12-1+deb12u4
# programs
`
)

// TestSweep: one pass of the sweeper, as the exact commands it sends and
// what it reports.
func TestSweep(t *testing.T) {
	ok := func(reply string) runtime.Result { return runtime.Result{Reply: reply} }
	fail := func(err error) runtime.Result { return runtime.Result{Err: err} }
	tests := []struct {
		name     string
		verdicts map[[32]byte]spoa.RecheckResult
		replies  map[string]runtime.Result
		want     Result
		sent     []string
		calls    int
	}{
		{
			name:    "http listener: no table",
			replies: map[string]runtime.Result{showTable: fail(runtime.ErrNoSuchTable)},
			sent:    []string{showTable},
		},
		{
			name:     "an old worker's connection is closed too",
			verdicts: map[[32]byte]spoa.RecheckResult{certA: spoa.RecheckDenied, certB: spoa.RecheckAllowed},
			replies: map[string]runtime.Result{
				showProc:                      ok(procTwo),
				showTable:                     ok(table(key(certB, "127.0.0.1", 2000) + " use=1")),
				"@!90 show table authz_conns": ok(table(key(certA, "127.0.0.1", 1000) + " use=1")),
				"@!90 show sess":              ok(sess("0x90", "127.0.0.1:1000", "public_listener")),
				"@!90 shutdown session 0x90":  ok(""),
			},
			want:  Result{Live: 2, Closed: 1},
			sent:  []string{showProc, showTable, "@!90 show table authz_conns", "@!90 show sess", "@!90 shutdown session 0x90"},
			calls: 2,
		},
		{
			name:     "all allowed: nothing more",
			verdicts: map[[32]byte]spoa.RecheckResult{certA: spoa.RecheckAllowed},
			replies: map[string]runtime.Result{showTable: ok(table(
				key(certA, "127.0.0.1", 1000)+" use=1", key(certA, "127.0.0.1", 1001)+" use=1"))},
			want:  Result{Live: 2},
			sent:  []string{showTable},
			calls: 1,
		},
		{
			name: "denied closed, allowed and unknown kept, ended skipped, other frontend untouched",
			verdicts: map[[32]byte]spoa.RecheckResult{
				certA: spoa.RecheckDenied, certB: spoa.RecheckAllowed,
			},
			replies: map[string]runtime.Result{
				showTable: ok(table(
					key(certA, "127.0.0.1", 1000)+" use=1",
					key(certA, "::1", 1001)+" use=1",
					key(certA, "127.0.0.1", 1002)+" use=0", // ended
					key(certB, "127.0.0.1", 2000)+" use=1",
					key(certC, "127.0.0.1", 3000)+" use=1",
				)),
				showSess: ok(sess("0xa0", "127.0.0.1:1000", "public_listener") +
					sess("0xa1", "::1:1001", "public_listener") +
					sess("0xa2", "127.0.0.1:1002", "public_listener") + // not live in the table
					sess("0xb0", "127.0.0.1:2000", "public_listener") +
					sess("0xc0", "127.0.0.1:1000", "up_db") + // same address, another frontend
					"0xd0: proto=unix_stream src=unix:1 fe=GLOBAL be=<NONE> srv=<none>\n" +
					"0xe0: proto=? ts=00 epoch=0 age=1s calls=1\n"), // an SPOE applet
				"@!100 shutdown session 0xa0": ok(""),
				"@!100 shutdown session 0xa1": fail(runtime.ErrNoSuchSession), // ended meanwhile
			},
			want:  Result{Live: 4, Closed: 1, Unknown: 1},
			sent:  []string{showTable, showSess, "@!100 shutdown session 0xa0", "@!100 shutdown session 0xa1"},
			calls: 3,
		},
		{
			name:     "undecided kept",
			verdicts: map[[32]byte]spoa.RecheckResult{certA: spoa.RecheckUndecided},
			replies:  map[string]runtime.Result{showTable: ok(table(key(certA, "10.0.0.1", 5) + " use=2"))},
			want:     Result{Live: 1, Undecided: 1},
			sent:     []string{showTable},
			calls:    1,
		},
		{
			name:     "denied but already gone from show sess",
			verdicts: map[[32]byte]spoa.RecheckResult{certA: spoa.RecheckDenied},
			replies: map[string]runtime.Result{
				showTable: ok(table(key(certA, "10.0.0.1", 5) + " use=1")),
				showSess:  ok(""),
			},
			want:  Result{Live: 1},
			sent:  []string{showTable, showSess},
			calls: 1,
		},
		{
			name:     "bad key skipped",
			verdicts: map[[32]byte]spoa.RecheckResult{certA: spoa.RecheckDenied},
			replies:  map[string]runtime.Result{showTable: ok(table("nonsense-1.2.3.4-5 use=1"))},
			sent:     []string{showTable},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rt := &fakeRuntime{replies: tc.replies}
			if _, ok := tc.replies[showProc]; !ok && len(tc.replies) > 0 {
				tc.replies[showProc] = runtime.Result{Reply: procOne}
				tc.sent = append([]string{showProc}, tc.sent...)
			}
			j := &fakeJudge{verdicts: tc.verdicts}
			s := New(rt, j, "public_listener", nil)
			got, err := s.Sweep(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("result (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tc.sent, rt.sent); diff != "" {
				t.Errorf("commands (-want +got):\n%s", diff)
			}
			if j.calls != tc.calls {
				t.Errorf("%d rechecks, want %d (one per certificate)", j.calls, tc.calls)
			}
			if st := s.Stats(); st.Closed != uint64(tc.want.Closed) {
				t.Errorf("closed counter %d, want %d", st.Closed, tc.want.Closed)
			}
		})
	}
}

// TestSweepUnreachable: a master that does not answer is an error Run
// retries.
func TestSweepUnreachable(t *testing.T) {
	rt := &fakeRuntime{replies: map[string]runtime.Result{}}
	s := New(rt, &fakeJudge{}, "public_listener", nil)
	if _, err := s.Sweep(context.Background()); !errors.Is(err, runtime.ErrMasterUnreachable) {
		t.Errorf("err = %v, want ErrMasterUnreachable", err)
	}
}

// TestSweepErrors: a reply that is an error, or a shutdown that fails
// otherwise than for a stream already gone, is the sweep's error.
func TestSweepErrors(t *testing.T) {
	for name, replies := range map[string]map[string]runtime.Result{
		"show proc garbage":    {showProc: {Reply: "what\n"}},
		"show table refused":   {showTable: {Err: runtime.ErrPermission}},
		"show table garbage":   {showTable: {Reply: "what\n"}},
		"show sess refused":    {showTable: {Reply: table(key(certA, "10.0.0.1", 5) + " use=1")}, showSess: {Err: runtime.ErrUnknownCommand}},
		"shutdown unexpected":  {showTable: {Reply: table(key(certA, "10.0.0.1", 5) + " use=1")}, showSess: {Reply: sess("0x1", "10.0.0.1:5", "public_listener")}, "@!100 shutdown session 0x1": {Err: runtime.ErrUnrecognizedReply}},
		"show sess unreadable": {showTable: {Reply: table(key(certA, "10.0.0.1", 5) + " use=1")}, showSess: {Reply: "src=10.0.0.1:5 fe=public_listener\n"}},
	} {
		t.Run(name, func(t *testing.T) {
			if _, ok := replies[showProc]; !ok {
				replies[showProc] = runtime.Result{Reply: procOne}
			}
			s := New(&fakeRuntime{replies: replies}, &fakeJudge{verdicts: map[[32]byte]spoa.RecheckResult{certA: spoa.RecheckDenied}}, "public_listener", nil)
			if _, err := s.Sweep(context.Background()); err == nil {
				t.Error("no error")
			}
		})
	}
}

// TestRunRetriesUnknown: after a kick, a sweep that leaves a connection
// unknown is repeated until it is decided.
func TestRunRetriesUnknown(t *testing.T) {
	rt := &syncRuntime{fakeRuntime: fakeRuntime{replies: map[string]runtime.Result{
		showProc:                     {Reply: procOne},
		showTable:                    {Reply: table(key(certA, "10.0.0.1", 5) + " use=1")},
		showSess:                     {Reply: sess("0x1", "10.0.0.1:5", "public_listener")},
		"@!100 shutdown session 0x1": {},
	}}, shut: make(chan struct{})}
	j := &lateJudge{known: make(chan struct{}), asked: make(chan struct{})}
	s := New(rt, j, "public_listener", nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go s.Run(ctx)
	s.Kick()
	// The first sweep finds the certificate unknown; then the agent
	// learns it, denied, and a retry closes the connection.
	<-j.asked
	close(j.known)
	select {
	case <-rt.shut:
	case <-time.After(10 * time.Second):
		t.Fatal("the connection was never closed")
	}
}

type syncRuntime struct {
	fakeRuntime
	shut chan struct{}
}

func (s *syncRuntime) Exec(ctx context.Context, cmds ...runtime.Command) (runtime.Results, error) {
	rs, err := s.fakeRuntime.Exec(ctx, cmds...)
	for _, c := range cmds {
		if c.String() == "@!100 shutdown session 0x1" {
			close(s.shut)
		}
	}
	return rs, err
}

// lateJudge does not know any certificate until known is closed, then
// denies all.
type lateJudge struct {
	known chan struct{}
	asked chan struct{}
	once  bool
}

func (l *lateJudge) Recheck([32]byte) (string, spoa.RecheckResult, string) {
	select {
	case <-l.known:
		return "spiffe://td/svc/a", spoa.RecheckDenied, "intention"
	default:
		if !l.once {
			l.once = true
			close(l.asked)
		}
		return "-", spoa.RecheckUnknown, ""
	}
}

// TestRunRetriesUnreachable: a kick that finds the master socket refusing
// (HAProxy re-executing for a reload) sweeps again once it answers.
func TestRunRetriesUnreachable(t *testing.T) {
	rt := &syncRuntime{fakeRuntime: fakeRuntime{replies: map[string]runtime.Result{
		showProc:                     {Reply: procOne},
		showTable:                    {Reply: table(key(certA, "10.0.0.1", 5) + " use=1")},
		showSess:                     {Reply: sess("0x1", "10.0.0.1:5", "public_listener")},
		"@!100 shutdown session 0x1": {},
	}}, shut: make(chan struct{})}
	s := New(&refusingOnce{Runtime: rt}, &fakeJudge{verdicts: map[[32]byte]spoa.RecheckResult{certA: spoa.RecheckDenied}}, "public_listener", nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go s.Run(ctx)
	s.Kick()
	select {
	case <-rt.shut:
	case <-time.After(10 * time.Second):
		t.Fatal("the connection was never closed")
	}
	if st := s.Stats(); st.Failures != 0 || st.Sweeps != 2 {
		t.Errorf("stats %+v, want 2 sweeps and no failure", st)
	}
}

// refusingOnce fails its first Exec as an unreachable master socket.
type refusingOnce struct {
	Runtime
	refused bool
}

func (r *refusingOnce) Exec(ctx context.Context, cmds ...runtime.Command) (runtime.Results, error) {
	if !r.refused {
		r.refused = true
		return nil, fmt.Errorf("%w: connection refused", runtime.ErrMasterUnreachable)
	}
	return r.Runtime.Exec(ctx, cmds...)
}

// TestJudgeDeadline: past the sweep's deadline no certificate is decided
// again; they count as undecided, for a retry.
func TestJudgeDeadline(t *testing.T) {
	conns := []authzgen.Conn{{Cert: certA}, {Cert: certB}}
	j := &fakeJudge{verdicts: map[[32]byte]spoa.RecheckResult{certA: spoa.RecheckDenied, certB: spoa.RecheckDenied}}
	deny, res := judge(conns, j, time.Now().Add(-time.Second))
	if len(deny) != 0 || res.Undecided != 2 || j.calls != 0 {
		t.Errorf("past the deadline: deny %v, %+v, %d calls; want nothing denied, 2 undecided, no call", deny, res, j.calls)
	}
}
