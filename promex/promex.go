// Package promex reads HAProxy's built-in Prometheus exporter (the
// prometheus-exporter service, built in with USE_PROMEX, as Debian's 2.6
// is) from a unix socket, as a prometheus.Gatherer: the sidecar's
// /metrics serves its series beside the controller's, one scrape target.
// It owns the reading, not the HAProxy configuration (package bootstrap
// renders the exporter's frontend).
package promex

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/url"
	"time"

	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/scrape"
)

// Scopes are the exporter's scopes read by default: the process, the
// frontends and the backends (one per upstream, labelled proxy="up_...").
// Not "server": one series set per slot (about 60 series each, for every
// free slot too) would make the scrape grow with the slot count, and the
// per-endpoint view is "haproxy-connect status".
var Scopes = []string{"global", "frontend", "backend"}

// Timeout bounds one read of the exporter; a scrape must not hang on a
// busy or stopping HAProxy.
const Timeout = 5 * time.Second

// Gatherer reads the exporter at a unix socket.
type Gatherer struct {
	url    string
	client *http.Client
	log    *zap.Logger
}

// New returns a Gatherer for the exporter at socket, reading scopes
// (Scopes when none); log receives the reasons a read failed.
func New(socket string, log *zap.Logger, scopes ...string) *Gatherer {
	if len(scopes) == 0 {
		scopes = Scopes
	}
	q := url.Values{"scope": scopes}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		// A connection per read: a kept one would stay with a worker
		// that a reload stops, which serves its own, older, counters.
		DisableKeepAlives: true,
	}
	return &Gatherer{url: "http://haproxy/metrics?" + q.Encode(), client: &http.Client{Transport: tr, Timeout: Timeout}, log: log}
}

// Gather implements prometheus.Gatherer. Beside HAProxy's families it
// returns haproxy_connect_haproxy_exporter_up, 1 when the exporter
// answered. When it did not, Gather returns that alone and no error, so
// that the controller's series are served in full while HAProxy starts
// or restarts; the reason goes to the log (debug when nothing listens,
// warn otherwise).
func (g *Gatherer) Gather() ([]*dto.MetricFamily, error) {
	fams, err := scrape.Get(context.Background(), g.client, g.url)
	up := 1.0
	if err != nil {
		up = 0
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			g.log.Debug("haproxy's prometheus exporter not reachable", zap.Error(err))
		} else {
			g.log.Warn("haproxy's prometheus exporter not read", zap.Error(err))
		}
	}
	name, help, typ := UpMetric, upHelp, dto.MetricType_GAUGE
	out := []*dto.MetricFamily{{Name: &name, Help: &help, Type: &typ, Metric: []*dto.Metric{{Gauge: &dto.Gauge{Value: &up}}}}}
	for _, f := range fams {
		out = append(out, f)
	}
	return out, nil
}

// UpMetric is the gauge that says whether the exporter answered.
const UpMetric = "haproxy_connect_haproxy_exporter_up"

const upHelp = "1 when HAProxy's Prometheus exporter answered this scrape, 0 when it did not (HAProxy not running, or starting): its haproxy_* series are missing then."
