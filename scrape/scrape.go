// Package scrape reads metrics served in Prometheus's text exposition
// format (a sidecar's /metrics, HAProxy's exporter) into metric families
// with expfmt, and looks samples up in them. It declares no metric: the
// packages that own one declare it with client_golang.
package scrape

import (
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"slices"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Families are parsed metric families by name.
type Families map[string]*dto.MetricFamily

// Parse reads a text exposition. Names must be classic Prometheus names
// (letters, digits, underscores, colons), as everything this project and
// HAProxy serve is.
func Parse(r io.Reader) (Families, error) {
	p := expfmt.NewTextParser(model.LegacyValidation)
	f, err := p.TextToMetricFamilies(r)
	if err != nil {
		return nil, fmt.Errorf("parse metrics: %w", err)
	}
	return f, nil
}

// Get fetches url with c, asking for the text format, and parses the
// answer.
func Get(ctx context.Context, c *http.Client, url string) (Families, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", string(expfmt.NewFormat(expfmt.TypeTextPlain)))
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("get %s: %s", url, resp.Status)
	}
	return Parse(resp.Body)
}

// Value returns the value of the one sample of family name whose labels
// are exactly labels, given as name, value pairs. For a histogram or a
// summary, name may end in "_sum" or "_count" for those samples.
func (f Families) Value(name string, labels ...string) (float64, error) {
	if len(labels)%2 != 0 {
		return 0, fmt.Errorf("metric %s: labels %q are not name, value pairs", name, labels)
	}
	fam, part := f.family(name)
	if fam == nil {
		return 0, fmt.Errorf("no metric %s", name)
	}
	for _, m := range fam.GetMetric() {
		if !sameLabels(m.GetLabel(), labels) {
			continue
		}
		v, ok := value(fam.GetType(), m, part)
		if !ok {
			return 0, fmt.Errorf("metric %s is a %s", name, strings.ToLower(fam.GetType().String()))
		}
		return v, nil
	}
	return 0, fmt.Errorf("no sample %s%s", name, selector(labels))
}

// Sum adds the values of every sample of counter or gauge family name.
func (f Families) Sum(name string) (float64, error) {
	fam := f[name]
	if fam == nil {
		return 0, fmt.Errorf("no metric %s", name)
	}
	var sum float64
	for _, m := range fam.GetMetric() {
		v, ok := value(fam.GetType(), m, "")
		if !ok {
			return 0, fmt.Errorf("metric %s is a %s", name, strings.ToLower(fam.GetType().String()))
		}
		sum += v
	}
	return sum, nil
}

// Bucket is one cumulative histogram bucket.
type Bucket struct {
	UpperBound float64 // seconds or whatever the histogram counts; +Inf last
	Count      float64 // samples at or below UpperBound
}

// Histogram returns the buckets of the unlabelled histogram name, upper
// bounds ascending, ending with +Inf.
func (f Families) Histogram(name string) ([]Bucket, error) {
	fam := f[name]
	if fam == nil {
		return nil, fmt.Errorf("no metric %s", name)
	}
	if fam.GetType() != dto.MetricType_HISTOGRAM || len(fam.GetMetric()) != 1 {
		return nil, fmt.Errorf("metric %s: want one histogram, have %d %s samples", name, len(fam.GetMetric()), fam.GetType())
	}
	h := fam.GetMetric()[0].GetHistogram()
	out := make([]Bucket, 0, len(h.GetBucket())+1)
	for _, b := range h.GetBucket() {
		out = append(out, Bucket{UpperBound: b.GetUpperBound(), Count: float64(b.GetCumulativeCount())})
	}
	// The text parser keeps the +Inf bucket; client_golang's own
	// families leave it implicit in the sample count.
	if len(out) == 0 || !math.IsInf(out[len(out)-1].UpperBound, 1) {
		out = append(out, Bucket{UpperBound: math.Inf(1), Count: float64(h.GetSampleCount())})
	}
	if !slices.IsSortedFunc(out, func(a, b Bucket) int { return cmpFloat(a.UpperBound, b.UpperBound) }) {
		return nil, fmt.Errorf("metric %s: buckets out of order", name)
	}
	return out, nil
}

func cmpFloat(a, b float64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// family finds name, or the histogram or summary whose _sum or _count it
// is.
func (f Families) family(name string) (*dto.MetricFamily, string) {
	if fam := f[name]; fam != nil {
		return fam, ""
	}
	for _, suffix := range []string{"_sum", "_count"} {
		base, ok := strings.CutSuffix(name, suffix)
		if fam := f[base]; ok && fam != nil {
			if t := fam.GetType(); t == dto.MetricType_HISTOGRAM || t == dto.MetricType_SUMMARY {
				return fam, suffix
			}
		}
	}
	return nil, ""
}

func value(t dto.MetricType, m *dto.Metric, part string) (float64, bool) {
	switch {
	case part == "" && t == dto.MetricType_COUNTER:
		return m.GetCounter().GetValue(), true
	case part == "" && t == dto.MetricType_GAUGE:
		return m.GetGauge().GetValue(), true
	case part == "" && t == dto.MetricType_UNTYPED:
		return m.GetUntyped().GetValue(), true
	case part == "_sum" && t == dto.MetricType_HISTOGRAM:
		return m.GetHistogram().GetSampleSum(), true
	case part == "_count" && t == dto.MetricType_HISTOGRAM:
		return float64(m.GetHistogram().GetSampleCount()), true
	case part == "_sum" && t == dto.MetricType_SUMMARY:
		return m.GetSummary().GetSampleSum(), true
	case part == "_count" && t == dto.MetricType_SUMMARY:
		return float64(m.GetSummary().GetSampleCount()), true
	}
	return 0, false
}

// sameLabels reports whether have is exactly the pairs of want.
func sameLabels(have []*dto.LabelPair, want []string) bool {
	if len(have) != len(want)/2 {
		return false
	}
	for i := 0; i < len(want); i += 2 {
		if !slices.ContainsFunc(have, func(l *dto.LabelPair) bool { return l.GetName() == want[i] && l.GetValue() == want[i+1] }) {
			return false
		}
	}
	return true
}

func selector(labels []string) string {
	if len(labels) == 0 {
		return ""
	}
	parts := make([]string, 0, len(labels)/2)
	for i := 0; i+1 < len(labels); i += 2 {
		parts = append(parts, fmt.Sprintf("%s=%q", labels[i], labels[i+1]))
	}
	return "{" + strings.Join(parts, ",") + "}"
}

// Gather collects g (a registry, or a collector registered on a new
// one) into Families.
func Gather(g prometheus.Gatherer) (Families, error) {
	mfs, err := g.Gather()
	if err != nil {
		return nil, err
	}
	f := make(Families, len(mfs))
	for _, mf := range mfs {
		f[mf.GetName()] = mf
	}
	return f, nil
}
