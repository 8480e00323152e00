package spopwire

import (
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestVarintRoundTrip(t *testing.T) {
	for _, v := range []uint64{0, 1, 239, 240, 241, 2287, 2288, 264431, 264432, 1<<32 - 1, 1<<63 + 5, 1<<64 - 1} {
		b := PutVarint([]byte{0xaa}, v)
		got, rest, err := Varint(b[1:])
		if err != nil || got != v || len(rest) != 0 {
			t.Errorf("%d: encoded % x, decoded %d, rest % x, %v", v, b[1:], got, rest, err)
		}
	}
}

func TestVarintRefuses(t *testing.T) {
	for _, b := range [][]byte{nil, {0xf0}, {0xf0, 0x80}, {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}} {
		if _, _, err := Varint(b); err == nil {
			t.Errorf("% x decoded", b)
		} else if len(b) < 10 && !errors.Is(err, ErrTruncated) {
			t.Errorf("% x: %v, want ErrTruncated", b, err)
		}
	}
}

func TestVarint(t *testing.T) {
	// Boundaries of SPOP's encoding (doc/SPOE.txt 3.1): one byte below
	// 240, then 4 bits, then 7 bits per byte.
	tests := []struct {
		v    uint64
		want []byte
	}{
		{0, []byte{0}},
		{239, []byte{239}},
		{240, []byte{240, 0}},
		{2287, []byte{255, 127}},
		{2288, []byte{240, 128, 0}},
		{264431, []byte{255, 255, 127}},
		{264432, []byte{240, 128, 128, 0}},
		{1 << 32, nil},
	}
	for _, tt := range tests {
		b := PutVarint(nil, tt.v)
		if tt.want != nil && !cmp.Equal(b, tt.want) {
			t.Errorf("PutVarint(%d) = %v, want %v", tt.v, b, tt.want)
		}
		got, rest, err := Varint(append(b, 0xAA))
		if err != nil || got != tt.v || !cmp.Equal(rest, []byte{0xAA}) {
			t.Errorf("Varint(PutVarint(%d)) = %d, %v, %v", tt.v, got, rest, err)
		}
		if _, _, err := Varint(b[:len(b)-1]); err == nil && len(b) > 1 {
			t.Errorf("getVarint of a truncated %d: no error", tt.v)
		}
	}
}
