package controller

import (
	"slices"
	"testing"

	"github.com/haproxy-connect/haproxy-connect/l7"
)

func TestPlanL7Map(t *testing.T) {
	x := func(key string) l7.Compiled {
		return l7.Compiled{Key: key, Entries: []l7.MapEntry{{Pattern: "^" + key + ":", Value: "A/web/default"}}}
	}
	a, b, c := x("aaaaaaaaaaaaaaaa"), x("bbbbbbbbbbbbbbbb"), x("cccccccccccccccc")
	keys := func(xs []l7.Compiled) []string {
		var out []string
		for _, x := range xs {
			out = append(out, x.Key)
		}
		return out
	}
	tests := []struct {
		name     string
		want     []l7.Compiled
		applied  map[string]bool
		unknown  bool
		held     []l7.Compiled
		none     bool
		clear    bool
		add, del []string
		forget   []string
	}{
		{name: "nothing published, nothing held", none: true},
		{name: "in step", want: []l7.Compiled{a, b}, applied: map[string]bool{a.Key: true, b.Key: true}, held: []l7.Compiled{a, b}, none: true},
		{name: "a key added and one removed", want: []l7.Compiled{a, c}, applied: map[string]bool{a.Key: true, b.Key: true}, held: []l7.Compiled{a, b},
			add: []string{c.Key}, del: []string{b.Key}},
		{name: "every key gone", applied: map[string]bool{a.Key: true}, held: []l7.Compiled{a}, del: []string{a.Key}},
		{name: "a refused key is not tried again", want: []l7.Compiled{a}, applied: map[string]bool{a.Key: false}, held: []l7.Compiled{a}, none: true},
		{name: "a refused key gone is forgotten", want: []l7.Compiled{b}, applied: map[string]bool{a.Key: false, b.Key: true}, held: []l7.Compiled{a, b},
			forget: []string{a.Key}},
		{name: "unknown: clear and add all", want: []l7.Compiled{a, b}, applied: map[string]bool{a.Key: true}, unknown: true, held: []l7.Compiled{a},
			clear: true, add: []string{a.Key, b.Key}},
		{name: "unknown with an empty table: clear", unknown: true, clear: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			acts := planL7Map(tc.want, tc.applied, tc.unknown, tc.held)
			if tc.none {
				if len(acts) != 0 {
					t.Fatalf("actions %+v, want none", acts)
				}
				return
			}
			if len(acts) != 1 {
				t.Fatalf("actions %+v, want one", acts)
			}
			got := acts[0].(l7MapAction)
			if got.clear != tc.clear || !slices.Equal(keys(got.add), tc.add) || !slices.Equal(keys(got.del), tc.del) || !slices.Equal(got.forget, tc.forget) || len(got.want) != len(tc.want) {
				t.Fatalf("action clear=%v add=%v del=%v want=%v; want clear=%v add=%v del=%v", got.clear, keys(got.add), keys(got.del), keys(got.want), tc.clear, tc.add, tc.del)
			}
		})
	}
}
