package spoa

import (
	"crypto/sha256"
	"errors"
	"testing"
)

// TestRecheck: a certificate the agent was asked about is decided again
// under the current intentions, after each switch (the switch hook runs
// once the agent decides under the new generation); one it never saw is
// unknown; a Consul failure is undecided.
func TestRecheck(t *testing.T) {
	ca := testCA()
	client := leafDER(t, ca, 100, clientID)
	other := leafDER(t, ca, 101, "spiffe://"+testTD+"/ns/default/dc/dc1/svc/other")
	f := &fakeDecider{allowed: map[string]bool{clientID: true}}
	var a *Authorizer
	var switched []uint64
	a = newTest(t, f, WithSwitchHook(func(gen uint64) {
		if a.Generation() != gen {
			t.Errorf("switch hook for %d ran under generation %d", gen, a.Generation())
		}
		switched = append(switched, gen)
	}))
	a.decide(client, nil)
	steps := []struct {
		name   string
		do     func()
		der    []byte
		want   RecheckResult
		source string
	}{
		{name: "allowed", der: client, want: RecheckAllowed, source: clientID},
		{name: "never seen", der: other, want: RecheckUnknown, source: noSource},
		{name: "turned to deny", do: func() {
			f.set(func(f *fakeDecider) { f.allowed[clientID] = false })
			a.Invalidate()
		}, der: client, want: RecheckDenied, source: clientID},
		{name: "consul down", do: func() {
			f.set(func(f *fakeDecider) { f.allowed[clientID] = true; f.err = errors.New("agent down") })
			a.Invalidate()
		}, der: client, want: RecheckUndecided, source: clientID},
		{name: "allowed again", do: func() {
			f.set(func(f *fakeDecider) { f.err = nil })
			a.Invalidate()
		}, der: client, want: RecheckAllowed, source: clientID},
	}
	for _, s := range steps {
		if s.do != nil {
			s.do()
		}
		src, got, reason := a.Recheck(sha256.Sum256(s.der))
		if got != s.want || src != s.source {
			t.Errorf("%s: Recheck = %q %v (%s), want %q %v", s.name, src, got, reason, s.source, s.want)
		}
	}
	if len(switched) != 3 || switched[2] != a.Generation() {
		t.Errorf("switch hook ran for %v, want the 3 generations up to %d", switched, a.Generation())
	}
}

// TestCertMemoryBound: the agent remembers at most MaxRememberedCerts
// certificates, forgetting one per new one past it.
func TestCertMemoryBound(t *testing.T) {
	var m certMemory
	for i := range MaxRememberedCerts + 10 {
		var id identity
		id.sum[0], id.sum[1], id.sum[2] = byte(i), byte(i>>8), byte(i>>16)
		m.remember(rememberedCert{id: id})
		m.remember(rememberedCert{id: id}) // known: no change
	}
	if len(m.m) != MaxRememberedCerts || m.forgotten != 10 {
		t.Errorf("%d remembered, %d forgotten; want %d and 10", len(m.m), m.forgotten, MaxRememberedCerts)
	}
}
