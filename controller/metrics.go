package controller

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/haproxy-connect/haproxy-connect/slots"
)

// Metrics are the controller's metrics, declared with client_golang. The
// value is a prometheus.Collector: the caller registers it on its own
// registry (cmd/haproxy-connect serves one registry on -stats-addr), so
// nothing is registered process-wide and every Controller, in tests too,
// has its own.
//
// Declaring a new metric: add a field, build it in newMetrics with a
// name in haproxy_connect_*, the unit as suffix (_seconds, _bytes, _total
// for counters) and help text saying what one count is, then list it in
// collectors. Labels take values of a fixed set, or upstream names
// (bounded by the registration); never instance IDs, addresses or other
// values Consul hands out per instance: those go to the log line.
// A labelled counter whose label values are known lists them in
// newMetrics (WithLabelValues) so that its series exist, at 0, from the
// start.
type Metrics struct {
	reloads                     *prometheus.CounterVec // by reason (reloadReason)
	reloadFailures              prometheus.Counter
	adoptions, restarts         prometheus.Counter
	leafRotations               prometheus.Counter
	bindChecks                  *prometheus.CounterVec // by bindResult
	runtimeCommands             prometheus.Counter
	runtimeErrors, batches      prometheus.Counter
	endpointUpdates             prometheus.Counter
	endpointLimitHits           prometheus.Counter
	answerLimitHits             prometheus.CounterFunc
	propagation, verifyDuration prometheus.Histogram
	verifications               *prometheus.CounterVec // by result
	invalidInstances            *prometheus.CounterVec // by upstream, field
	mismatches                  *prometheus.CounterVec // by upstream
	// upstreams is the applied slot tables' snapshot, replaced whole by
	// setEndpoints, so that a scrape never sees a half-updated set of
	// upstreams.
	upstreams atomic.Pointer[[]upstreamGauge]
}

type upstreamGauge struct {
	name                   string
	endpoints, slots, free int
}

var (
	endpointsDesc = prometheus.NewDesc("haproxy_connect_upstream_endpoints",
		"Endpoints in service (placed in a slot) per upstream.", []string{"upstream"}, nil)
	slotsDesc = prometheus.NewDesc("haproxy_connect_upstream_slots",
		"Server slots per upstream backend, used and free.", []string{"upstream"}, nil)
	freeSlotsDesc = prometheus.NewDesc("haproxy_connect_upstream_free_slots",
		"Server slots per upstream backend free for new endpoints without a reload.", []string{"upstream"}, nil)
)

// Reload reasons, the values of haproxy_connect_reloads_total's reason
// label. A reload with several reasons counts once, under their names
// joined with "+" in this order (see plan), so the sum over reasons is
// the number of reloads.
const (
	reloadRegistration = "registration" // the registration changed (binds, modes, upstreams)
	reloadChain        = "chain"        // only discovery chains changed (targets, matches, rewrites)
	reloadRoots        = "roots"        // the CA roots changed (no hot CA commit on 2.6)
	reloadListener     = "listener"     // a leaf swap broke the public listener
	reloadAdopted      = "adopted"      // an adopted HAProxy runs another configuration
	reloadOther        = "other"        // a reload planned without a reason name
)

