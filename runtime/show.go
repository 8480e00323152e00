package runtime

import (
	"context"
	"fmt"
	"strings"
)

// MapEntry is one entry of "show map <file>".
type MapEntry struct{ Key, Value string }

// ParseMap parses "show map <file>": one line per entry,
//
//	0x55a427d38ce0 up_web/s2 web-1@10.0.0.1:21000
//
// the entry's address in the worker, its key, and its value (the rest of
// the line). An empty reply is an empty map. Any other line is
// ErrUnrecognizedReply.
func ParseMap(text string) ([]MapEntry, error) {
	var out []MapEntry
	for _, l := range strings.Split(strings.TrimSpace(text), "\n") {
		if l == "" {
			continue
		}
		ptr, rest, ok := strings.Cut(l, " ")
		key, value, ok2 := strings.Cut(rest, " ")
		if !ok || !ok2 || !isPointer(ptr) || key == "" || value == "" {
			return nil, fmt.Errorf("%w: show map line %q", ErrUnrecognizedReply, truncate(l, 200))
		}
		out = append(out, MapEntry{Key: key, Value: value})
	}
	return out, nil
}

// isPointer reports whether s is "0x" and hex digits, as HAProxy prints
// an entry's address.
func isPointer(s string) bool {
	if len(s) < 3 || len(s) > 18 || s[:2] != "0x" {
		return false
	}
	for _, c := range s[2:] {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// Map runs "show map <file>".
func (c *Client) Map(ctx context.Context, file string) ([]MapEntry, error) {
	cmd, err := ShowMap(file)
	if err != nil {
		return nil, err
	}
	reply, err := c.Do(ctx, cmd)
	if err != nil {
		return nil, err
	}
	return ParseMap(reply)
}

// CAFileInfo is the parsed "show ssl ca-file <file>".
type CAFileInfo struct {
	Filename string
	Status   string
	Certs    []CertInfo
}

// ParseCAFile parses "show ssl ca-file <file>" on 2.6:
//
//	Filename: /state/roots.pem
//	Status: Used
//
//	Certificate #1:
//	Serial: 2212E2E9E7DF94D6D245BD99D142B90FC4515B0C
//	notAfter: Dec  5 08:58:35 2026 GMT
//	...
//
// A reply without a file name, with a certificate without a serial, or
// with no certificate at all is ErrUnrecognizedReply.
func ParseCAFile(text string) (CAFileInfo, error) {
	var ci CAFileInfo
	var cur *CertInfo
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, "Certificate #") {
			ci.Certs = append(ci.Certs, CertInfo{Filename: ci.Filename})
			cur = &ci.Certs[len(ci.Certs)-1]
			continue
		}
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		if cur == nil {
			switch k {
			case "Filename":
				ci.Filename = v
			case "Status":
				ci.Status = v
			}
			continue
		}
		fields := map[string]*string{
			"Serial": &cur.Serial, "notAfter": &cur.NotAfter, "Subject": &cur.Subject,
			"Subject Alternative Name": &cur.SAN, "SHA1 FingerPrint": &cur.SHA1,
		}
		if dst, ok := fields[k]; ok && *dst == "" {
			*dst = v
		}
	}
	if ci.Filename == "" || len(ci.Certs) == 0 {
		return CAFileInfo{}, fmt.Errorf("%w: show ssl ca-file: %q", ErrUnrecognizedReply, truncate(text, 200))
	}
	for i, c := range ci.Certs {
		if c.Serial == "" {
			return CAFileInfo{}, fmt.Errorf("%w: show ssl ca-file: certificate #%d has no serial", ErrUnrecognizedReply, i+1)
		}
	}
	return ci, nil
}

// CAFile runs "show ssl ca-file <file>".
func (c *Client) CAFile(ctx context.Context, file string) (CAFileInfo, error) {
	cmd, err := ShowSSLCAFile(file)
	if err != nil {
		return CAFileInfo{}, err
	}
	reply, err := c.Do(ctx, cmd)
	if err != nil {
		return CAFileInfo{}, err
	}
	return ParseCAFile(reply)
}

// ServerStats runs "show stat" for every server of every backend.
func (c *Client) ServerStats(ctx context.Context) ([]ServerStat, error) {
	reply, err := c.Do(ctx, ShowServerStats())
	if err != nil {
		return nil, err
	}
	return ParseServerStats(reply)
}
