package runtime

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"syscall"
	"time"
)

// Master is an HAProxy master process in master-worker mode, started in
// the foreground so that its exit is seen.
type Master struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// StartMaster runs "haproxy -W -db -S <sock>,mode,600 -f <cfg>" and waits
// until the master socket answers "show proc" with a current worker, or ctx
// ends, or HAProxy exits (a bad configuration). Its output goes to out.
func StartMaster(ctx context.Context, bin, cfg, sock string, out io.Writer) (*Master, error) {
	if _, err := exec.LookPath(bin); err != nil {
		return nil, fmt.Errorf("haproxy binary %q: %w", bin, err)
	}
	_ = os.Remove(sock) // a stale socket from a previous run
	cmd := exec.Command(bin, "-W", "-db", "-S", sock+",mode,600", "-f", cfg)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start haproxy: %w", err)
	}
	m := &Master{cmd: cmd, done: make(chan struct{})}
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

// PID is the master's process id.
func (m *Master) PID() int {
	if m.cmd == nil || m.cmd.Process == nil {
		return 0
	}
	return m.cmd.Process.Pid
}

// Done is closed when the master has exited.
func (m *Master) Done() <-chan struct{} { return m.done }

// Err is the master's exit status, once Done is closed.
func (m *Master) Err() error { return m.err }

// Stop asks the master to stop its workers and exit (SIGUSR1 is a soft
// stop: workers finish their connections), waits up to grace, then kills
// the whole process group.
func (m *Master) Stop(grace time.Duration) error {
	select {
	case <-m.done:
		return nil
	default:
	}
	_ = m.cmd.Process.Signal(syscall.SIGUSR1)
	select {
	case <-m.done:
	case <-time.After(grace):
		_ = syscall.Kill(-m.cmd.Process.Pid, syscall.SIGKILL)
		<-m.done
	}
	var ee *exec.ExitError
	if m.err != nil && !errors.As(m.err, &ee) {
		return m.err
	}
	return nil
}