func newMetrics(answerLimit *AnswerLimit) *Metrics {
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
	}
	counterVec := func(name, help string, labels ...string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labels)
	}
	m := &Metrics{
		reloads: counterVec("haproxy_connect_reloads_total",
			"Confirmed HAProxy reloads, by reason: registration, roots, listener (a leaf swap broke the public listener), adopted (an adopted HAProxy ran another configuration), several joined with +.", "reason"),
		reloadFailures: counter("haproxy_connect_reload_failures_total", "Reloads that failed or were not confirmed."),
		adoptions:      counter("haproxy_connect_haproxy_adoptions_total", "Running HAProxy masters adopted at start instead of starting a new one."),
		restarts:       counter("haproxy_connect_haproxy_restarts_total", "HAProxy started again after its master exited unasked (a killed master, or a crashed worker)."),
		leafRotations:  counter("haproxy_connect_leaf_rotations_total", "Leaf certificates swapped through the runtime API."),
		bindChecks: counterVec("haproxy_connect_leaf_bind_checks_total",
			"Handshakes with the public listener after a leaf swap, by result: ok, no_client_cert_request (mutual TLS lost: the sidecar reloads), wrong_leaf (the new leaf not served: it reloads), unreachable.", "result"),
		runtimeCommands:   counter("haproxy_connect_runtime_commands_total", "Runtime commands sent to the master socket."),
		runtimeErrors:     counter("haproxy_connect_runtime_errors_total", "Runtime commands or batches that failed."),
		batches:           counter("haproxy_connect_runtime_batches_total", "Batches of runtime commands sent."),
		endpointUpdates:   counter("haproxy_connect_endpoint_updates_total", "Changed endpoint lists received from Consul."),
		endpointLimitHits: counter("haproxy_connect_endpoint_limit_hits_total", "Endpoint lists cut to the per-upstream limit (-max-endpoints)."),
		answerLimitHits: prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "haproxy_connect_consul_answer_limit_hits_total",
			Help: "Consul answers dropped for exceeding the size limit (-max-answer-bytes)."}, func() float64 {
			if answerLimit == nil {
				return 0
			}
			return float64(answerLimit.Hits())
		}),
		propagation: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "haproxy_connect_endpoint_propagation_seconds",
			Help:    "Time from the Consul answer in which an endpoint joined or left an upstream to HAProxy confirming the runtime batch or reload that put it in or out of service, one sample per endpoint change.",
			Buckets: propagationBuckets[:]}),
		verifications: counterVec("haproxy_connect_upstream_verifications_total",
			"Upstream endpoint identity verifications (own mTLS handshake) by result: ok, mismatch (another service's identity), untrusted (not the mesh's CA, or not one URI SAN), unreachable.", "result"),
		verifyDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "haproxy_connect_upstream_verification_seconds",
			Help:    "Time one upstream endpoint identity verification took (connect and mTLS handshake).",
			Buckets: propagationBuckets[:]}),
		invalidInstances: counterVec("haproxy_connect_invalid_instances_total",
			"Upstream instances dropped because a value Consul served failed its check, by upstream and field (counted once per instance while it stays invalid).", "upstream", "field"),
		mismatches: counterVec("haproxy_connect_upstream_identity_mismatches_total",
			"Verifications in which an endpoint of the upstream showed another identity than its destination's; it gets no traffic. The log line names the instance, address and identity.", "upstream"),
	}
	for _, r := range []string{reloadRegistration, reloadChain, reloadRoots, reloadListener, reloadAdopted} {
		m.reloads.WithLabelValues(r)
	}
	for r := range numBindResults {
		m.bindChecks.WithLabelValues(r.String())
	}
	for _, r := range []string{"ok", "mismatch", "untrusted", "unreachable"} {
		m.verifications.WithLabelValues(r)
	}
	m.upstreams.Store(&[]upstreamGauge{})
	return m
}

func (m *Metrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.reloads, m.reloadFailures, m.adoptions, m.restarts, m.leafRotations, m.bindChecks,
		m.runtimeCommands, m.runtimeErrors, m.batches, m.endpointUpdates, m.endpointLimitHits, m.answerLimitHits,
		m.propagation, m.verifications, m.verifyDuration, m.invalidInstances, m.mismatches}
}

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range m.collectors() {
		c.Describe(ch)
	}
	ch <- endpointsDesc
	ch <- slotsDesc
	ch <- freeSlotsDesc
}

// Collect implements prometheus.Collector.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	for _, c := range m.collectors() {
		c.Collect(ch)
	}
	for _, u := range *m.upstreams.Load() {
		ch <- prometheus.MustNewConstMetric(endpointsDesc, prometheus.GaugeValue, float64(u.endpoints), u.name)
		ch <- prometheus.MustNewConstMetric(slotsDesc, prometheus.GaugeValue, float64(u.slots), u.name)
		ch <- prometheus.MustNewConstMetric(freeSlotsDesc, prometheus.GaugeValue, float64(u.free), u.name)
	}
}

// invalidInstance counts one dropped instance of upstream, for field.
func (m *Metrics) invalidInstance(upstream, field string) {
	m.invalidInstances.WithLabelValues(upstream, field).Inc()
}

// mismatch counts an endpoint of upstream that showed another identity.
// Only the upstream is a label: instance, address and identity come from
// Consul and from certificates, without bound; the log line names them.
func (m *Metrics) mismatch(upstream string) { m.mismatches.WithLabelValues(upstream).Inc() }

// reloaded counts a confirmed reload for reason (a reload* constant, or
// several joined with "+").
func (m *Metrics) reloaded(reason string) {
	if reason == "" {
		reason = reloadOther
	}
	m.reloads.WithLabelValues(reason).Inc()
}

// setEndpoints publishes the used and total slots of tables, the applied
// state. An upstream's mismatch counter exists from then on.
func (m *Metrics) setEndpoints(tables map[string]slots.Table) {
	us := make([]upstreamGauge, 0, len(tables))
	for name, t := range tables {
		m.mismatches.WithLabelValues(name) // at 0 from the start
		us = append(us, upstreamGauge{name: name, endpoints: t.Used(), slots: len(t.Slots), free: len(t.Slots) - t.Used()})
	}
	m.upstreams.Store(&us)
}

// propagationBuckets are the histograms' upper bounds, in seconds: fine
// below 20 ms, where a sidecar's own share at steady churn lies and where
// 1 ms matters to its users, coarse above for bursts.
var propagationBuckets = [...]float64{0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075,
	0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5}
