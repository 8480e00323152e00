package bench

import (
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// FrontendSessions returns the cumulative sessions (stot) of an HAProxy
// frontend, asked through the master socket sock ("@1 show stat").
func FrontendSessions(sock, frontend string) (int64, error) {
	out, err := MasterCommand(sock, "@1 show stat -1 1 -1")
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

// MasterCommand sends one line to an HAProxy master socket, half-closes,
// and reads the answer to EOF (the master keeps the connection open for
// more commands otherwise).
func MasterCommand(sock, cmd string) (string, error) {
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
