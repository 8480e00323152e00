package l7

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// Permissions HAProxy decides itself. An SPOE exchange per request costs
// the agent a round trip per request, a third of the keep-alive request
// rate on two cores when every request is new (a new path each time). So
// the permissions that need only the method and the path are compiled into
// entries of one HAProxy regex map (map_reg: the first matching entry, in
// the order entries were added, gives the value), which the controller
// keeps current at run time ("add map", "del map"): no reload when
// intentions change.
//
// HAProxy builds each request's subject as
// "<key>:<method>:/<header names>/:<path>" (Subject: the "method", "path"
// and "req.hdr_names(/)" fetches; the agent's message carries the same
// method, path and headers). The key names one compiled intention
// (Compiled.Key): the agent hands it to a connection with its L7 verdict.
// Neither a method nor a header name can hold ':' or '/' (HTTP tokens;
// HAProxy lower-cases header names, as the agent does), so "[^:]*" spans
// exactly one of those fields. An intention's entries, in its
// permissions' order, all start with "^<key>:", and the last one matches
// every request of the key: the intention's default. Paths (exact,
// prefix), methods and the presence of one header are decided there. A
// permission the map cannot decide (other header matches, a path regex, a
// path with characters outside pathChars) becomes an entry that sends the
// requests it may match to the agent (ActionAgent). Where the map has no entry for a subject
// (an intention not added yet, or removed) the request goes to the agent
// too. So for every request HAProxy either has the first permission that
// matches, exactly as Decide would find it, or asks the agent.
//
// Every entry is a word of the runtime API's grammar, which keeps out
// blanks and what a shell or the CLI reads as syntax (';', '#', quotes,
// backslash, '$', '|', '&', '%', braces): so a permission listing methods
// is one entry per method, an exact path ends with "(?!.)" (nothing
// follows: HAProxy's path never holds a line feed), and literal
// characters that mean something to a regex are written as a
// one-character class ("[.]").

// Actions of a map entry's value.
const (
	ActionAllow = "A"
	ActionDeny  = "D"
	ActionAgent = "S"
)

// KeyLen is the length of a compiled intention's key (hex digits).
const KeyLen = 16

// MapEntry is one line of the L7 map: a PCRE pattern and its value,
// "<action>/<intention>/<permission label>".
type MapEntry struct {
	Pattern, Value string
}

// Compiled is one L7 intention compiled for HAProxy.
type Compiled struct {
	// Key names the intention with its permissions and the default they
	// fall to: equal keys decide alike.
	Key     string
	Entries []MapEntry
}

// pathChars is what a path may hold and still be compiled: RFC 3986
// pchar and '/', without what the runtime API's grammar refuses (';',
// '%', '$', '&' and the quote). A path with any other character is
// decided by the agent.
var pathChars = regexp.MustCompile(`^[A-Za-z0-9/._~!()*+,=:@-]*$`)

// methodRE is a method the map can hold: Consul's are upper-case tokens.
var methodRE = regexp.MustCompile(`^[A-Z][A-Z0-9_-]*$`)

// intentionRE is an intention source name a map value can hold, of at
// most maxName bytes. (Lengths are checked beside the expressions here: a
// bounded repetition compiles to that many copies of its class.)
var intentionRE = regexp.MustCompile(`^([A-Za-z0-9_.-]+|\*)$`)

// maxName bounds an intention source name and a header name in an entry.
const maxName = 128

// Compile compiles in for HAProxy, with defaultAllow the default
// intention policy its unmatched requests fall to.
func (in *Intention) Compile(defaultAllow bool) Compiled {
	key := in.key(defaultAllow)
	prefix := "^" + key + ":"
	source := in.Source
	if len(source) > maxName || !intentionRE.MatchString(source) {
		// No such name comes from Consul; the agent decides, and logs it.
		return Compiled{Key: key, Entries: []MapEntry{{prefix, ActionAgent + "/-/-"}}}
	}
	var out []MapEntry
	seen := map[string]bool{}
	add := func(pattern, action, label string) {
		if seen[pattern] {
			return // an earlier entry with this pattern shadows it
		}
		seen[pattern] = true
		out = append(out, MapEntry{pattern, action + "/" + source + "/" + label})
	}
	for _, p := range in.Permissions {
		methods, ok := methodPatterns(p.methods)
		if !ok {
			// Every request may match it, and only the agent knows.
			add(prefix, ActionAgent, p.Label())
			return Compiled{Key: key, Entries: out}
		}
		path, ok := p.pathPattern()
		action := ActionDeny
		if p.Allow {
			action = ActionAllow
		}
		names, hok := p.headerPattern()
		if !ok || !hok {
			action = ActionAgent
		}
		if !ok {
			path = ""
		}
		// One entry per method, adjacent: a request matches at most one.
		for _, m := range methods {
			add(prefix+m+":"+names+":"+path, action, p.Label())
		}
	}
	label := "default"
	if defaultAllow {
		add(prefix, ActionAllow, label)
	} else {
		add(prefix, ActionDeny, label)
	}
	return Compiled{Key: key, Entries: out}
}

