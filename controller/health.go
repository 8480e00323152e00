package controller

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/valyala/fastjson"
)

// healthReader runs the upstream watches' blocking queries on
// /v1/health/connect/<service> itself, instead of through api's
// Health().Connect, for one reason: every answer carries the whole instance
// list (about 1.8 KB per instance from an agent in dev mode, 0.9 KB from
// others), once per change, and api decodes all of it into ServiceEntry
// values with encoding/json. That decode was 90 % of the sidecar's CPU under
// churn (meshbench churn -profile). Here an answer is parsed as it is read,
// one instance at a time, with a pooled scanner and parser, keeping only
// the fields the sidecar uses: BenchmarkHealthDecode compares both on a
// real answer of Consul's. Pooled, not one per watch: a parser keeps what
// it parsed until its next parse, and 50 idle watches each holding theirs
// doubled the sidecar's peak RSS (meshbench footprint).
type healthReader struct {
	client   *http.Client
	base     url.URL // scheme, host and path prefix of the agent
	token    string
	params   url.Values // dc, ns, partition from the client configuration
	parsers  fastjson.ParserPool
	scanners sync.Pool // *elementScanner
	// filtered, when set, learns per answer whether Consul left
	// instances out because the token may not read them
	// (X-Consul-Results-Filtered-By-ACLs): the only sign of a token that
	// lacks read on an upstream's proxies or nodes, whose upstream then
	// looks empty.
	filtered func(service string, filtered bool)
}

// newHealthReader takes the configuration api.NewClient has normalised (it
// resolves unix:// addresses, TLS and the token file in place).
func newHealthReader(cfg *api.Config) *healthReader {
	h := &healthReader{client: cfg.HttpClient, token: cfg.Token, params: url.Values{},
		base: url.URL{Scheme: cfg.Scheme, Host: cfg.Address, Path: cfg.PathPrefix}}
	if h.client == nil {
		h.client = http.DefaultClient
	}
	if h.base.Scheme == "" {
		h.base.Scheme = "http"
	}
	for k, v := range map[string]string{"dc": cfg.Datacenter, "ns": cfg.Namespace, "partition": cfg.Partition} {
		if v != "" {
			h.params.Set(k, v)
		}
	}
	return h
}

// healthEntry is what the sidecar uses of one instance in a health answer.
type healthEntry struct {
	ID          string // service ID, for logs
	Address     string // service address; may be empty
	NodeAddress string // the node's address, used when Address is empty
	Port        int
	Weight      int // Weights.Passing; 0 when absent
	// The instance's worst check status (node and service checks), and
	// its Weights.Warning.
	Warning, Critical bool
	WarningWeight     int
}

// addr is the instance's address: the service's, else its node's.
func (e healthEntry) addr() string {
	if e.Address != "" {
		return e.Address
	}
	return e.NodeAddress
}

// healthAnswer is one answer of an upstream's health query.
type healthAnswer struct {
	// usable are the instances that take traffic, with the weight they
	// take it at.
	usable []healthEntry
	// standby are the instances listed whose checks keep them out of
	// traffic for now (critical, or a warning where only passing ones
	// serve): the sidecar proves their identity ahead, so that a check
	// turning passing places one at once (identity.go).
	standby []healthEntry
	bad     []error // the entries it could not read, each naming it
	index   uint64  // X-Consul-Index
	at      time.Time
}

// connect runs one blocking query for the passing Connect-capable
// instances of service from index, waiting at most wait. It returns the
// entries, the entries it could not read (each as an error naming it), the
// answer's X-Consul-Index and when the answer arrived.
func (h *healthReader) connect(ctx context.Context, service, dc string, index uint64, wait time.Duration) (entries []healthEntry, bad []error, next uint64, at time.Time, err error) {
	a, err := h.connectFiltered(ctx, service, dc, "", true, index, wait)
	return a.usable, a.bad, a.index, a.at, err
}

// connectFiltered runs one blocking query for the Connect-capable
// instances of service from index, waiting at most wait, with a Consul
// filter expression (a service-resolver subset's), sent URL-encoded, when
// filter is set. With onlyPassing, Consul answers the passing ones only
// ("passing"). With onlyPassing false (a resolver subset's OnlyPassing =
// false, Consul's default for a chain target), instances whose worst
// check is a warning are usable too, as Envoy gets them: critical ones are
// not (maintenance is a critical check), and warning ones take their
// Weights.Warning, as Consul does for Envoy's endpoints; the others are
// standby.
func (h *healthReader) connectFiltered(ctx context.Context, service, dc, filter string, onlyPassing bool, index uint64, wait time.Duration) (healthAnswer, error) {
	entries, bad, next, at, err := h.query(ctx, service, dc, filter, onlyPassing, index, wait)
	return answer(entries, bad, next, at, err, onlyPassing)
}

