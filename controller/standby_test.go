package controller

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/haproxy-connect/haproxy-connect/slots"
)

// TestStandbyCarried: an endpoint one watch drops stays standby until the
// other watch has answered as of the same change or a later one, whichever
// of the two answers first; then it is what the newest answers say.
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
	}
	tests := []struct {
		name    string
		answers []answer
		want    []string // standby endpoints (last octet) after each answer
	}{
		{"checks pass: the standby answer comes first", []answer{
			{false, 10, list(1)}, {true, 10, list(2)},
			{true, 11, nil}, // 2 passes: dropped here first
			{false, 11, list(1, 2)},
		}, []string{"", "2", "2", ""}},
		{"checks pass: the upstream's answer comes first", []answer{
			{false, 10, list(1)}, {true, 10, list(2)},
			{false, 11, list(1, 2)}, {true, 11, nil},
		}, []string{"", "2", "2", ""}},
		{"checks fail: the upstream's answer drops it first", []answer{
			{false, 10, list(1, 2)}, {true, 10, nil},
			{false, 11, list(1)}, // 2 fails: standby until the standby watch answers
			{true, 11, list(2)},
		}, []string{"", "", "2", "2"}},
		{"deregistered: carried until the other watch answers, then gone", []answer{
			{false, 10, list(1, 2)}, {true, 10, nil},
			{false, 11, list(1)}, {true, 11, nil},
		}, []string{"", "", "2", ""}},
		{"an older answer of the other watch does not end it", []answer{
			{false, 10, list(1, 2)}, {true, 9, nil},
			{false, 12, list(1)}, {true, 11, nil}, {true, 12, nil},
		}, []string{"", "", "2", "2", ""}},
		{"dropped by an answer no newer than the other's: not carried", []answer{
			{true, 12, list(2)}, {false, 12, list(1)},
			{true, 12, nil},
		}, []string{"2", "2", ""}},
		{"before the standby watch answered, nothing is carried", []answer{
			{false, 10, list(1, 2)}, {false, 11, list(1)},
		}, []string{"", ""}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := &desired{endpoints: map[string][]slots.Endpoint{}, dirty: map[string]time.Time{}, standby: map[string]*standbySet{}}
			for i, a := range tt.answers {
				if a.standby {
					d.standbyAnswer("up_api", standbyList{eps: a.eps, index: a.index})
				} else {
					d.listAnswer("up_api", d.endpoints["up_api"], a.eps, nil, a.index)
					d.setEndpoints("up_api", a.eps, time.Time{})
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
