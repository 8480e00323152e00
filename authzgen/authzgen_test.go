package authzgen

import (
	"testing"
	"time"
)

// TestGenerationWait: Wait returns once the generation (or a later one) is
// applied, not before, and false at its timeout.
func TestGenerationWait(t *testing.T) {
	g := NewGeneration()
	g.Publish(2)
	select {
	case <-g.Kick():
	default:
		t.Fatal("Publish did not kick")
	}
	if g.Wanted() != 2 {
		t.Fatalf("Wanted = %d, want 2", g.Wanted())
	}
	returned := make(chan bool)
	go func() { returned <- g.Wait(2, time.Minute) }()
	g.Applied(1)
	select {
	case <-returned:
		t.Fatal("returned when HAProxy had generation 1 of 2")
	case <-time.After(50 * time.Millisecond):
	}
	g.Applied(3)
	if !<-returned {
		t.Fatal("Wait reported a timeout after the generation was applied")
	}
	if !g.Wait(1, time.Minute) {
		t.Fatal("an older generation: should be there at once")
	}
	if g.Wait(4, 10*time.Millisecond) {
		t.Fatal("Wait(4) returned true with generation 3 applied")
	}
}

func TestNames(t *testing.T) {
	if got := SessVar(VarAllowed); got != "sess.hc.allowed" {
		t.Errorf("SessVar(VarAllowed) = %q", got)
	}
	if got := MapContent(7); got != "gen 7\n" {
		t.Errorf("MapContent(7) = %q", got)
	}
}
