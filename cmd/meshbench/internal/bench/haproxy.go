package bench

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// FrontendSessions returns the cumulative sessions (stot) of an HAProxy
// frontend, asked through the master socket sock ("@1 show stat").
func FrontendSessions(sock, frontend string) (int64, error) {
	out, err := Command(sock, "@1 show stat -1 1 -1")
	if err != nil {
		return 0, err
	}
	return ParseStot(out, frontend)
}

// ParseStot finds the FRONTEND row of frontend in "show stat" CSV and
// returns its stot column.
func ParseStot(csv, frontend string) (int64, error) {
	col := -1
	for _, line := range strings.Split(csv, "\n") {
		if rest, ok := strings.CutPrefix(line, "# "); ok {
			for i, h := range strings.Split(rest, ",") {
				if h == "stot" {
					col = i
				}
			}
			continue
		}
		f := strings.Split(line, ",")
		if col < 0 || len(f) <= col || f[0] != frontend || f[1] != "FRONTEND" {
			continue
		}
		return strconv.ParseInt(f[col], 10, 64)
	}
	return 0, fmt.Errorf("no stot for frontend %s in show stat output: %q", frontend, truncate(csv, 300))
}
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// Command sends one line to an HAProxy CLI socket (the master's, or a
// worker's stats socket), half-closes, and reads the answer to EOF (the
// master keeps the connection open for more commands otherwise).
func Command(sock, cmd string) (string, error) {
	c, err := net.DialTimeout("unix", sock, 2*time.Second)
	if err != nil {
		return "", fmt.Errorf("master socket %s: %w", sock, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, cmd+"\n"); err != nil {
		return "", fmt.Errorf("master socket %s: %w", sock, err)
	}
	if err := c.(*net.UnixConn).CloseWrite(); err != nil {
		return "", fmt.Errorf("master socket %s: %w", sock, err)
	}
	out, err := io.ReadAll(c)
	if err != nil {
		return string(out), fmt.Errorf("master socket %s: %q: %w", sock, cmd, err)
	}
	return string(out), nil
}

// ObserveSocket prepares a worker-level stats socket for an HAProxy that a
// benchmark observes: HAProxy contenders are read there ("show servers
// state"), not on the master socket, which haproxy-connect steers HAProxy
// with: an observer on the master would queue its commands with the
// controller's in the master's one thread and the forwarding to the
// worker. global is the configuration line that declares the socket
// (level user: enough for "show servers state", nothing it can change).
func (e *Env) ObserveSocket() (sock, global string, err error) {
	dir, err := e.Subdir("o")
	if err != nil {
		return "", "", err
	}
	sock = filepath.Join(dir, "observe.sock")
	return sock, fmt.Sprintf("    stats socket %s mode 600 level user\n", sock), nil
}

// ObservedHAProxy writes a wrapper of e.HAProxy that adds a configuration
// fragment declaring an ObserveSocket to every start (HAProxy merges the
// global sections of several -f files, and the master re-executes itself
// with the same arguments on a reload): a sidecar run with it as
// -haproxy-bin renders and runs its configuration unchanged, plus a socket
// to observe it by.
func (e *Env) ObservedHAProxy() (bin, sock string, err error) {
	sock, global, err := e.ObserveSocket()
	if err != nil {
		return "", "", err
	}
	dir := filepath.Dir(sock)
	frag := filepath.Join(dir, "observe.cfg")
	if err := os.WriteFile(frag, []byte("global\n"+global), 0o600); err != nil {
		return "", "", err
	}
	bin = filepath.Join(dir, "haproxy")
	script := fmt.Sprintf("#!/bin/sh\nexec %s \"$@\" -f %s\n", e.HAProxy, frag)
	return bin, sock, os.WriteFile(bin, []byte(script), 0o700)
}
