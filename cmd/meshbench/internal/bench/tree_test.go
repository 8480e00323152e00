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

func TestStatFields(t *testing.T) {
	f := statFields([]byte("42 (a b) c) S 7 42 42 0 -1 0 0 0 0 0 5 6 7 8 20 0 1 0"))
	if len(f) < 15 || f[0] != "S" || f[1] != "7" || f[11] != "5" || f[14] != "8" {
		t.Errorf("fields %q", f)
	}
}
