package testenv

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const (
	haproxyReadyTimeout   = 10 * time.Second
	masterCommandTimeout  = 5 * time.Second
	readinessPollInterval = 50 * time.Millisecond
)

// HAProxyProc is a running haproxy master (master-worker mode, foreground)
// with a master CLI socket.
type HAProxyProc struct {
	// Dir holds the config and the master socket.
	Dir string
	// MasterSock is the path of the master CLI unix socket.
	MasterSock string
	// ConfigPath is the path of the config file haproxy was started with.
	ConfigPath string

	proc *process
}

// HAProxy writes config to <ShortTempDir>/haproxy.cfg, starts haproxy in
// master-worker mode and waits until the master CLI lists a worker. The test
// fails (with haproxy's output) if that does not happen within 10 s or if
// haproxy exits first. The process is stopped when the test ends.
func HAProxy(t testing.TB, config string) *HAProxyProc {
	t.Helper()
	h, err := StartHAProxy(t, ShortTempDir(t), config)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return h
}

// StartHAProxy is HAProxy with a caller-chosen dir (keep it short: the master
// socket goes there) and an error instead of a test failure, e.g. to check
// that a bad config is rejected. It still skips (or fails in CI) when haproxy
// is not installed. On success the process is stopped when the test ends; on
// error it has already been stopped and the error holds its output.
func StartHAProxy(t testing.TB, dir, config string) (*HAProxyProc, error) {
	t.Helper()
	h, err := LaunchHAProxy(HAProxyBin(t), dir, config)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() {
		h.Stop()
		if t.Failed() {
			t.Logf("haproxy output (%s):\n%s", h.Dir, h.Output())
		}
	})
	return h, nil
}

// LaunchHAProxy starts haproxy outside a test (meshbench uses it): the
// caller stops it. On error the process is already stopped and the error
// holds its output.
func LaunchHAProxy(bin, dir, config string) (*HAProxyProc, error) {
	h := &HAProxyProc{
		Dir:        dir,
		MasterSock: filepath.Join(dir, "master.sock"),
		ConfigPath: filepath.Join(dir, "haproxy.cfg"),
	}
	if n := len(h.MasterSock); n >= 108 {
		return nil, fmt.Errorf("master socket path %s is %d bytes, unix sockets allow 107: use ShortTempDir", h.MasterSock, n)
	}
	if err := os.WriteFile(h.ConfigPath, []byte(config), 0o600); err != nil {
		return nil, fmt.Errorf("write haproxy config: %w", err)
	}

	// -db keeps haproxy in the foreground even if the config says "daemon",
	// so the process we track stays the master.
	p, err := startProcess("haproxy", bin, dir,
		"-W", "-db",
		"-S", h.MasterSock+",mode,600",
		"-f", h.ConfigPath)
	if err != nil {
		return nil, err
	}
	h.proc = p
	if err := h.waitReady(haproxyReadyTimeout); err != nil {
		return nil, h.proc.failStart(err)
	}
	return h, nil
}

func (h *HAProxyProc) waitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var lastErr error
	for {
		out, err := h.masterCommand("show proc", time.Second)
		if err == nil {
			if hasWorker(out) {
				return nil
			}
			err = fmt.Errorf("no worker in show proc output:\n%s", out)
		}
		lastErr = err
		if time.Now().After(deadline) {
			return fmt.Errorf("haproxy not ready after %s (last error: %v)", timeout, lastErr)
		}
		select {
		case <-h.proc.done:
			return h.proc.exitError()
		case <-time.After(readinessPollInterval):
		}
	}
}

// hasWorker reports whether "show proc" output lists a worker process.
func hasWorker(showProc string) bool {
	sc := bufio.NewScanner(strings.NewReader(showProc))
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && !strings.HasPrefix(fields[0], "#") && fields[1] == "worker" {
			return true
		}
	}
	return false
}

// Output returns everything haproxy wrote to stdout and stderr so far.
func (h *HAProxyProc) Output() string {
	return h.proc.out.String()
}

// PID returns the process id of the haproxy master.
func (h *HAProxyProc) PID() int {
	return h.proc.pid
}

// Exited returns a channel closed once the haproxy master has exited.
func (h *HAProxyProc) Exited() <-chan struct{} {
	return h.proc.done
}

// Stop sends SIGTERM to the master, waits up to 5 s, then kills the whole
// process group. It is idempotent.
func (h *HAProxyProc) Stop() {
	h.proc.stop(stopGrace)
}

// MasterCommand sends one command to the master CLI (e.g. "show proc" or
// "@1 show servers state") and returns the full answer. It is a raw helper
// for test assertions: one connection, half-closed after the command, read
// to EOF, 5 s deadline.
func (h *HAProxyProc) MasterCommand(cmd string) (string, error) {
	return h.masterCommand(cmd, masterCommandTimeout)
}

func (h *HAProxyProc) masterCommand(cmd string, timeout time.Duration) (string, error) {
	conn, err := net.DialTimeout("unix", h.MasterSock, timeout)
	if err != nil {
		return "", fmt.Errorf("dial master socket: %w", err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		return "", fmt.Errorf("set master socket deadline: %w", err)
	}
	if _, err := io.WriteString(conn, cmd+"\n"); err != nil {
		return "", fmt.Errorf("write %q to master socket: %w", cmd, err)
	}
	// The master CLI keeps the connection open for further commands until
	// the client half-closes it (verified with haproxy 2.6): without this
	// the read below would only end at the deadline.
	if err := conn.(*net.UnixConn).CloseWrite(); err != nil {
		return "", fmt.Errorf("half-close master socket: %w", err)
	}
	out, err := io.ReadAll(conn)
	if err != nil {
		return string(out), fmt.Errorf("read answer to %q from master socket: %w", cmd, err)
	}
	return string(out), nil
}
