package controller

import (
	"cmp"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/haproxy-connect/haproxy-connect/slots"
)

// Metrics are the controller's counters, exposed in Prometheus text format.
type Metrics struct {
	reloads, reloadFailures, leafRotations  atomic.Uint64
	runtimeCommands, runtimeErrors, batches atomic.Uint64
	endpointUpdates                         atomic.Uint64
	endpointLimitHits                       atomic.Uint64
	// adoptions counts running HAProxys taken over at start; restarts,
	// HAProxy masters started again after theirs exited (a killed master
	// or a crashed worker, which makes the 2.6 master exit).
	adoptions, restarts atomic.Uint64
	answerLimit         *AnswerLimit // nil in some tests
	// bindChecks counts the handshakes that check the public listener
	// after a leaf swap, by outcome (see bindCheck).
	bindChecks [numBindResults]atomic.Uint64
	// propagation is, per applied endpoint change, the time from Consul's
	// answer arriving to HAProxy confirming the runtime batch.
	propagation histogram
	// verifications counts upstream identity verifications by result;
	// verifyDuration is how long each took (connect and handshake).
	verifications         labelCounter
	verifyDuration        histogram
	mu                    sync.Mutex
	endpoints, slotsTotal map[string]int
	// invalidInstances counts instances dropped for a value that failed
	// its check, by upstream and field, once per instance while it stays
	// invalid.
	invalidInstances map[[2]string]uint64
	// mismatches counts, per upstream, instance, address and identity
	// shown, verifications that showed another identity.
	mismatches map[mismatchKey]uint64
}

type mismatchKey struct{ upstream, instance, address, identity string }

func newMetrics(answerLimit *AnswerLimit) *Metrics {
	return &Metrics{endpoints: map[string]int{}, slotsTotal: map[string]int{}, invalidInstances: map[[2]string]uint64{},
		mismatches: map[mismatchKey]uint64{}, verifications: labelCounter{m: map[string]uint64{}}, answerLimit: answerLimit}
}

// invalidInstance counts one dropped instance of upstream, for field.
func (m *Metrics) invalidInstance(upstream, field string) {
	m.mu.Lock()
	m.invalidInstances[[2]string{upstream, field}]++
	m.mu.Unlock()
}

// mismatch counts an endpoint of upstream that showed identity. The label
// values come from Consul and from certificates: they are reduced to a
// safe alphabet, and past maxMismatchSeries distinct series new ones are
// counted under instance "other".
func (m *Metrics) mismatch(upstream, instance, address, identity string) {
	k := mismatchKey{labelValue(upstream), labelValue(instance), labelValue(address), labelValue(identity)}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.mismatches[k]; !ok && len(m.mismatches) >= maxMismatchSeries {
		k = mismatchKey{upstream: k.upstream, instance: "other"}
	}
	m.mismatches[k]++
}

// labelValue keeps letters, digits and "_.:/-[]" and replaces anything
// else with "_", so that a label value needs no escaping.
func labelValue(s string) string {
	if len(s) > 256 {
		s = s[:256]
	}
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', strings.ContainsRune("_.:/-[]", r):
			return r
		}
		return '_'
	}, s)
}

// labelCounter is a counter with one label.
type labelCounter struct {
	mu sync.Mutex
	m  map[string]uint64
}

func (c *labelCounter) inc(label string) {
	c.mu.Lock()
	c.m[label]++
	c.mu.Unlock()
}

func (c *labelCounter) write(p func(string, ...any), name, help, label string, values ...string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p("# HELP %s %s", name, help)
	p("# TYPE %s counter", name)
	for _, v := range values {
		p("%s{%s=%q} %d", name, label, v, c.m[v])
	}
}

func (m *Metrics) setEndpoints(tables map[string]slots.Table) {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.endpoints)
	clear(m.slotsTotal)
	for name, t := range tables {
		m.endpoints[name] = t.Used()
		m.slotsTotal[name] = len(t.Slots)
	}
}

// Reloads is the number of confirmed reloads since start.
func (m *Metrics) Reloads() uint64 { return m.reloads.Load() }

