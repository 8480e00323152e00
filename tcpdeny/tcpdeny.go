// Package tcpdeny closes the established connections of a tcp public
// listener whose source the intentions now deny. HAProxy cannot run its
// tcp-request rules again on a connection it accepted, so on each
// intentions change a Sweeper reads the listener's connections table
// (authzgen.ConnTable: client certificate SHA-256 and client address per
// live connection), asks the agent to decide each certificate again
// (spoa.Authorizer.Recheck), finds the streams of the denied ones in
// "show sess" by client address, and shuts them with "shutdown session".
// It sends only runtime commands of package runtime, whose arguments are
// a table name and stream ids: no identity reaches a command line.
package tcpdeny

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/authzgen"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/spoa"
)

// Runtime sends runtime commands (runtime.Client).
type Runtime interface {
	Exec(ctx context.Context, cmds ...runtime.Command) (runtime.Results, error)
}

// Judge decides again for a client certificate, by the SHA-256 of its DER
// (spoa.Authorizer).
type Judge interface {
	Recheck(sum [32]byte) (source string, r spoa.RecheckResult, reason string)
}

const (
	// RetryEvery spaces the sweeps after one that left connections not
	// decided: a connection whose first decision is in flight during a
	// sweep is recorded in the table before the agent knows its
	// certificate, and a Consul failure can pass.
	RetryEvery = 250 * time.Millisecond
	// RetryFor is how long after a kick sweeps are retried.
	RetryFor = 2 * time.Second
	// sweepTimeout bounds one sweep's runtime commands.
	sweepTimeout = 5 * time.Second
)

// Sweeper closes denied connections on the frontend it is given. Kick it
// after each intentions change; Run does the work. Safe for concurrent
// use.
type Sweeper struct {
	rt       Runtime
	judge    Judge
	log      *zap.Logger
	frontend string
	kick     chan struct{}

	closed, unknown, undecided, sweeps, failures atomic.Uint64
}

// New returns a Sweeper for the public listener frontend (its proxy
// name), reading and closing its connections through rt, and deciding
// with judge.
func New(rt Runtime, judge Judge, frontend string, log *zap.Logger) *Sweeper {
	if log == nil {
		log = zap.NewNop()
	}
	return &Sweeper{rt: rt, judge: judge, frontend: frontend, log: log, kick: make(chan struct{}, 1)}
}

// Kick asks for a sweep (one for any number of kicks before it starts).
// It does not block.
func (s *Sweeper) Kick() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// Run sweeps after each Kick until ctx ends. A sweep that leaves
// connections not decided (unknown or undecided certificates) or fails is
// retried every RetryEvery, for RetryFor after the kick.
func (s *Sweeper) Run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.kick:
		}
		until := time.Now().Add(RetryFor)
		for {
			res, err := s.Sweep(ctx)
			// The master refuses connections while it re-executes for
			// a reload, and there is none before HAProxy starts: retried
			// without a warning.
			unreachable := errors.Is(err, runtime.ErrMasterUnreachable)
			if err != nil && !unreachable {
				s.failures.Add(1)
				s.log.Warn("tcp connection sweep failed", zap.Error(err))
			}
			if err == nil && res.Unknown == 0 && res.Undecided == 0 {
				break
			}
			if time.Now().Add(RetryEvery).After(until) {
				switch {
				case err == nil:
					// Counted once per kick: what stays open.
					s.unknown.Add(uint64(res.Unknown))
					s.undecided.Add(uint64(res.Undecided))
					s.log.Warn("tcp connections left open: their source could not be decided again",
						zap.Int("unknown_certificate", res.Unknown), zap.Int("undecided", res.Undecided))
				case unreachable:
					s.failures.Add(1)
					s.log.Info("tcp connections not swept: the master socket did not answer", zap.Error(err))
				}
				break
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(RetryEvery):
			}
		}
	}
}

