// Package spopwire is SPOP's variable-length integer (haproxy doc/SPOE.txt,
// section 3.1), shared by the agent (package spoa) and the HAProxy side its
// tests and meshbench speak (package spoptest), so that both encode and
// decode it with the same code.
package spopwire

import "errors"

// ErrTruncated is a varint that ends before its last byte.
var ErrTruncated = errors.New("truncated spop data")

// errTooLong is a varint past 64 bits.
var errTooLong = errors.New("varint longer than 64 bits")

// Varint decodes a varint at the start of b and returns it with the rest
// of b: one byte below 240, then 4 bits, then 7 bits per byte.
func Varint(b []byte) (uint64, []byte, error) {
	if len(b) == 0 {
		return 0, nil, ErrTruncated
	}
	v, b := uint64(b[0]), b[1:]
	if v < 240 {
		return v, b, nil
	}
	for shift := 4; ; shift += 7 {
		if len(b) == 0 {
			return 0, nil, ErrTruncated
		}
		if shift > 60 {
			return 0, nil, errTooLong
		}
		c := b[0]
		b = b[1:]
		v += uint64(c) << shift
		if c < 128 {
			return v, b, nil
		}
	}
}

// PutVarint appends i to b as a varint.
func PutVarint(b []byte, i uint64) []byte {
	if i < 240 {
		return append(b, byte(i))
	}
	b = append(b, byte(i)|240)
	i = (i - 240) >> 4
	for i >= 128 {
		b = append(b, byte(i)|128)
		i = (i - 128) >> 7
	}
	return append(b, byte(i))
}