// WriteTo writes the metrics in Prometheus text exposition format.
func (m *Metrics) WriteTo(w io.Writer) (int64, error) {
	var n int64
	p := func(format string, a ...any) {
		k, _ := fmt.Fprintf(w, format+"\n", a...)
		n += int64(k)
	}
	counter := func(name, help string, v uint64) {
		p("# HELP %s %s", name, help)
		p("# TYPE %s counter", name)
		p("%s %d", name, v)
	}
	counter("haproxy_connect_reloads_total", "Confirmed HAProxy reloads.", m.reloads.Load())
	counter("haproxy_connect_reload_failures_total", "Reloads that failed or were not confirmed.", m.reloadFailures.Load())
	counter("haproxy_connect_haproxy_adoptions_total", "Running HAProxy masters adopted at start instead of starting a new one.", m.adoptions.Load())
	counter("haproxy_connect_haproxy_restarts_total", "HAProxy started again after its master exited unasked (a killed master, or a crashed worker).", m.restarts.Load())
	counter("haproxy_connect_leaf_rotations_total", "Leaf certificates swapped through the runtime API.", m.leafRotations.Load())
	p("# HELP haproxy_connect_leaf_bind_checks_total Handshakes with the public listener after a leaf swap, by result: ok, no_client_cert_request (mutual TLS lost: the sidecar reloads), wrong_leaf (the new leaf not served: it reloads), unreachable.")
	p("# TYPE haproxy_connect_leaf_bind_checks_total counter")
	for r := range numBindResults {
		p("haproxy_connect_leaf_bind_checks_total{result=%q} %d", r.String(), m.bindChecks[r].Load())
	}
	counter("haproxy_connect_runtime_commands_total", "Runtime commands sent to the master socket.", m.runtimeCommands.Load())
	counter("haproxy_connect_runtime_errors_total", "Runtime commands or batches that failed.", m.runtimeErrors.Load())
	counter("haproxy_connect_runtime_batches_total", "Batches of runtime commands sent.", m.batches.Load())
	counter("haproxy_connect_endpoint_updates_total", "Changed endpoint lists received from Consul.", m.endpointUpdates.Load())
	counter("haproxy_connect_endpoint_limit_hits_total", "Endpoint lists cut to the per-upstream limit (-max-endpoints).", m.endpointLimitHits.Load())
	var answerHits uint64
	if m.answerLimit != nil {
		answerHits = m.answerLimit.Hits()
	}
	counter("haproxy_connect_consul_answer_limit_hits_total", "Consul answers dropped for exceeding the size limit (-max-answer-bytes).", answerHits)
	m.propagation.write(p, "haproxy_connect_endpoint_propagation_seconds",
		"Time from an upstream's changed endpoint list arriving from Consul to HAProxy confirming it (runtime batch done).")
	m.verifications.write(p, "haproxy_connect_upstream_verifications_total",
		"Upstream endpoint identity verifications (own mTLS handshake) by result: ok, mismatch (another service's identity), untrusted (not the mesh's CA, or not one URI SAN), unreachable.",
		"result", "ok", "mismatch", "untrusted", "unreachable")
	m.verifyDuration.write(p, "haproxy_connect_upstream_verification_seconds",
		"Time one upstream endpoint identity verification took (connect and mTLS handshake).")
	m.mu.Lock()
	defer m.mu.Unlock()
	mks := make([]mismatchKey, 0, len(m.mismatches))
	for k := range m.mismatches {
		mks = append(mks, k)
	}
	slices.SortFunc(mks, func(a, b mismatchKey) int {
		return strings.Compare(a.upstream+" "+a.instance+" "+a.address+" "+a.identity, b.upstream+" "+b.instance+" "+b.address+" "+b.identity)
	})
	p("# HELP haproxy_connect_upstream_identity_mismatches_total Verifications in which an upstream endpoint showed another identity than its destination's; it gets no traffic.")
	p("# TYPE haproxy_connect_upstream_identity_mismatches_total counter")
	for _, k := range mks {
		p("haproxy_connect_upstream_identity_mismatches_total{upstream=%q,instance=%q,address=%q,identity=%q} %d",
			k.upstream, k.instance, k.address, k.identity, m.mismatches[k])
	}
	names := make([]string, 0, len(m.endpoints))
	for k := range m.endpoints {
		names = append(names, k)
	}
	slices.Sort(names)
	p("# HELP haproxy_connect_upstream_endpoints Endpoints in service per upstream.")
	p("# TYPE haproxy_connect_upstream_endpoints gauge")
	for _, k := range names {
		p("haproxy_connect_upstream_endpoints{upstream=%q} %d", k, m.endpoints[k])
	}
	p("# HELP haproxy_connect_upstream_slots Server slots per upstream backend.")
	p("# TYPE haproxy_connect_upstream_slots gauge")
	for _, k := range names {
		p("haproxy_connect_upstream_slots{upstream=%q} %d", k, m.slotsTotal[k])
	}
	// Upstream names are HAProxy identifiers and fields a fixed set, so %q
	// writes them as Prometheus label values.
	invalid := make([][2]string, 0, len(m.invalidInstances))
	for k := range m.invalidInstances {
		invalid = append(invalid, k)
	}
	slices.SortFunc(invalid, func(a, b [2]string) int { return cmp.Or(cmp.Compare(a[0], b[0]), cmp.Compare(a[1], b[1])) })
	p("# HELP haproxy_connect_invalid_instances_total Upstream instances dropped because a value Consul served failed its check (counted once per instance while it stays invalid).")
	p("# TYPE haproxy_connect_invalid_instances_total counter")
	for _, k := range invalid {
		p("haproxy_connect_invalid_instances_total{upstream=%q,field=%q} %d", k[0], k[1], m.invalidInstances[k])
	}
	return n, nil
}

// propagationBuckets are the histogram's upper bounds, in seconds: fine
// below 20 ms, where a sidecar's own share at steady churn lies and where
// 1 ms matters to its users, coarse above for bursts.
var propagationBuckets = [...]float64{0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075,
	0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5}

// histogram is a Prometheus histogram with propagationBuckets.
type histogram struct {
	mu     sync.Mutex
	counts [len(propagationBuckets) + 1]uint64 // one per bucket, then +Inf
	sum    float64
	n      uint64
}

func (h *histogram) observe(d time.Duration) {
	s := d.Seconds()
	i, _ := slices.BinarySearch(propagationBuckets[:], s)
	h.mu.Lock()
	h.counts[i]++
	h.sum += s
	h.n++
	h.mu.Unlock()
}

func (h *histogram) write(p func(string, ...any), name, help string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	p("# HELP %s %s", name, help)
	p("# TYPE %s histogram", name)
	var cum uint64
	for i, le := range propagationBuckets {
		cum += h.counts[i]
		p("%s_bucket{le=\"%g\"} %d", name, le, cum)
	}
	p("%s_bucket{le=\"+Inf\"} %d", name, h.n)
	p("%s_sum %g", name, h.sum)
	p("%s_count %d", name, h.n)
}
