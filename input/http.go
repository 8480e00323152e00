package input

import (
	"regexp"
	"strconv"
	"time"
)

// Values of HTTP traffic rules (Consul's service-router, service-splitter
// and service-resolver entries) that reach HAProxy: as ACL patterns,
// header values and backend options in configuration lines, and as map
// entries. Every one is rendered inside single quotes (HAProxy's
// configuration parser reads single-quoted text literally: no escapes, no
// environment expansion), so the checks below refuse the bytes that could
// end a quoted word or a line: the single quote, control bytes and
// anything outside printable ASCII. The double quote and the backslash are
// refused too, so a value never depends on the quoting to stay one word.

var (
	// tokenRE is an HTTP header or query parameter name as the sidecar
	// accepts it: a subset of RFC 9110's token alphabet without the bytes
	// HAProxy's sample syntax gives meaning to (',', '(', ')', '$', ...).
	tokenRE = regexp.MustCompile(`^[A-Za-z0-9_.-]+$`)
	// methodRE is an HTTP method: upper-case letters.
	methodRE = regexp.MustCompile(`^[A-Z]{1,16}$`)
	// urlPathRE is a URL path: '/' then printable ASCII without space,
	// quotes and backslash.
	urlPathRE = regexp.MustCompile(`^/[!#-&(-\[\]-~]*$`)
	// headerValueRE is a header value or a pattern of one: printable
	// ASCII with space, without quotes, backslash and '%' (a set-header
	// value is a log-format string, where '%' starts a sample fetch).
	headerValueRE = regexp.MustCompile(`^[ !#$&(-\[\]-~]+$`)
	// regexRE is the alphabet of a regular expression: printable ASCII
	// with space and backslash, without quotes.
	regexRE = regexp.MustCompile(`^[ !#-&(-~]+$`)
	// filterRE is a Consul filter expression (go-bexpr): printable ASCII.
	// It is only ever sent to Consul, URL-encoded, as a query's filter.
	filterRE = regexp.MustCompile(`^[ -~]*$`)
)

// HeaderName checks an HTTP header name.
func HeaderName(field, s string) (string, error) {
	if !within(tokenRE, s, 1, 64) {
		return "", reject(field, s, "want 1-64 letters, digits, '-', '_' or '.'")
	}
	return s, nil
}

// QueryParam checks a URL query parameter name.
func QueryParam(field, s string) (string, error) {
	if !within(tokenRE, s, 1, 64) {
		return "", reject(field, s, "want 1-64 letters, digits, '-', '_' or '.'")
	}
	return s, nil
}

// Method checks an HTTP method.
func Method(field, s string) (string, error) {
	if !methodRE.MatchString(s) {
		return "", reject(field, s, "want 1-16 upper-case letters")
	}
	return s, nil
}

// URLPath checks a URL path or path prefix: '/' then at most 1023
// printable ASCII bytes other than space, quotes and backslash.
func URLPath(field, s string) (string, error) {
	if len(s) > 1024 || !urlPathRE.MatchString(s) {
		return "", reject(field, s, "want '/' then at most 1023 printable ASCII bytes other than space, quotes and backslash")
	}
	return s, nil
}

// HeaderValue checks a header value (or a pattern compared with one):
// 1-256 printable ASCII bytes, space included, other than quotes,
// backslash and '%'.
func HeaderValue(field, s string) (string, error) {
	if !within(headerValueRE, s, 1, 256) {
		return "", reject(field, s, "want 1-256 printable ASCII bytes other than quotes, backslash and '%'")
	}
	return s, nil
}

// Regex checks a regular expression: 1-256 printable ASCII bytes other
// than quotes, in the RE2 syntax Consul documents (Envoy's), which must
// compile. HAProxy compiles it with PCRE2, which reads RE2's syntax the
// same way for what RE2 accepts (RE2 is, as syntax, a subset of PCRE's).
func Regex(field, s string) (string, error) {
	if !within(regexRE, s, 1, 256) {
		return "", reject(field, s, "want 1-256 printable ASCII bytes other than quotes")
	}
	if _, err := regexp.Compile(s); err != nil {
		return "", reject(field, s, "not a valid RE2 regular expression")
	}
	return s, nil
}

// Filter checks a Consul filter expression (a service-resolver subset's
// Filter): at most 512 printable ASCII bytes. It goes to Consul only.
func Filter(field, s string) (string, error) {
	if len(s) > 512 || !filterRE.MatchString(s) {
		return "", reject(field, s, "want at most 512 printable ASCII bytes")
	}
	return s, nil
}

// Timeout checks a duration that becomes an HAProxy timeout: 0 (none
// set) or from 1 ms to max, whole milliseconds (HAProxy's unit).
func Timeout(field string, d, max time.Duration) (time.Duration, error) {
	switch {
	case d < 0 || d > max:
		return 0, reject(field, d.String(), "out of range 0-"+max.String())
	case d > 0 && d < time.Millisecond:
		return 0, reject(field, d.String(), "under 1ms")
	}
	return d.Truncate(time.Millisecond), nil
}

// Count checks a small non-negative integer (retries, ...): 0-max.
func Count(field string, n, max int) (int, error) {
	if n < 0 || n > max {
		return 0, reject(field, strconv.Itoa(n), "out of range 0-"+strconv.Itoa(max))
	}
	return n, nil
}
