package runtime

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Master is an HAProxy master process in master-worker mode: one this
// process started (StartMaster) or one found running (FindMaster).
//
// The master runs in a session of its own and with no parent-death signal,
// so it outlives the process that started it: a crashed controller leaves
// HAProxy serving its last state, and the next controller adopts it. Only
// Stop ends it. In 2.6, when the master dies its workers exit too (they
// watch a pipe to it), and when the current worker dies the master kills
// every process and exits ("exit-on-failure"; the "no-exit-on-failure"
// option has no effect in 2.6, whose master re-executes in wait mode
// without the configuration): either way Done is closed.
type Master struct {
	pid  int
	cmd  *exec.Cmd // nil for an adopted master
	done chan struct{}
	err  error
}

// PollInterval is how often the liveness of a master this process did not
// start is checked (it cannot wait for it); a child's exit is seen at once.
const PollInterval = 100 * time.Millisecond

// ErrNoMaster is FindMaster's answer when no master runs on the socket.
var ErrNoMaster = errors.New("no haproxy master running")

// StartMaster runs "haproxy -W -db -S <sock>,mode,600 -p <pidFile> -f
// <cfg>" and waits until the master socket answers "show proc" with a
// current worker, or ctx ends, or HAProxy exits (a bad configuration). Its
// output goes to out.
func StartMaster(ctx context.Context, bin, cfg, sock, pidFile string, out io.Writer) (*Master, error) {
	if _, err := exec.LookPath(bin); err != nil {
		return nil, fmt.Errorf("haproxy binary %q: %w", bin, err)
	}
	_ = os.Remove(sock) // a stale socket from a previous run
	cmd := exec.Command(bin, "-W", "-db", "-S", sock+",mode,600", "-p", pidFile, "-f", cfg)
	cmd.Stdout, cmd.Stderr = out, out
	// Its own session, and no Pdeathsig: HAProxy must not die with this
	// process (see Master). Terminal signals reach this process only,
	// which stops HAProxy itself.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	// A pipe carrying HAProxy's output outlives this process's interest in
	// it: do not wait for HAProxy to close it.
	cmd.WaitDelay = time.Second
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start haproxy: %w", err)
	}
	m := &Master{pid: cmd.Process.Pid, cmd: cmd, done: make(chan struct{})}
	go func() {
		m.err = cmd.Wait()
		close(m.done)
	}()
	c := New(sock, nil, WithTimeout(2*time.Second))
	defer c.Close()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-m.done:
			return nil, fmt.Errorf("haproxy exited at start: %v", m.err)
		case <-ctx.Done():
			m.Stop(2 * time.Second)
			return nil, fmt.Errorf("haproxy not ready: %w", ctx.Err())
		case <-tick.C:
		}
		if pl, err := c.Procs(ctx); err == nil {
			if _, ok := pl.Current(); ok {
				return m, nil
			}
		}
	}
}

// FindMaster looks for a running master to adopt: the PID in pidFile must
// be a live HAProxy process started on sock, and the master socket must
// answer "show proc" with that PID as master (it is asked until ctx ends).
// It returns ErrNoMaster when there is none (no pid file, a dead PID, a PID
// reused by another program); any other error means a master may be running that cannot be adopted
// (for example one that does not answer its socket), and starting a second
// one beside it would bind the same ports.
func FindMaster(ctx context.Context, sock, pidFile string) (*Master, ProcList, error) {
	pid, err := ReadPID(pidFile)
	if err != nil {
		return nil, ProcList{}, err
	}
	if !masterAlive(pid, sock) {
		return nil, ProcList{}, ErrNoMaster
	}
	c := New(sock, nil, WithTimeout(2*time.Second))
	defer c.Close()
	// The socket refuses connections while the master re-executes for a
	// reload (its previous controller may have died during one): ask
	// again until ctx ends.
	var pl ProcList
	for {
		if pl, err = c.Procs(ctx); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, ProcList{}, fmt.Errorf("haproxy master %d runs but its socket %s does not answer: %w", pid, sock, err)
		case <-time.After(50 * time.Millisecond):
		}
		if !masterAlive(pid, sock) {
			return nil, ProcList{}, ErrNoMaster
		}
	}
	if pl.Master.PID != pid {
		return nil, ProcList{}, fmt.Errorf("haproxy master socket %s answers for PID %d, the pid file says %d", sock, pl.Master.PID, pid)
	}
	m := &Master{pid: pid, done: make(chan struct{})}
	go m.watch()
	return m, pl, nil
}

