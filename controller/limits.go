package controller

import (
	"cmp"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"net/http"
	"slices"
	"strconv"
	"sync/atomic"

	"go.uber.org/zap"

	"github.com/haproxy-connect/haproxy-connect/slots"
)

// Bounds on what Consul can make the sidecar hold. Consul's answers are
// hostile input: a catalog that lists a million instances of a service, or
// an answer that never ends, must not exhaust the sidecar or HAProxy.
const (
	// DefaultMaxEndpoints bounds the endpoints of one upstream. Each
	// endpoint is a server in HAProxy (a slot, or an "add server"); the
	// largest services of real clusters run in the low thousands of
	// instances, and a client connecting to one does not need more than
	// that many servers to spread its load. 10 000 leaves a wide margin
	// above that, and still bounds HAProxy's memory (a server costs it a
	// few KB) and the size of a rendered config.
	DefaultMaxEndpoints = 10000
	// DefaultMaxAnswerBytes bounds the bytes read from one Consul answer.
	// A health answer carries about 1.8 KB per instance from a dev agent
	// and 0.9 KB from others (see healthReader): 10 000 instances with
	// tags and metadata fit in 64 MiB several times over, while a
	// runaway answer stops there instead of at the sidecar's memory.
	DefaultMaxAnswerBytes = 64 << 20
)

// ErrAnswerTooLarge is wrapped by the error of a Consul answer longer than
// the AnswerLimit. The watch that made the call keeps what it had and
// retries with its backoff.
var ErrAnswerTooLarge = errors.New("consul answer exceeds the size limit")

// AnswerLimit bounds the bytes read from any one Consul HTTP answer, for
// every client whose transport it wraps. It counts and logs each answer it
// cuts.
type AnswerLimit struct {
	max  int64
	log  *zap.Logger
	hits atomic.Uint64
}

// NewAnswerLimit returns a limit of max bytes (DefaultMaxAnswerBytes if
// max <= 0).
func NewAnswerLimit(max int64, log *zap.Logger) *AnswerLimit {
	if max <= 0 {
		max = DefaultMaxAnswerBytes
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &AnswerLimit{max: max, log: log}
}

// Hits is the number of answers cut.
func (l *AnswerLimit) Hits() uint64 { return l.hits.Load() }

// Limit wraps c's transport (idempotent): call it on the http.Client that
// api.NewClient leaves in its Config, which for a unix:// address is one
// it made itself.
func (l *AnswerLimit) Limit(c *http.Client) {
	if c == nil {
		return
	}
	if t, ok := c.Transport.(*limitedTransport); ok && t.l == l {
		return
	}
	base := c.Transport
	if base == nil {
		base = http.DefaultTransport
	}
	c.Transport = &limitedTransport{base: base, l: l}
}

func (l *AnswerLimit) hit(req *http.Request, size string) error {
	l.hits.Add(1)
	l.log.Warn("consul answer too large; dropped, the watch keeps its last state and retries",
		zap.String("path", req.URL.Path), zap.Int64("limit_bytes", l.max), zap.String("size", size))
	return fmt.Errorf("%w: %s from %s (limit %d bytes)", ErrAnswerTooLarge, size, req.URL.Path, l.max)
}

type limitedTransport struct {
	base http.RoundTripper
	l    *AnswerLimit
}

func (t *limitedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(req)
	if err != nil {
		return resp, err
	}
	if resp.ContentLength > t.l.max {
		resp.Body.Close()
		return nil, t.l.hit(req, strconv.FormatInt(resp.ContentLength, 10)+" bytes announced")
	}
	resp.Body = &limitedBody{rc: resp.Body, left: t.l.max, req: req, l: t.l}
	return resp, nil
}

// limitedBody fails the read that would take the answer past the limit,
// rather than truncating it: a truncated JSON list could still parse.
type limitedBody struct {
	rc   io.ReadCloser
	left int64
	req  *http.Request
	l    *AnswerLimit
	err  error
}

func (b *limitedBody) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	if int64(len(p)) > b.left+1 {
		p = p[:b.left+1]
	}
	n, err := b.rc.Read(p)
	if int64(n) > b.left {
		b.err = b.l.hit(b.req, "more than the limit")
		return 0, b.err
	}
	b.left -= int64(n)
	return n, err
}

func (b *limitedBody) Close() error { return b.rc.Close() }

// capEndpoints keeps at most max of eps, chosen by rendezvous hashing on
// (proxyID, endpoint): each endpoint's score is a hash of the two, and the
// max highest scores stay. The choice is stable (the same list gives the
// same subset; an endpoint leaves the subset only when one with a higher
// score arrives, so churn moves few slots), and differs from one sidecar to
// the next, so the clients of a huge service spread over all of it instead
// of all using its lowest addresses. The result is in eps's order.
func capEndpoints(eps []slots.Endpoint, max int, proxyID string) []slots.Endpoint {
	if max <= 0 || len(eps) <= max {
		return eps
	}
	type scored struct {
		score uint64
		i     int
	}
	s := make([]scored, len(eps))
	for i, e := range eps {
		h := fnv.New64a()
		io.WriteString(h, proxyID)
		h.Write([]byte{0})
		io.WriteString(h, e.Key())
		s[i] = scored{h.Sum64(), i}
	}
	slices.SortFunc(s, func(a, b scored) int {
		if a.score != b.score {
			return cmp.Compare(b.score, a.score) // highest first
		}
		return a.i - b.i
	})
	keep := make([]int, max)
	for i := range keep {
		keep[i] = s[i].i
	}
	slices.Sort(keep)
	out := make([]slots.Endpoint, max)
	for i, k := range keep {
		out[i] = eps[k]
	}
	return out
}