// notAllPassing is Consul's filter for the instances "passing" leaves out:
// on a list of checks, != holds when any one differs.
const notAllPassing = `Checks.Status != "passing"`

// standby asks for the instances of service that are listed but not
// usable (connectFiltered): those with a check that does not pass,
// filtered by Consul, so that the answer carries them alone; it does not
// block. The sidecar proves them ahead (standby.go).
func (h *healthReader) standby(ctx context.Context, service, dc string, onlyPassing bool) (healthAnswer, error) {
	entries, bad, next, at, err := h.query(ctx, service, dc, notAllPassing, false, 0, 0)
	a, err := answer(entries, bad, next, at, err, onlyPassing)
	a.usable = nil
	return a, err
}

// answer is a query's result as an answer for onlyPassing.
func answer(entries []healthEntry, bad []error, next uint64, at time.Time, err error, onlyPassing bool) (healthAnswer, error) {
	if err != nil {
		return healthAnswer{at: at}, err
	}
	a := healthAnswer{bad: bad, index: next, at: at}
	a.usable, a.standby = split(entries, onlyPassing)
	return a, nil
}

// query runs the health query and reads its answer; with passing, Consul
// leaves out every instance with a check that does not pass.
func (h *healthReader) query(ctx context.Context, service, dc, filter string, passing bool, index uint64, wait time.Duration) (entries []healthEntry, bad []error, next uint64, at time.Time, err error) {
	u := h.base
	u.Path = strings.TrimSuffix(u.Path, "/") + "/v1/health/connect/" + url.PathEscape(service)
	params := url.Values{}
	if passing {
		params.Set("passing", "1")
	}
	for k, v := range h.params {
		params[k] = v
	}
	if dc != "" {
		params.Set("dc", dc)
	}
	if filter != "" {
		params.Set("filter", filter)
	}
	if index > 0 {
		params.Set("index", strconv.FormatUint(index, 10))
		params.Set("wait", strconv.FormatInt(wait.Milliseconds(), 10)+"ms")
	}
	u.RawQuery = params.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "/", nil)
	if err != nil {
		return nil, nil, 0, time.Time{}, err
	}
	// Set, not parsed: for a unix socket the host is the socket's path, as
	// api does it.
	req.URL, req.Host = &u, u.Host
	if h.token != "" {
		req.Header.Set("X-Consul-Token", h.token)
	}
	// Plain on the wire: compressing hundreds of KB per change costs both
	// ends CPU for nothing on loopback (meshbench churn).
	req.Header.Set("Accept-Encoding", "identity")
	resp, err := h.client.Do(req)
	if err != nil {
		return nil, nil, 0, time.Time{}, err
	}
	defer resp.Body.Close()
	at = time.Now()
	if resp.StatusCode != http.StatusOK {
		// The start of Consul's error text is enough to say what it was.
		b, rerr := io.ReadAll(io.LimitReader(resp.Body, 512))
		if rerr != nil {
			return nil, nil, 0, at, fmt.Errorf("health of %s: Consul answered %s, and reading its answer failed: %w", service, resp.Status, rerr)
		}
		msg := strings.TrimSpace(string(b))
		if len(msg) > 200 {
			msg = msg[:200] + "..."
		}
		return nil, nil, 0, at, fmt.Errorf("health of %s: Consul answered %s: %s", service, resp.Status, msg)
	}
	if h.filtered != nil {
		h.filtered(service, resp.Header.Get("X-Consul-Results-Filtered-By-ACLs") == "true")
	}
	next, err = strconv.ParseUint(resp.Header.Get("X-Consul-Index"), 10, 64)
	if err != nil || next == 0 {
		return nil, nil, 0, at, fmt.Errorf("health of %s: answer without a valid X-Consul-Index (%q)", service, resp.Header.Get("X-Consul-Index"))
	}
	entries, bad, err = h.parseEntriesFrom(resp.Body)
	if err != nil {
		return nil, nil, 0, at, fmt.Errorf("health of %s: %w", service, err)
	}
	return entries, bad, next, at, nil
}