// Result is what one sweep found and did.
type Result struct {
	// Live is the number of live connections in the table.
	Live int
	// Closed is the number of streams shut for a deny.
	Closed int
	// Unknown and Undecided count live connections whose certificate the
	// agent does not know, or could not decide for now.
	Unknown, Undecided int
}

// victim is a live connection whose source is denied now.
type victim struct {
	source, reason string
}

// Sweep makes one pass over every worker: the current one and the old
// ones still finishing their connections after a reload (each has its own
// streams and connections table). In each it reads the connections table,
// decides each certificate again, and shuts the streams of the denied ones.
// A worker without the table (an http listener) is nothing to do. A
// master that does not answer (HAProxy not started yet, or re-executing
// for a reload) is runtime.ErrMasterUnreachable, which Run retries
// quietly.
func (s *Sweeper) Sweep(ctx context.Context) (Result, error) {
	ctx, cancel := context.WithTimeout(ctx, sweepTimeout)
	defer cancel()
	s.sweeps.Add(1)
	reply, err := s.do(ctx, runtime.ShowProc())
	if err != nil {
		return Result{}, err
	}
	procs, err := runtime.ParseProcList(reply)
	if err != nil {
		return Result{}, err
	}
	var total Result
	var errs []error
	for _, w := range procs.Workers {
		if w.Type != "worker" {
			continue
		}
		r, err := s.sweepWorker(ctx, w.PID)
		total.Live += r.Live
		total.Closed += r.Closed
		total.Unknown += r.Unknown
		total.Undecided += r.Undecided
		if err != nil {
			errs = append(errs, fmt.Errorf("worker %d: %w", w.PID, err))
		}
	}
	return total, errors.Join(errs...)
}

// sweepWorker is Sweep in the worker pid.
func (s *Sweeper) sweepWorker(ctx context.Context, pid int) (Result, error) {
	show, err := runtime.ShowTable(authzgen.ConnTable)
	if err != nil {
		return Result{}, err
	}
	reply, err := s.doOn(ctx, pid, show)
	if errors.Is(err, runtime.ErrNoSuchTable) || errors.Is(err, runtime.ErrNoSuchProcess) {
		// An http listener has no table; a worker may exit meanwhile.
		return Result{}, nil
	}
	if err != nil {
		return Result{}, err
	}
	entries, err := runtime.ParseTable(reply)
	if err != nil {
		return Result{}, err
	}
	conns := s.liveConns(entries)
	deadline, _ := ctx.Deadline()
	deny, res := judge(conns, s.judge, deadline)
	if len(deny) == 0 {
		return res, nil
	}
	reply, err = s.doOn(ctx, pid, runtime.ShowSess())
	if err != nil {
		return res, err
	}
	sessions, err := runtime.ParseSessions(reply)
	if err != nil {
		return res, err
	}
	targets := selectStreams(deny, sessions, s.frontend)
	if len(targets) == 0 {
		return res, nil
	}
	cmds := make([]runtime.Command, 0, len(targets))
	for _, t := range targets {
		c, err := runtime.ShutdownSession(t.id)
		if err == nil {
			c, err = c.OnWorker(pid)
		}
		if err != nil {
			return res, err // ParseSessions returns only ids it accepts
		}
		cmds = append(cmds, c)
	}
	rs, err := s.rt.Exec(ctx, cmds...)
	if err != nil {
		return res, fmt.Errorf("shutdown sessions: %w", err)
	}
	var errs []error
	for i, r := range rs {
		t := targets[i]
		switch {
		case r.Err == nil:
			res.Closed++
			s.closed.Add(1)
			s.log.Info("tcp connection closed: its source is denied now",
				zap.String("source", t.source), zap.Stringer("client", t.src), zap.String("reason", t.reason),
				zap.Int("worker_pid", pid), zap.String("stream", t.id))
		case errors.Is(r.Err, runtime.ErrNoSuchSession):
			// It ended between "show sess" and now.
		default:
			errs = append(errs, r.Err)
		}
	}
	return res, errors.Join(errs...)
}

