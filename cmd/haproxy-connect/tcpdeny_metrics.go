package main

import (
	"fmt"
	"io"

	"github.com/haproxy-connect/haproxy-connect/spoa"
	"github.com/haproxy-connect/haproxy-connect/tcpdeny"
)

// writeTCPDenyMetrics writes the counters of the deny that reaches
// established tcp connections (package tcpdeny).
func writeTCPDenyMetrics(w io.Writer, auth *spoa.Authorizer, sweeper *tcpdeny.Sweeper) {
	st := sweeper.Stats()
	certs, forgotten := auth.RememberedCerts()
	fmt.Fprintf(w, "# HELP haproxy_connect_authz_tcp_closed_total Established tcp connections closed because an intentions change denies their source.\n")
	fmt.Fprintf(w, "# TYPE haproxy_connect_authz_tcp_closed_total counter\nhaproxy_connect_authz_tcp_closed_total %d\n", st.Closed)
	fmt.Fprintf(w, "# HELP haproxy_connect_authz_tcp_left_open_total Established tcp connections an intentions change could not decide again (certificate unknown to the agent, or no decision), left open.\n")
	fmt.Fprintf(w, "# TYPE haproxy_connect_authz_tcp_left_open_total counter\n")
	fmt.Fprintf(w, "haproxy_connect_authz_tcp_left_open_total{reason=\"unknown_certificate\"} %d\n", st.Unknown)
	fmt.Fprintf(w, "haproxy_connect_authz_tcp_left_open_total{reason=\"undecided\"} %d\n", st.Undecided)
	fmt.Fprintf(w, "# HELP haproxy_connect_authz_tcp_sweeps_total Passes over the tcp listener's established connections, and those that failed.\n")
	fmt.Fprintf(w, "# TYPE haproxy_connect_authz_tcp_sweeps_total counter\nhaproxy_connect_authz_tcp_sweeps_total %d\n", st.Sweeps)
	fmt.Fprintf(w, "# TYPE haproxy_connect_authz_tcp_sweep_failures_total counter\nhaproxy_connect_authz_tcp_sweep_failures_total %d\n", st.Failures)
	fmt.Fprintf(w, "# HELP haproxy_connect_authz_remembered_certs Client certificates the agent can decide again for established connections.\n")
	fmt.Fprintf(w, "# TYPE haproxy_connect_authz_remembered_certs gauge\nhaproxy_connect_authz_remembered_certs %d\n", certs)
	fmt.Fprintf(w, "# TYPE haproxy_connect_authz_forgotten_certs_total counter\nhaproxy_connect_authz_forgotten_certs_total %d\n", forgotten)
}
