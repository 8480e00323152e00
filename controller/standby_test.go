package controller

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/haproxy-connect/haproxy-connect/slots"
)

// TestStandbyCarried: an endpoint one side drops stays standby until the
// other side has answered as of the same change or a later one, whichever
// of the two answers first, or carryMax has passed; then it is what the
// newest answers say.
func TestStandbyCarried(t *testing.T) {
	list := func(ns ...int) []slots.Endpoint {
		var eps []slots.Endpoint
		for _, n := range ns {
			eps = append(eps, ep(n, 21000))
		}
		return eps
	}
	type answer struct {
		standby bool // else the upstream's own
		index   uint64
		eps     []slots.Endpoint
		after   time.Duration // since the previous answer; 10 ms when 0
	}
	tests := []struct {
		name    string
		answers []answer
		want    []string // standby endpoints (last octet) after each answer
	}{
		{"checks pass: the standby answer comes first", []answer{
			{standby: false, index: 10, eps: list(1)}, {standby: true, index: 10, eps: list(2)},
			{standby: true, index: 11, eps: nil}, // 2 passes: dropped here first
			{standby: false, index: 11, eps: list(1, 2)},
		}, []string{"", "2", "2", ""}},
		{"checks pass: the upstream's answer comes first", []answer{
			{standby: false, index: 10, eps: list(1)}, {standby: true, index: 10, eps: list(2)},
			{standby: false, index: 11, eps: list(1, 2)}, {standby: true, index: 11, eps: nil},
		}, []string{"", "2", "2", ""}},
		{"checks fail: the upstream's answer drops it first", []answer{
			{standby: false, index: 10, eps: list(1, 2)}, {standby: true, index: 10, eps: nil},
			{standby: false, index: 11, eps: list(1)}, // 2 fails: standby until the standby query answers
			{standby: true, index: 11, eps: list(2)},
		}, []string{"", "", "2", "2"}},
		{"deregistered: carried until the other side answers, then gone", []answer{
			{standby: false, index: 10, eps: list(1, 2)}, {standby: true, index: 10, eps: nil},
			{standby: false, index: 11, eps: list(1)}, {standby: true, index: 11, eps: nil},
		}, []string{"", "", "2", ""}},
		{"an older answer of the other side does not end it", []answer{
			{standby: false, index: 10, eps: list(1, 2)}, {standby: true, index: 9, eps: nil},
			{standby: false, index: 12, eps: list(1)}, {standby: true, index: 11, eps: nil}, {standby: true, index: 12, eps: nil},
		}, []string{"", "", "2", "2", ""}},
		{"dropped by an answer no newer than the other's: not carried", []answer{
			{standby: true, index: 12, eps: list(2)}, {standby: false, index: 12, eps: list(1)},
			{standby: true, index: 12, eps: nil},
		}, []string{"2", "2", ""}},
		{"before the first standby answer, nothing is carried", []answer{
			{standby: false, index: 10, eps: list(1, 2)}, {standby: false, index: 11, eps: list(1)},
		}, []string{"", ""}},
		{"not past carryMax, though the other side has not answered", []answer{
			{standby: false, index: 10, eps: list(1, 2)}, {standby: true, index: 10, eps: nil},
			{standby: false, index: 11, eps: list(1)}, {standby: false, index: 12, eps: list(1, 3), after: carryMax + time.Millisecond},
		}, []string{"", "", "2", ""}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := &desired{endpoints: map[string][]slots.Endpoint{}, dirty: map[string]time.Time{}, standby: map[string]*standbySet{}}
			at := t0
			for i, a := range tt.answers {
				if a.after == 0 {
					a.after = 10 * time.Millisecond
				}
				at = at.Add(a.after)
				if a.standby {
					d.standbyAnswer("up_api", standbyList{eps: a.eps, index: a.index, at: at})
				} else {
					d.listAnswer("up_api", d.endpoints["up_api"], a.eps, nil, a.index, at)
					d.setEndpoints("up_api", a.eps, at)
				}
				var got []string
				if s := d.standby["up_api"]; s != nil {
					for _, e := range s.eps {
						got = append(got, strings.TrimPrefix(e.Addr, "10.0.0."))
					}
				}
				if g := strings.Join(got, " "); g != tt.want[i] {
					t.Errorf("after answer %d (%s): standby %q, want %q", i, fmt.Sprint(a.standby, a.index), g, tt.want[i])
				}
			}
		})
	}
}

// TestStandbyReaderPacing: an upstream's standby query runs at once when
// due, then at most once per standbyPoll; a failed one is retried unless
// the upstream's watch ended.
func TestStandbyReaderPacing(t *testing.T) {
	r := newStandbyReader()
	a, b := Upstream{Name: "up_a"}, Upstream{Name: "up_b"}
	names := func(us []Upstream) string {
		var out []string
		for _, u := range us {
			out = append(out, u.Name)
		}
		return strings.Join(out, " ")
	}
	steps := []struct {
		at       time.Duration
		due      []Upstream
		retry    []Upstream
		forget   []Upstream
		want     string
		wantWait time.Duration // -1: nothing pending
	}{
		{at: 0, due: []Upstream{a, b}, want: "up_a up_b", wantWait: -1},
		{at: 100 * time.Millisecond, due: []Upstream{a}, want: "", wantWait: 900 * time.Millisecond},
		{at: 600 * time.Millisecond, due: []Upstream{a}, want: "", wantWait: 400 * time.Millisecond},
		{at: time.Second, want: "up_a", wantWait: -1},
		{at: 1500 * time.Millisecond, retry: []Upstream{a}, want: "", wantWait: 500 * time.Millisecond},
		{at: 2 * time.Second, want: "up_a", wantWait: -1},
		{at: 2100 * time.Millisecond, forget: []Upstream{b}, retry: []Upstream{b}, want: "", wantWait: -1},
	}
	for _, st := range steps {
		for _, u := range st.due {
			r.due(u)
		}
		for _, u := range st.forget {
			r.forget(u)
		}
		for _, u := range st.retry {
			r.retry(u)
		}
		ready, wait := r.next(t0.Add(st.at))
		if got := names(ready); got != st.want || wait != st.wantWait {
			t.Errorf("at %s: ready %q, wait %s; want %q, %s", st.at, got, wait, st.want, st.wantWait)
		}
	}
}
