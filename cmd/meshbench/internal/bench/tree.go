package bench

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// A sidecar is a process tree: haproxy-connect, the HAProxy master it
// starts, and the master's workers (old ones too, while they drain). Its
// cost is the tree's, not the controller's alone.

// TreeUsage is the CPU time and memory of a process tree.
type TreeUsage struct {
	// CPU is user + system time of every live process in the tree, plus
	// the time of the children each has reaped (cutime, cstime: an HAProxy
	// master reaps its old workers, so their time stays counted).
	CPU time.Duration
	// Sys is the part of CPU spent in the kernel (stime, cstime): on
	// loopback, each send also runs the receiving socket's network stack
	// in the sender's system time.
	Sys time.Duration
	// Mem is the tree's proportional set size (Pss: pages shared between
	// the master and its forked workers counted once), or the sum of RSS
	// where smaps_rollup cannot be read.
	Mem int64
	// RootMem is the root process's own share of Mem (haproxy-connect's,
	// for a sidecar): the rest is HAProxy's.
	RootMem int64
	Procs   int
}

// Tree reads /proc for pid and all its descendants.
func Tree(pid int) (TreeUsage, error) {
	var u TreeUsage
	pids, err := descendants(pid)
	if err != nil {
		return u, err
	}
	for _, p := range pids {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
		if err != nil {
			if p == pid {
				return u, err
			}
			continue // exited meanwhile
		}
		f := testenv.StatFields(stat)
		if len(f) < 15 {
			return u, fmt.Errorf("short /proc/%d/stat", p)
		}
		var ticks, sys int64
		for _, i := range []int{11, 12, 13, 14} { // utime stime cutime cstime
			v, _ := strconv.ParseInt(f[i], 10, 64)
			ticks += v
			if i == 12 || i == 14 {
				sys += v
			}
		}
		u.CPU += time.Duration(ticks) * time.Second / 100 // USER_HZ is 100 on Linux
		u.Sys += time.Duration(sys) * time.Second / 100
		m := memOf(p)
		u.Mem += m
		if p == pid {
			u.RootMem = m
		}
		u.Procs++
	}
	return u, nil
}

// descendants returns pid and every process below it, from the parent
// pids in /proc/*/stat.
func descendants(pid int) ([]int, error) {
	dirs, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil {
		return nil, err
	}
	children := map[int][]int{}
	for _, d := range dirs {
		stat, err := os.ReadFile(d)
		if err != nil {
			continue
		}
		f := testenv.StatFields(stat)
		if len(f) < 2 {
			continue
		}
		p, _ := strconv.Atoi(filepath.Base(filepath.Dir(d)))
		pp, _ := strconv.Atoi(f[1])
		children[pp] = append(children[pp], p)
	}
	out := []int{pid}
	for i := 0; i < len(out); i++ {
		out = append(out, children[out[i]]...)
	}
	return out, nil
}

// memOf is a process's Pss in bytes, else its VmRSS; 0 when gone.
func memOf(pid int) int64 {
	read := func(path, key string) (int64, bool) {
		f, err := os.Open(path)
		if err != nil {
			return 0, false
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), key+":"); ok {
				kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
				return kb << 10, err == nil
			}
		}
		return 0, false
	}
	if v, ok := read(fmt.Sprintf("/proc/%d/smaps_rollup", pid), "Pss"); ok {
		return v
	}
	v, _ := read(fmt.Sprintf("/proc/%d/status", pid), "VmRSS")
	return v
}

// PeakMem samples the tree's memory (TreeUsage.Mem) every period until
// the returned stop is called, and returns the largest sample: the peak of
// the whole tree, which a sum of each process's own peak (VmHWM) would
// overstate, those peaks being at different times. The sample's RootMem
// says how much of it was the root process's.
func PeakMem(ctx context.Context, pid int, period time.Duration) (stop func() TreeUsage) {
	ctx, cancel := context.WithCancel(ctx)
	var mu sync.Mutex
	var peak TreeUsage
	sample := func() {
		if u, err := Tree(pid); err == nil {
			mu.Lock()
			if u.Mem > peak.Mem {
				peak = u
			}
			mu.Unlock()
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(period)
		defer t.Stop()
		for {
			sample()
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return func() TreeUsage {
		cancel()
		<-done
		sample()
		mu.Lock()
		defer mu.Unlock()
		return peak
	}
}
