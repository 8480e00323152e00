package spoa

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metric declarations of the agent. The counts live in the Authorizer
// (atomics on the decision path, see counters); Collector reads them at
// scrape time, so a decision costs no more than it did.
var (
	decisionsDesc = prometheus.NewDesc("haproxy_connect_authz_decisions_total",
		"Connection authorization answers sent to HAProxy, by result: allow, deny, undecided (no verdict: HAProxy refuses the connection and asks again).",
		[]string{"result"}, nil)
	errorsDesc = prometheus.NewDesc("haproxy_connect_authz_errors_total",
		"Refusals caused by a failure (no or bad certificate, decision error or timeout) rather than by an intention.", nil, nil)
	invalidationsDesc = prometheus.NewDesc("haproxy_connect_authz_invalidations_total",
		"Drops of the decision cache (an intentions change).", nil, nil)
	generationDesc = prometheus.NewDesc("haproxy_connect_authz_generation",
		"Current intentions generation (raised by each intentions change).", nil, nil)
	intentionsIndexDesc = prometheus.NewDesc("haproxy_connect_authz_intentions_index",
		"Consul index of the intentions the watch last saw (0 before its first answer).", nil, nil)
	cacheEntriesDesc = prometheus.NewDesc("haproxy_connect_authz_cache_entries",
		"Decisions held in the agent's cache.", nil, nil)
	cacheHitsDesc = prometheus.NewDesc("haproxy_connect_authz_cache_hits_total",
		"Decisions served from the agent's cache.", nil, nil)
	localDecisionsDesc = prometheus.NewDesc("haproxy_connect_authz_local_decisions_total",
		"Decisions made from the intentions held (not from the cache); the agent asks Consul for none.", nil, nil)
	l7RequestsDesc = prometheus.NewDesc("haproxy_connect_authz_l7_requests_total",
		"Requests of sources under L7 intentions decided by the agent, by result (allows HAProxy remembered are not counted).",
		[]string{"result"}, nil)
	refusedDesc = prometheus.NewDesc("haproxy_connect_authz_refused_total",
		"Connections the agent denied from the client certificate alone, by reason: uri_sans (not exactly one URI SAN), not_spiffe, trust_domain (not the cluster's), not_service, chain (does not verify against the CA roots).",
		[]string{"reason"}, nil)
	rememberedCertsDesc = prometheus.NewDesc("haproxy_connect_authz_remembered_certs",
		"Client certificates the agent can decide again for established connections.", nil, nil)
	chainVerificationsDesc = prometheus.NewDesc("haproxy_connect_authz_chain_verifications_total",
		"Client certificate chains the agent verified itself: HAProxy's verification is relied on only while every root HAProxy may hold is one Consul lists.", nil, nil)
	forgottenCertsDesc = prometheus.NewDesc("haproxy_connect_authz_forgotten_certs_total",
		"Client certificates forgotten to stay under the remembered limit; their connections cannot be decided again.", nil, nil)
)

// decisionBuckets span what the agent's answers take: a few microseconds
// from the cache, tens to hundreds for a certificate read and decided
// from the intentions held, milliseconds when it verifies a chain itself
// or asks a Decider.
var decisionBuckets = []float64{
	1e-6, 2.5e-6, 5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
	1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1,
}

// newDecisionTime is one Authorizer's decision-time histogram: an
// Observe is a few atomic adds, cheap enough for every decision.
func newDecisionTime() prometheus.Histogram {
	return prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "haproxy_connect_authz_decision_seconds",
		Help:    "Time the agent took to answer one authorization message (a connection's certificate, or a request under an L7 intention), from reading it to its answer, cached decisions included; HAProxy waits this long plus the SPOE exchange. Messages the agent does not handle are not counted.",
		Buckets: decisionBuckets,
	})
}

// timeDecision records a decision that started at start.
func (a *Authorizer) timeDecision(start time.Time) {
	a.decisionTime.Observe(time.Since(start).Seconds())
}

// Collector returns the agent's metrics, to register on the caller's
// registry.
func (a *Authorizer) Collector() prometheus.Collector { return collector{a} }

type collector struct{ a *Authorizer }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{decisionsDesc, errorsDesc, invalidationsDesc, generationDesc, intentionsIndexDesc,
		cacheEntriesDesc, cacheHitsDesc, localDecisionsDesc, l7RequestsDesc, refusedDesc, rememberedCertsDesc, forgottenCertsDesc, chainVerificationsDesc} {
		ch <- d
	}
	c.a.decisionTime.Describe(ch)
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	s := c.a.Stats()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64) { ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v) }
	counter(decisionsDesc, s.Allowed, "allow")
	counter(decisionsDesc, s.Denied, "deny")
	counter(decisionsDesc, s.Undecided, "undecided")
	counter(errorsDesc, s.Errors)
	counter(invalidationsDesc, s.Invalidations)
	gauge(generationDesc, float64(s.Generation))
	gauge(intentionsIndexDesc, float64(s.IntentionsIndex))
	gauge(cacheEntriesDesc, float64(s.CacheEntries))
	counter(cacheHitsDesc, s.CacheHits)
	counter(localDecisionsDesc, s.LocalDecisions)
	counter(chainVerificationsDesc, s.ChainVerifications)
	counter(l7RequestsDesc, s.L7Allowed, "allow")
	counter(l7RequestsDesc, s.L7Denied, "deny")
	for _, r := range refusals {
		counter(refusedDesc, s.Refused[r.name], r.name)
	}
	n, forgotten := c.a.RememberedCerts()
	gauge(rememberedCertsDesc, float64(n))
	counter(forgottenCertsDesc, forgotten)
	c.a.decisionTime.Collect(ch)
}
