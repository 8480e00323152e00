//go:build race

package spoa_test

// raceEnabled: the race detector slows the agent and the test's TLS
// clients several times over.
const raceEnabled = true