// split sorts entries into the usable ones and the standby (see
// connectFiltered). A usable entry's Weight is the one it serves at.
// It reuses entries' backing array for usable.
func split(entries []healthEntry, onlyPassing bool) (usable, standby []healthEntry) {
	usable = entries[:0]
	for _, e := range entries {
		switch {
		case !e.Warning && !e.Critical:
		case onlyPassing || e.Critical || e.WarningWeight < 1:
			// A warning weight of 0 takes the instance out, as Consul
			// marks it unhealthy for Envoy.
			standby = append(standby, e)
			continue
		default:
			e.Weight = e.WarningWeight
		}
		usable = append(usable, e)
	}
	return usable, standby
}

// parseEntriesFrom reads a health answer from r as it arrives: a JSON
// array of {Node, Service, Checks}. An answer that is not an array is an
// error; an entry that lacks a field the sidecar needs, or has it with the
// wrong type, is returned in bad and the others are kept. It reads each
// entry's checks and warning weight too.
//
// The answer is never held whole. An answer carries every instance (about
// 2 MB for a thousand), once per change: buffering it made a buffer that
// grew by doubling on every answer, most of the garbage the sidecar made
// under churn and so most of its heap (meshbench scale). Here one chunk
// of the stream and one entry are held at a time, and each entry is parsed
// alone: fastjson keeps every value it parsed until its next parse, so a
// parser holds one instance's values.
func (h *healthReader) parseEntriesFrom(r io.Reader) (entries []healthEntry, bad []error, err error) {
	p := h.parsers.Get()
	defer h.parsers.Put(p)
	s, _ := h.scanners.Get().(*elementScanner)
	if s == nil {
		s = &elementScanner{buf: make([]byte, scanChunk)}
	}
	defer func() { s.r = nil; h.scanners.Put(s) }()
	s.reset(r)
	// Each entry is parsed as the one element of an array, as it sits in
	// the answer: fastjson reads a value at the top level more loosely
	// than inside an array ("+" is a number there), and counts nesting
	// from the top.
	err = s.each(func(i int, elem []byte) error {
		v, err := p.ParseBytes(elem)
		if err != nil {
			return fmt.Errorf("answer is not JSON: %w", err)
		}
		list := v.GetArray()
		if len(list) != 1 {
			return fmt.Errorf("answer is not JSON: element %d holds %d values", i, len(list))
		}
		e := list[0]
		he, err := readHealthEntry(e)
		if err == nil {
			err = readChecks(e, &he)
		}
		if err != nil {
			bad = append(bad, &entryError{Index: i, ID: he.ID, Err: err})
			return nil
		}
		entries = append(entries, he)
		return nil
	})
	var notArray *notArrayError
	if errors.As(err, &notArray) {
		// Say whether the answer is JSON at all, as a whole parse would:
		// an answer that is not an array is refused anyway, so the start
		// of it is read whole for the message.
		rest, rerr := io.ReadAll(io.LimitReader(r, int64(maxNotArray+1-len(notArray.start))))
		if rerr != nil {
			return nil, nil, fmt.Errorf("reading the answer: %w", rerr)
		}
		whole := append(notArray.start, rest...)
		if len(whole) > maxNotArray {
			return nil, nil, fmt.Errorf("answer is not a JSON array: it starts with %q", tail(whole))
		}
		if _, perr := p.ParseBytes(whole); perr != nil {
			return nil, nil, fmt.Errorf("answer is not JSON: %w", perr)
		}
		return nil, nil, fmt.Errorf("answer is not a JSON array: %w", errNotArray)
	}
	if err != nil {
		return nil, nil, err
	}
	if entries == nil {
		entries = []healthEntry{}
	}
	return entries, bad, nil
}

var (
	errNotArray  = errors.New("value doesn't contain array")
	errNotClosed = errors.New("answer is not JSON: the array is not closed")
)

// notArrayError is an answer that does not start with '['; start is what
// was read of it.
type notArrayError struct{ start []byte }

func (e *notArrayError) Error() string { return errNotArray.Error() }

// maxNotArray bounds what is read of an answer that is not an array, to
// say whether it is JSON.
const maxNotArray = 1 << 20

// scanChunk is how much of an answer is read at a time.
const scanChunk = 32 << 10

// elementScanner reads a JSON array from a stream one element at a time.
// It checks only the array's own shape (brackets, commas, whitespace,
// nothing after it); each element is whole JSON once its caller has parsed
// it (as the one element of an array: an element never holds more than
// one value): strings are skipped with their escapes, and nesting is
// followed by brackets alone.
type elementScanner struct {
	r        io.Reader
	buf      []byte // the chunk being read: buf[pos:end] is unread
	pos, end int
	err      error  // the reader's error once it has returned one; io.EOF at the end
	elem     []byte // the current element, wrapped in brackets
}