// ReadPID reads the master's PID from pidFile (HAProxy's "-p"). A missing
// file, or one that does not hold a PID above 1, is ErrNoMaster.
func ReadPID(pidFile string) (int, error) {
	b, err := os.ReadFile(pidFile)
	if errors.Is(err, os.ErrNotExist) {
		return 0, ErrNoMaster
	}
	if err != nil {
		return 0, fmt.Errorf("haproxy pid file: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid < 2 {
		return 0, fmt.Errorf("%w: pid file %s holds %q", ErrNoMaster, pidFile, truncate(string(b), 40))
	}
	return pid, nil
}

// watch closes done once the adopted master is gone.
func (m *Master) watch() {
	t := time.NewTicker(PollInterval)
	defer t.Stop()
	for range t.C {
		if !ProcessAlive(m.pid) {
			m.err = fmt.Errorf("haproxy master %d exited", m.pid)
			close(m.done)
			return
		}
	}
}

// ProcessAlive reports whether pid runs: it exists and is not a zombie (an
// adopted master is not our child, and whoever inherited it may not reap
// it, so signal 0 alone would still find it after it died).
func ProcessAlive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// "pid (comm) S ...": the state follows the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	switch b[i+2] {
	case 'Z', 'X', 'x':
		return false
	}
	return true
}

// masterAlive reports whether pid is a live HAProxy master started on sock:
// its command line names the socket (a PID reused by another program does
// not).
func masterAlive(pid int, sock string) bool {
	if !ProcessAlive(pid) {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	for _, arg := range bytes.Split(b, []byte{0}) {
		if s := string(arg); s == sock || strings.HasPrefix(s, sock+",") {
			return true
		}
	}
	return false
}

// PID is the master's process id.
func (m *Master) PID() int { return m.pid }

// Adopted reports whether the master was found running rather than
// started by this process.
func (m *Master) Adopted() bool { return m.cmd == nil }

// Done is closed when the master has exited.
func (m *Master) Done() <-chan struct{} { return m.done }

// Err is the master's exit status, once Done is closed.
func (m *Master) Err() error { return m.err }

// Stop asks the master to stop its workers and exit (SIGUSR1 is a soft
// stop: listeners close at once, workers finish their connections), waits
// up to grace, then kills the whole process group (the master leads it).
func (m *Master) Stop(grace time.Duration) error {
	select {
	case <-m.done:
		return nil
	default:
	}
	if m.pid < 2 {
		// kill(0) and kill(-1) signal whole process groups: never.
		return fmt.Errorf("haproxy master PID %d is not a process to stop", m.pid)
	}
	_ = syscall.Kill(m.pid, syscall.SIGUSR1)
	select {
	case <-m.done:
	case <-time.After(grace):
		_ = syscall.Kill(-m.pid, syscall.SIGKILL)
		_ = syscall.Kill(m.pid, syscall.SIGKILL)
		<-m.done
	}
	var ee *exec.ExitError
	if m.err != nil && !errors.As(m.err, &ee) && m.cmd != nil {
		return m.err
	}
	return nil
}

// Kill ends a master that cannot be adopted, and its workers, at once.
func Kill(pid int) {
	if pid < 2 {
		return // kill(0) and kill(-1) signal whole process groups
	}
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	_ = syscall.Kill(pid, syscall.SIGKILL)
}
