package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// HTTPMode is how wrk talks to the target.
type HTTPMode struct {
	Name string
	// Close sends "Connection: close": the app closes after the response
	// and wrk reconnects, so each request is a new client connection. The
	// built-in proxy is L4, so that is a new mTLS connection too; an
	// HAProxy client sidecar never sends a session's first request over a
	// reused server connection (http-reuse safe), so it opens a new mTLS
	// connection as well. conns/req checks both.
	Close bool
}

// WrkResult is what one wrk run reports. Latencies are in seconds.
type WrkResult struct {
	RPS, P50, P99 float64
	Requests      int64
	// Socket errors by kind, and responses other than 2xx/3xx.
	Connect, Read, Write, Timeout, Non2xx int64
}

// Errors counts every failed request wrk saw.
func (r WrkResult) Errors() int64 { return r.Connect + r.Read + r.Write + r.Timeout + r.Non2xx }

// ErrorText describes the errors as wrk reports them.
func (r WrkResult) ErrorText() string {
	return fmt.Sprintf("socket errors: connect %d, read %d, write %d, timeout %d; non-2xx %d",
		r.Connect, r.Read, r.Write, r.Timeout, r.Non2xx)
}

// RunWrk runs wrk against url with n connections (2 threads, 1 for one
// connection) for d, whole seconds.
func RunWrk(ctx context.Context, bin, url string, n int, d time.Duration, closeConn bool) (WrkResult, error) {
	var extra []string
	if closeConn {
		extra = []string{"-H", "Connection: close"}
	}
	return RunWrkArgs(ctx, bin, url, n, d, extra...)
}

// RunWrkArgs is RunWrk with wrk arguments of the caller's (a script, a
// header).
func RunWrkArgs(ctx context.Context, bin, url string, n int, d time.Duration, extra ...string) (WrkResult, error) {
	args := []string{"-t", strconv.Itoa(min(2, n)), "-c", strconv.Itoa(n),
		"-d", fmt.Sprintf("%ds", max(1, int(d.Round(time.Second)/time.Second))), "--latency"}
	args = append(args, extra...)
	cmd := exec.CommandContext(ctx, bin, append(args, url)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return WrkResult{}, fmt.Errorf("wrk %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	res, err := ParseWrk(string(out))
	if err != nil {
		return res, fmt.Errorf("wrk %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return res, nil
}

// The two ways wrk talks to a target.
var (
	ModeKeepAlive = HTTPMode{Name: "keep-alive"}
	ModeNewConn   = HTTPMode{Name: "new conn", Close: true}
)

// ParseWrk reads wrk's --latency report: Requests/sec, the 50% and 99%
// lines of the latency distribution, the request count and the error
// lines (absent when zero).
func ParseWrk(out string) (WrkResult, error) {
	var r WrkResult
	var haveRPS, have50, have99, haveReq bool
	unit := map[string]float64{"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
	atoi := func(s string) int64 { v, _ := strconv.ParseInt(s, 10, 64); return v }
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		if m := wrkPercentile.FindStringSubmatch(line); m != nil {
			v, err := strconv.ParseFloat(m[2], 64)
			if err != nil {
				return r, fmt.Errorf("latency %q: %w", line, err)
			}
			v *= unit[m[3]]
			if m[1] == "50" {
				r.P50, have50 = v, true
			} else {
				r.P99, have99 = v, true
			}
		} else if m := wrkRequests.FindStringSubmatch(line); m != nil {
			r.Requests, haveReq = atoi(m[1]), true
		} else if m := wrkRPS.FindStringSubmatch(line); m != nil {
			v, err := strconv.ParseFloat(m[1], 64)
			if err != nil {
				return r, fmt.Errorf("requests/sec %q: %w", line, err)
			}
			r.RPS, haveRPS = v, true
		} else if m := wrkSocket.FindStringSubmatch(line); m != nil {
			r.Connect, r.Read, r.Write, r.Timeout = atoi(m[1]), atoi(m[2]), atoi(m[3]), atoi(m[4])
		} else if m := wrkNon2xx.FindStringSubmatch(line); m != nil {
			r.Non2xx = atoi(m[1])
		}
	}
	if !haveRPS || !haveReq || !have50 || !have99 {
		return r, errors.New("no Requests/sec, request count or 50%/99% latency in the output (was --latency given?)")
	}
	if r.Requests == 0 {
		// wrk prints nan latencies then; nothing went through.
		r.P50, r.P99 = math.NaN(), math.NaN()
	}
	return r, nil
}

// WrkTime is how long wrk runs for one table cell.
func (b *Bench) WrkTime() time.Duration {
	if b.Quick {
		return 2 * time.Second
	}
	return 5 * time.Second
}

var (
	wrkPercentile = regexp.MustCompile(`^\s*(50|99)(?:\.0+)?%\s+([0-9.]+)(us|ms|s|m|h)\s*$`)
	wrkRequests   = regexp.MustCompile(`^\s*(\d+) requests in `)
	wrkRPS        = regexp.MustCompile(`^Requests/sec:\s+([0-9.]+)\s*$`)
	wrkSocket     = regexp.MustCompile(`^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)\s*$`)
	wrkNon2xx     = regexp.MustCompile(`^\s*Non-2xx or 3xx responses: (\d+)\s*$`)
)

// Paired runs wrk against urlA and urlB twice each, in mirrored order
// (ABBA, or BAAB on odd rounds), so that a drift in the machine's load
// weighs on both, and returns each side's two runs and the ratio of B's
// summed rate over A's. A run with any error or non-2xx response fails.
func Paired(ctx context.Context, wrkBin string, round int, urlA, urlB string, clients int, d time.Duration, extra ...string) (a, b []WrkResult, ratio float64, err error) {
	order := []bool{round%2 != 0, round%2 == 0, round%2 == 0, round%2 != 0} // true: B
	var sumA, sumB float64
	for _, isB := range order {
		url := urlA
		if isB {
			url = urlB
		}
		res, err := RunWrkArgs(ctx, wrkBin, url, clients, d, extra...)
		if err == nil && res.Errors() > 0 {
			err = fmt.Errorf("%s: %s", url, res.ErrorText())
		}
		if err != nil {
			return nil, nil, 0, err
		}
		if isB {
			sumB += res.RPS
			b = append(b, res)
		} else {
			sumA += res.RPS
			a = append(a, res)
		}
	}
	return a, b, sumB / sumA, nil
}

// PairFigures gathers Paired's results over rounds: each side's rates and
// p99s (two runs per round) and the per-round ratio of B's rate over A's.
type PairFigures struct {
	A, B, AP99, BP99, Ratio Rounds
	// BRequests is the requests B's runs completed, all rounds summed.
	BRequests int64
}

// Add records one round of Paired.
func (f *PairFigures) Add(a, b []WrkResult, ratio float64) {
	for _, res := range a {
		f.A, f.AP99 = append(f.A, res.RPS), append(f.AP99, res.P99)
	}
	for _, res := range b {
		f.B, f.BP99 = append(f.B, res.RPS), append(f.BP99, res.P99)
		f.BRequests += res.Requests
	}
	f.Ratio = append(f.Ratio, ratio)
}