func (s *elementScanner) reset(r io.Reader) {
	s.r, s.pos, s.end, s.err, s.elem = r, 0, 0, nil, s.elem[:0]
}

// fill reads the next chunk when the current one is used up; false when
// nothing is left (s.err says why).
func (s *elementScanner) fill() bool {
	for s.pos == s.end {
		if s.err != nil {
			return false
		}
		var n int
		n, s.err = s.r.Read(s.buf)
		s.pos, s.end = 0, n
	}
	return true
}

// readErr is the reader's error when it is not the end of the answer.
func (s *elementScanner) readErr() error {
	if s.err != nil && s.err != io.EOF {
		return fmt.Errorf("reading the answer: %w", s.err)
	}
	return nil
}

// atEnd is the error of an answer that ended where something was still
// due: the reader's own error when a read failed, else err.
func (s *elementScanner) atEnd(err error) error {
	if rerr := s.readErr(); rerr != nil {
		return rerr
	}
	return err
}

// skipSpace skips JSON whitespace and says whether anything follows.
func (s *elementScanner) skipSpace() bool {
	for s.fill() {
		for ; s.pos < s.end; s.pos++ {
			switch s.buf[s.pos] {
			case ' ', '\t', '\n', '\r':
			default:
				return true
			}
		}
	}
	return false
}

// each calls fn with each element of the array, wrapped in brackets for
// fastjson to parse, and stops at fn's first error. elem is only valid
// during the call. A stream that does not start with an array is a
// *notArrayError.
func (s *elementScanner) each(fn func(i int, elem []byte) error) error {
	if !s.skipSpace() {
		return s.atEnd(&notArrayError{})
	}
	if s.buf[s.pos] != '[' {
		start := append([]byte(nil), s.buf[s.pos:s.end]...)
		s.pos = s.end
		return &notArrayError{start: start}
	}
	s.pos++
	if !s.skipSpace() {
		return s.atEnd(errNotClosed)
	}
	if s.buf[s.pos] == ']' {
		s.pos++
		return s.closed()
	}
	for i := 0; ; i++ {
		if err := s.element(); err != nil {
			return fmt.Errorf("answer is not JSON: element %d: %w", i, err)
		}
		if err := fn(i, s.elem); err != nil {
			return err
		}
		if !s.skipSpace() {
			return s.atEnd(errNotClosed)
		}
		switch c := s.buf[s.pos]; c {
		case ',':
			s.pos++
			if !s.skipSpace() {
				return s.atEnd(fmt.Errorf("answer is not JSON: element %d: missing value", i+1))
			}
		case ']':
			s.pos++
			return s.closed()
		default:
			return fmt.Errorf("answer is not JSON: %q after element %d", s.tail(), i)
		}
	}
}

// closed checks that nothing but whitespace follows the closing bracket.
func (s *elementScanner) closed() error {
	if s.skipSpace() {
		return fmt.Errorf("answer is not JSON: unexpected tail after the array: %q", s.tail())
	}
	return s.readErr()
}

// tail is the start of what is unread, for an error message.
func (s *elementScanner) tail() string { return tail(s.buf[s.pos:s.end]) }

// tail is the start of b, for an error message.
func tail(b []byte) string {
	if len(b) > 20 {
		return string(b[:20]) + "..."
	}
	return string(b)
}

