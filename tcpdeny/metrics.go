package tcpdeny

import "github.com/prometheus/client_golang/prometheus"

// Metric declarations of the sweeper. The counts live in the Sweeper
// (atomics, see Stats); Collector reads them at scrape time.
var (
	closedDesc = prometheus.NewDesc("haproxy_connect_authz_tcp_closed_total",
		"Established tcp connections closed because an intentions change denies their source.", nil, nil)
	leftOpenDesc = prometheus.NewDesc("haproxy_connect_authz_tcp_left_open_total",
		"Established tcp connections an intentions change could not decide again, left open, by reason: unknown_certificate (the agent does not know it), undecided.",
		[]string{"reason"}, nil)
	sweepsDesc = prometheus.NewDesc("haproxy_connect_authz_tcp_sweeps_total",
		"Passes over the tcp listener's established connections after an intentions change.", nil, nil)
	sweepFailuresDesc = prometheus.NewDesc("haproxy_connect_authz_tcp_sweep_failures_total",
		"Passes over the tcp listener's established connections that failed.", nil, nil)
)

// Collector returns the sweeper's metrics, to register on the caller's
// registry.
func (s *Sweeper) Collector() prometheus.Collector { return collector{s} }

type collector struct{ s *Sweeper }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- closedDesc
	ch <- leftOpenDesc
	ch <- sweepsDesc
	ch <- sweepFailuresDesc
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	st := c.s.Stats()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	counter(closedDesc, st.Closed)
	counter(leftOpenDesc, st.Unknown, "unknown_certificate")
	counter(leftOpenDesc, st.Undecided, "undecided")
	counter(sweepsDesc, st.Sweeps)
	counter(sweepFailuresDesc, st.Failures)
}
