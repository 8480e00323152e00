package runtime

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	cnruntime "github.com/haproxytech/client-native/v6/runtime"
	"go.uber.org/zap"
)

// Process is one line of the master's "show proc".
type Process struct {
	PID     int
	Type    string // master, worker, or a program name
	Reloads int    // for the master: reloads so far; for a worker: reloads it has lived through (0 = current)
	Failed  int    // master only: the "[failed: N]" counter
	Version string
}

// ProcList is the parsed "show proc".
type ProcList struct {
	Master Process
	// Workers are the current worker and the old ones still finishing
	// their connections after a reload (reloads 1 or more).
	Workers []Process
}

// Current is the current worker: the one that has lived through no reload.
// ok is false while none is (during a reload, or after a failed one that
// kept the old worker).
func (p ProcList) Current() (Process, bool) {
	for _, w := range p.Workers {
		if w.Reloads == 0 {
			return w, true
		}
	}
	return Process{}, false
}

// Version is the master's HAProxy version, parsed by client-native.
func (p ProcList) Version() (*cnruntime.HAProxyVersion, error) {
	v := &cnruntime.HAProxyVersion{}
	if err := v.ParseHAProxyVersion(p.Master.Version); err != nil && v.Major == 0 {
		return nil, fmt.Errorf("parse haproxy version %q: %w", p.Master.Version, err)
	}
	return v, nil
}

// AtLeast reports whether the master runs HAProxy major.minor or later.
func (p ProcList) AtLeast(major, minor int) bool {
	v, err := p.Version()
	if err != nil {
		return false
	}
	return cnruntime.IsBiggerOrEqual(&cnruntime.HAProxyVersion{Major: major, Minor: minor}, v)
}

// ParseProcList parses the master's "show proc" output. Old workers, which
// 2.6 lists in a section of their own (src/mworker.c), are workers too.
//
//	#<PID>          <type>          <reloads>       <uptime>        <version>
//	2596            master          2 [failed: 1]   0d00h01m52s     2.6.12-1+deb12u4
//	# workers
//	7418            worker          0               0d00h00m01s     2.6.12-1+deb12u4
//	# old workers
//	3555            worker          1               0d00h01m39s     2.6.12-1+deb12u4
func ParseProcList(text string) (ProcList, error) {
	var pl ProcList
	section := "master"
	sawMaster := false
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "":
			continue
		case strings.HasPrefix(line, "#<PID>"):
			continue
		case strings.HasPrefix(line, "# "):
			section = strings.TrimPrefix(line, "# ")
			continue
		}
		f := strings.Fields(line)
		if len(f) < 4 {
			return ProcList{}, fmt.Errorf("%w: show proc line %q", ErrUnrecognizedReply, line)
		}
		pid, err := strconv.Atoi(f[0])
		if err != nil {
			return ProcList{}, fmt.Errorf("%w: show proc pid in %q", ErrUnrecognizedReply, line)
		}
		reloads, err := strconv.Atoi(f[2])
		if err != nil {
			return ProcList{}, fmt.Errorf("%w: show proc reloads in %q", ErrUnrecognizedReply, line)
		}
		p := Process{PID: pid, Type: f[1], Reloads: reloads, Version: f[len(f)-1]}
		switch {
		case section == "master" && f[1] == "master":
			// "2 [failed: 1]" splits into "2", "[failed:", "1]".
			if len(f) >= 5 && f[3] == "[failed:" {
				n, err := strconv.Atoi(strings.TrimSuffix(f[4], "]"))
				if err != nil {
					return ProcList{}, fmt.Errorf("%w: show proc failed count in %q", ErrUnrecognizedReply, line)
				}
				p.Failed = n
			}
			pl.Master = p
			sawMaster = true
		case section == "workers", section == "old workers":
			pl.Workers = append(pl.Workers, p)
		}
	}
	if !sawMaster {
		return ProcList{}, fmt.Errorf("%w: show proc has no master line", ErrUnrecognizedReply)
	}
	return pl, nil
}

// Procs runs "show proc" on the master.
func (c *Client) Procs(ctx context.Context) (ProcList, error) {
	reply, err := c.Do(ctx, ShowProc())
	if err != nil {
		return ProcList{}, err
	}
	return ParseProcList(reply)
}

// Reload asks the master to reload and waits until the reload is confirmed
// or the context ends. reason is logged.
//
// HAProxy 2.6 answers "reload" with nothing and drops the connection; the
// socket refuses connections while the master re-executes. So the outcome is
// read from "show proc": the master's reload counter has moved and a new
// worker (reloads 0, a PID not seen before) exists; a failed reload moves the
// counter, sets "[failed: N]" and keeps the old worker. 2.7+ prints
// "Success=1" or "Success=0" followed by the startup logs; both are handled.
func (c *Client) Reload(ctx context.Context, reason string) (ProcList, error) {
	before, err := c.Procs(ctx)
	if err != nil {
		return ProcList{}, fmt.Errorf("reload: before: %w", err)
	}
	c.log.Info("reloading haproxy", zap.String("reason", reason), zap.String("socat", c.SocatLine(Command{Line: "reload"})))
	c.dropIdle() // the master closes them when it re-executes
	reply, err := c.rawMaster(ctx, "reload\n")
	if err != nil {
		return ProcList{}, fmt.Errorf("reload: %w", err)
	}
	reply = strings.TrimSpace(reply)
	switch {
	case reply == "", strings.HasPrefix(reply, "Success=1"):
	case strings.HasPrefix(reply, "Success=0"):
		return ProcList{}, fmt.Errorf("%w: %s", ErrReloadFailed, truncate(reply, 2000))
	default:
		return ProcList{}, &ReplyError{Command: "reload", Reply: reply, Err: ErrUnrecognizedReply}
	}
	seen := map[int]bool{}
	for _, w := range before.Workers {
		seen[w.PID] = true
	}
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		select {
		case <-ctx.Done():
			return ProcList{}, fmt.Errorf("%w (%s): last: %v", ErrReloadUnconfirmed, reason, last)
		case <-tick.C:
		}
		now, err := c.Procs(ctx)
		if err != nil {
			last = err // refused while the master re-executes
			continue
		}
		if now.Master.Reloads <= before.Master.Reloads {
			last = fmt.Errorf("master reload counter still %d", now.Master.Reloads)
			continue
		}
		if cur, ok := now.Current(); ok && !seen[cur.PID] {
			c.log.Info("haproxy reloaded", zap.String("reason", reason), zap.Int("worker_pid", cur.PID), zap.Int("old_workers", len(now.Workers)-1))
			return now, nil
		}
		if now.Master.Failed > 0 {
			return now, fmt.Errorf("%w (%s): master reports [failed: %d], the old worker keeps serving", ErrReloadFailed, reason, now.Master.Failed)
		}
		last = errors.New("no new worker yet")
	}
}

// rawMaster sends one line to the master outside prompt mode and reads to EOF.
func (c *Client) rawMaster(ctx context.Context, line string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.sock)
	if err != nil {
		return "", fmt.Errorf("%w: %v", ErrMasterUnreachable, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if _, err := io.WriteString(conn, line); err != nil {
		return "", fmt.Errorf("write master socket: %w", err)
	}
	out, err := io.ReadAll(conn)
	if err != nil && !isReset(err) {
		return "", fmt.Errorf("read master socket: %w", err)
	}
	return string(out), nil
}

func isReset(err error) bool {
	var ne *net.OpError
	return errors.As(err, &ne) && strings.Contains(ne.Err.Error(), "reset")
}
