package bench

import (
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

func TestTreeCountsChildren(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Skip("no sleep binary:", err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	self, err := Tree(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	child, err := Tree(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if self.Procs < 2 || child.Procs != 1 {
		t.Errorf("procs: self tree %d (want >= 2, with the child), child %d (want 1)", self.Procs, child.Procs)
	}
	if self.Mem <= child.Mem || child.Mem <= 0 {
		t.Errorf("memory: self tree %d, child %d", self.Mem, child.Mem)
	}
}

// TestTreeSplitsKernelTime: time a process spends in system calls is
// counted in Sys as well as in CPU, and user time is not.
func TestTreeSplitsKernelTime(t *testing.T) {
	before, err := Tree(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// About half a second of getpid calls, each a trip into the kernel.
	for end := time.Now().Add(500 * time.Millisecond); time.Now().Before(end); {
		for range 1000 {
			_ = syscall.Getppid()
		}
	}
	after, err := Tree(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	cpu, sys := after.CPU-before.CPU, after.Sys-before.Sys
	if sys <= 0 || sys > cpu {
		t.Errorf("system calls for 500ms: CPU %v, of which kernel %v; want some kernel time, at most the CPU", cpu, sys)
	}
}
