package testenv

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// stopGrace is how long a process gets after SIGTERM before its whole
// process group is killed.
const stopGrace = 5 * time.Second

// syncBuffer is a bytes.Buffer safe for concurrent writes and reads.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// process is a child started in its own process group, with stdout and
// stderr captured into one buffer.
type process struct {
	name    string
	cmd     *exec.Cmd
	pid     int
	out     syncBuffer
	outDone chan struct{} // closed when every writer of the output pipe is gone
	done    chan struct{} // closed when the process has exited and been reaped
	waitErr error         // valid once done is closed

	stopOnce sync.Once
}

// startProcess starts bin with args in dir. The output goes through an
// os.Pipe read by our own goroutine, so reaping the process never waits for
// descendants that still hold the pipe.
func startProcess(name, bin, dir string, args ...string) (*process, error) {
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("create output pipe for %s: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Stdout = pw
	cmd.Stderr = pw
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		pr.Close()
		pw.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	pw.Close()

	p := &process{
		name:    name,
		cmd:     cmd,
		pid:     cmd.Process.Pid,
		outDone: make(chan struct{}),
		done:    make(chan struct{}),
	}
	go func() {
		_, _ = io.Copy(&p.out, pr)
		pr.Close()
		close(p.outDone)
	}()
	go func() {
		p.waitErr = cmd.Wait()
		// Whatever the leader left behind in its group (e.g. haproxy
		// workers of a crashed master) must not survive it.
		p.killGroup()
		close(p.done)
	}()
	return p, nil
}

// killGroup sends SIGKILL to the process group led by the process.
func (p *process) killGroup() {
	err := syscall.Kill(-p.pid, syscall.SIGKILL)
	if err != nil && !errors.Is(err, syscall.ESRCH) {
		// Fall back to the leader alone.
		_ = p.cmd.Process.Kill()
	}
}

// exited reports whether the process has exited.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to the process, waits up to grace, then kills its
// process group. It is idempotent and safe for concurrent use.
func (p *process) stop(grace time.Duration) {
	p.stopOnce.Do(func() {
		if !p.exited() {
			_ = p.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
			case <-time.After(grace):
				p.killGroup()
				<-p.done
			}
		}
	})
	p.waitOutput(2 * time.Second)
}

// waitOutput waits until the output pipe is drained, at most d.
func (p *process) waitOutput(d time.Duration) {
	select {
	case <-p.outDone:
	case <-time.After(d):
	}
}

// exitError describes how the process ended. Call it only after done is
// closed.
func (p *process) exitError() error {
	state := "exited"
	if p.waitErr != nil {
		state = p.waitErr.Error()
	} else if p.cmd.ProcessState != nil {
		state = p.cmd.ProcessState.String()
	}
	return fmt.Errorf("%s exited early (%s)", p.name, state)
}

// failStart stops the process after a failed start and returns err with the
// whole output appended; cleanup then does not log the output again.
func (p *process) failStart(err error) error {
	p.stop(stopGrace)
	return fmt.Errorf("%w; %s output:\n%s", err, p.name, p.out.String())
}

// CPUTime is the user and system CPU time pid has used so far, from
// /proc/<pid>/stat (not its children's).
func CPUTime(pid int) (time.Duration, error) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	f := StatFields(stat)
	if len(f) < 13 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * time.Second / 100, nil // USER_HZ is 100 on Linux
}

// StatFields are the fields of /proc/<pid>/stat after the command name
// (in parentheses, and it may hold spaces): f[0] is the state, f[1] the
// parent pid, f[11] and f[12] utime and stime.
func StatFields(stat []byte) []string {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 || i+2 > len(stat) {
		return nil
	}
	return strings.Fields(string(stat[i+2:]))
}