// methodPatterns match the subject's method field, one per method: any
// method when none is listed.
func methodPatterns(methods []string) ([]string, bool) {
	if len(methods) == 0 {
		return []string{"[^:]*"}, true
	}
	for _, m := range methods {
		if !methodRE.MatchString(m) {
			return nil, false
		}
	}
	return methods, true
}

// headerNameRE is a header name an entry can hold (lower case).
var headerNameRE = regexp.MustCompile(`^[a-z0-9_.-]+$`)

// headerPattern matches the subject's header names field: any names, or
// names that include the one header the permission requires present. ok
// is false for other header matches (values, inverted, several headers),
// which the agent decides; the pattern then matches any names.
func (p Permission) headerPattern() (string, bool) {
	switch {
	case len(p.headers) == 0:
		return "[^:]*", true
	case len(p.headers) == 1:
		h := p.headers[0]
		if h.kind == matchPresent && !h.invert && len(h.name) <= maxName && headerNameRE.MatchString(h.name) {
			return "[^:]*/" + strings.ReplaceAll(h.name, ".", "[.]") + "/[^:]*", true
		}
	}
	return "[^:]*", false
}

// pathPattern matches the subject's path field from its start, as the
// permission's path does: a prefix, or the whole path. No path matches
// every path. ok is false for what the map cannot express.
func (p Permission) pathPattern() (string, bool) {
	switch {
	case p.pathRegex != nil:
		// RE2 and PCRE differ: the agent decides.
		return "", false
	case p.pathExact != "":
		lit, ok := literal(p.pathExact)
		return lit + "(?!.)", ok
	case p.pathPrefix != "":
		return literal(p.pathPrefix)
	}
	return "", true
}

// maxLiteral bounds a compiled path, so that an entry stays within the
// runtime API's line (2 048 bytes).
const maxLiteral = 1200

// literal writes s as a regex matching s only.
func literal(s string) (string, bool) {
	if !pathChars.MatchString(s) {
		return "", false
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if strings.IndexByte(".()*+", c) >= 0 {
			b.WriteByte('[')
			b.WriteByte(c)
			b.WriteByte(']')
			continue
		}
		b.WriteByte(c)
	}
	if b.Len() > maxLiteral {
		return "", false
	}
	return b.String(), true
}

// key hashes what the intention's entries say: its source, each
// permission and the default.
func (in *Intention) key(defaultAllow bool) string {
	h := sha256.New()
	w := func(s string) { fmt.Fprintf(h, "%d:%s;", len(s), s) }
	w(in.Source)
	w(strconv.FormatBool(defaultAllow))
	for _, p := range in.Permissions {
		w(p.Label())
		w(p.pathExact)
		w(p.pathPrefix)
		if p.pathRegex != nil {
			w(p.pathRegex.String())
		} else {
			w("")
		}
		w(strconv.Itoa(len(p.methods)))
		for _, m := range p.methods {
			w(m)
		}
		w(strconv.Itoa(len(p.headers)))
		for _, hm := range p.headers {
			w(hm.name)
			w(strconv.Itoa(int(hm.kind)))
			w(hm.value)
			w(strconv.FormatBool(hm.invert))
			w(strconv.FormatBool(hm.ignoreCase))
		}
	}
	return hex.EncodeToString(h.Sum(nil))[:KeyLen]
}

// MapContent is a map file holding entries, one per line.
func MapContent(entries []MapEntry) string {
	var b strings.Builder
	for _, e := range entries {
		b.WriteString(e.Pattern)
		b.WriteByte(' ')
		b.WriteString(e.Value)
		b.WriteByte('\n')
	}
	return b.String()
}

// Subject is the string HAProxy matches the map against for a request
// of the connection holding key, with headers named names (lower case,
// in request order, repeats included).
func Subject(key, method string, names []string, path string) string {
	return key + ":" + method + ":/" + strings.Join(names, "/") + "/:" + path
}
