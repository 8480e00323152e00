//go:build !race

package spoa_test

const raceEnabled = false
