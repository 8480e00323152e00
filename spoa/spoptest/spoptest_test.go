package spoptest

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseAck(t *testing.T) {
	tests := []struct {
		name    string
		payload []byte
		want    map[string]any
		wantErr bool
	}{
		{"empty", nil, map[string]any{}, false},
		{"bool, string, int64 in two scopes",
			[]byte{1, 3, 1, 7, 'a', 'l', 'l', 'o', 'w', 'e', 'd', typeBool | flagTrue,
				1, 3, 2, 1, 's', typeString, 2, 'h', 'i',
				1, 3, 1, 3, 'g', 'e', 'n', typeInt64, 240, 1}, // 256
			map[string]any{"sess.allowed": true, "txn.s": "hi", "sess.gen": int64(256)}, false},
		{"false", []byte{1, 3, 1, 1, 'a', typeBool}, map[string]any{"sess.a": false}, false},
		{"unset-var action", []byte{2, 2, 1, 1, 'a'}, nil, true},
		{"unknown scope", []byte{1, 3, 9, 1, 'a', typeBool}, nil, true},
		{"truncated string", []byte{1, 3, 1, 1, 'a', typeString, 5, 'x'}, nil, true},
		{"unknown type", []byte{1, 3, 1, 1, 'a', 7}, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseAck(tt.payload)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if !tt.wantErr && !cmp.Equal(got, tt.want) {
				t.Errorf("got %v, want %v", got, tt.want)
			}
		})
	}
}