// element reads the JSON value that starts at the next unread byte (not
// whitespace) into s.elem, in brackets: up to its closing bracket or
// quote, or, for a scalar, up to the next comma, bracket or whitespace,
// which is left unread.
func (s *elementScanner) element() error {
	s.elem = append(s.elem[:0], '[')
	depth, inString, escaped, n := 0, false, false, 0
	for s.fill() {
		chunk := s.buf[s.pos:s.end]
		end := -1 // the element ends before chunk[end]
	scan:
		for j := 0; j < len(chunk); j++ {
			if inString {
				// To the closing quote: the next one not after a
				// backslash (an escape skips the byte after it, which
				// may be in the next chunk).
				for ; j < len(chunk); j++ {
					if escaped {
						escaped = false
					} else if c := chunk[j]; c == '\\' {
						escaped = true
					} else if c == '"' {
						break
					}
				}
				if j == len(chunk) {
					break
				}
				inString = false
				if depth == 0 {
					end = j + 1
					break scan
				}
				continue
			}
			c := chunk[j]
			if !structural[c] {
				continue
			}
			switch c {
			case '"':
				inString = true
			case '{', '[':
				depth++
			case '}', ']':
				if depth == 0 {
					if n+j == 0 {
						return fmt.Errorf("unexpected %q", c)
					}
					end = j
					break scan
				}
				depth--
				if depth == 0 {
					end = j + 1
					break scan
				}
			default: // a comma or whitespace
				if depth == 0 {
					if n+j == 0 {
						return fmt.Errorf("unexpected %q", c)
					}
					end = j
					break scan
				}
			}
		}
		if end >= 0 {
			s.elem = append(append(s.elem, chunk[:end]...), ']')
			s.pos += end
			return nil
		}
		s.elem = append(s.elem, chunk...)
		n += len(chunk)
		s.pos = s.end
	}
	if err := s.readErr(); err != nil {
		return err
	}
	switch {
	case inString:
		return errors.New("unexpected end in a string")
	case n == 0:
		return errors.New("missing value")
	case depth == 0:
		s.elem = append(s.elem, ']')
		return nil
	}
	return errors.New("unexpected end")
}

// structural are the bytes element stops at outside strings.
var structural = func() (t [256]bool) {
	for _, c := range []byte("\"{}[], \t\n\r") {
		t[c] = true
	}
	return t
}()

// entryError is an instance of a health answer that could not be read: a
// field the sidecar needs is missing or of the wrong type. ID is the
// instance's service ID when it could be read.
type entryError struct {
	Index int
	ID    string
	Err   error
}

func (e *entryError) Error() string { return fmt.Sprintf("instance %d (%s): %v", e.Index, e.ID, e.Err) }
func (e *entryError) Unwrap() error { return e.Err }

func readHealthEntry(e *fastjson.Value) (healthEntry, error) {
	var he healthEntry
	svc := e.Get("Service")
	if svc == nil || svc.Type() != fastjson.TypeObject {
		return he, errors.New("no Service object")
	}
	var err error
	if he.ID, err = optString(svc, "ID"); err != nil {
		return he, err
	}
	if he.Address, err = optString(svc, "Address"); err != nil {
		return he, err
	}
	if node := e.Get("Node"); node != nil && node.Type() == fastjson.TypeObject {
		if he.NodeAddress, err = optString(node, "Address"); err != nil {
			return he, fmt.Errorf("Node.%w", err)
		}
	}
	// Consul leaves a zero port out of its answer (an instance with a
	// socket path has none): absent is 0, which the endpoint check refuses
	// as a port.
	if port := svc.Get("Port"); port != nil {
		if he.Port, err = port.Int(); err != nil {
			return he, fmt.Errorf("Service.Port: %w", err)
		}
	}
	if w := svc.Get("Weights", "Passing"); w != nil && w.Type() != fastjson.TypeNull {
		if he.Weight, err = w.Int(); err != nil {
			return he, fmt.Errorf("Service.Weights.Passing: %w", err)
		}
	}
	return he, nil
}

// readChecks reads an entry's worst check status (node and service
// checks: Consul's aggregate) and its Weights.Warning. A status other
// than passing, warning and critical (maintenance is critical) counts as
// critical: unknown is not usable.
func readChecks(e *fastjson.Value, he *healthEntry) error {
	if checks := e.Get("Checks"); checks != nil && checks.Type() != fastjson.TypeNull {
		list, err := checks.Array()
		if err != nil {
			return fmt.Errorf("field Checks: %w", err)
		}
		for _, c := range list {
			st, err := optString(c, "Status")
			if err != nil {
				return fmt.Errorf("Checks.%w", err)
			}
			switch st {
			case api.HealthPassing:
			case api.HealthWarning:
				he.Warning = true
			default:
				he.Critical = true
			}
		}
	}
	he.WarningWeight = 1 // Consul's default
	if w := e.Get("Service", "Weights", "Warning"); w != nil && w.Type() != fastjson.TypeNull {
		var err error
		if he.WarningWeight, err = w.Int(); err != nil {
			return fmt.Errorf("Service.Weights.Warning: %w", err)
		}
	}
	return nil
}

// optString reads a string field that may be absent or null.
func optString(o *fastjson.Value, key string) (string, error) {
	v := o.Get(key)
	if v == nil || v.Type() == fastjson.TypeNull {
		return "", nil
	}
	b, err := v.StringBytes()
	if err != nil {
		return "", fmt.Errorf("%s: %w", key, err)
	}
	return string(b), nil
}
