package bench

import (
	"os"
	"os/exec"
	"testing"
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