// doOn is do in the worker pid.
func (s *Sweeper) doOn(ctx context.Context, pid int, c runtime.Command) (string, error) {
	c, err := c.OnWorker(pid)
	if err != nil {
		return "", err
	}
	return s.do(ctx, c)
}

// do sends one command and returns its reply or its error.
func (s *Sweeper) do(ctx context.Context, c runtime.Command) (string, error) {
	rs, err := s.rt.Exec(ctx, c)
	if err != nil {
		return "", err
	}
	if len(rs) != 1 {
		return "", fmt.Errorf("%s: %d results for one command", c, len(rs))
	}
	return rs[0].Reply, rs[0].Err
}

// liveConns parses the keys of the entries streams track now. A key that
// does not parse is logged and skipped: it is HAProxy's, from a rule this
// project renders, so it means the rule and this code disagree.
func (s *Sweeper) liveConns(entries []runtime.TableEntry) []authzgen.Conn {
	var out []authzgen.Conn
	for _, e := range entries {
		if e.Use <= 0 {
			continue
		}
		c, err := authzgen.ParseConnKey(e.Key)
		if err != nil {
			s.log.Warn("connections table entry not understood; that connection is not checked", zap.Error(err))
			continue
		}
		out = append(out, c)
	}
	return out
}

// judge decides each connection's certificate again (once per
// certificate) and returns the denied connections by client address.
// Past deadline (each decision can wait for Consul up to the agent's
// timeout) the certificates left count as undecided, for the next retry.
func judge(conns []authzgen.Conn, j Judge, deadline time.Time) (map[netip.AddrPort]victim, Result) {
	type verdict struct {
		victim
		r spoa.RecheckResult
	}
	seen := map[[32]byte]verdict{}
	deny := map[netip.AddrPort]victim{}
	res := Result{Live: len(conns)}
	for _, c := range conns {
		v, ok := seen[c.Cert]
		if !ok {
			v.r = spoa.RecheckUndecided
			if deadline.IsZero() || time.Now().Before(deadline) {
				v.source, v.r, v.reason = j.Recheck(c.Cert)
			}
			seen[c.Cert] = v
		}
		switch v.r {
		case spoa.RecheckDenied:
			deny[c.Src] = v.victim
		case spoa.RecheckUnknown:
			res.Unknown++
		case spoa.RecheckUndecided:
			res.Undecided++
		}
	}
	return deny, res
}

// stream is a stream to shut.
type stream struct {
	id  string
	src netip.AddrPort
	victim
}

// selectStreams returns the streams of frontend whose client address is
// that of a denied connection. Client address and port identify a live
// connection to one listener; the connection may have ended and its
// address been reused between the table and "show sess" (milliseconds),
// which would close the newcomer, who reconnects.
func selectStreams(deny map[netip.AddrPort]victim, sessions []runtime.Session, frontend string) []stream {
	var out []stream
	for _, ss := range sessions {
		if ss.Frontend != frontend || !ss.Src.IsValid() {
			continue
		}
		if v, ok := deny[ss.Src]; ok {
			out = append(out, stream{id: ss.ID, src: ss.Src, victim: v})
		}
	}
	return out
}

// Stats are counters since New, for metrics.
type Stats struct {
	// Closed counts connections shut because their source is denied.
	Closed uint64
	// Unknown and Undecided count connections left open after a kick's
	// last retry: the agent did not know their certificate, or could not
	// decide.
	Unknown, Undecided uint64
	// Sweeps counts passes; Failures those that failed.
	Sweeps, Failures uint64
}

// Stats returns the counters.
func (s *Sweeper) Stats() Stats {
	return Stats{Closed: s.closed.Load(), Unknown: s.unknown.Load(), Undecided: s.undecided.Load(),
		Sweeps: s.sweeps.Load(), Failures: s.failures.Load()}
}
