package runtime

import (
	"encoding/csv"
	"fmt"
	"strconv"
	"strings"
)

// ShowServerStats is "show stat -1 4 -1": the statistics of every server
// of every backend, as CSV.
func ShowServerStats() Command {
	return Command{Target: "@1", Line: "show stat -1 4 -1", expect: expectPrefix("# pxname,")}
}

// ServerStat is what the sidecar reads of a server's row of "show stat".
type ServerStat struct {
	Backend, Server string
	// Addr is the server's address:port ("addr" column), IPv6 in brackets.
	Addr string
	// ConnErrors ("econ") counts failed connections to the server, a
	// failed TLS handshake included; HandshakeFailures
	// ("ssl_failed_handshake", from the SSL stats module, present on
	// 2.6.12) counts failed handshakes alone; DeniedResponses ("dresp")
	// counts the server's responses that an "http-response deny" or
	// "tcp-response content reject" rule refused (per server on 2.6.12).
	// All restart at 0 in a new worker.
	ConnErrors, HandshakeFailures, DeniedResponses uint64
	// Sessions ("scur") is the server's current sessions.
	Sessions uint64
	// Status ("status") is "UP", "DOWN", "MAINT", "DRAIN", "no check", ...;
	// CheckStatus ("check_status") is the last health check's result
	// ("L4OK", "L4CON", ...), empty when the server has no check.
	Status, CheckStatus string
}

// ParseServerStats reads "show stat" CSV by its header, so that columns
// added by other versions or stats modules do not shift it. Rows that are
// not servers (FRONTEND, BACKEND) are skipped; a missing column or a
// malformed number is ErrUnrecognizedReply.
func ParseServerStats(text string) ([]ServerStat, error) {
	text = strings.TrimPrefix(strings.TrimSpace(text), "# ")
	r := csv.NewReader(strings.NewReader(text))
	r.FieldsPerRecord = -1
	rows, err := r.ReadAll()
	if err != nil || len(rows) == 0 {
		return nil, fmt.Errorf("%w: show stat: %v", ErrUnrecognizedReply, err)
	}
	col := map[string]int{}
	for i, name := range rows[0] {
		col[name] = i
	}
	for _, name := range []string{"pxname", "svname", "econ", "addr"} {
		if _, ok := col[name]; !ok {
			return nil, fmt.Errorf("%w: show stat has no %s column", ErrUnrecognizedReply, name)
		}
	}
	num := func(row []string, name string) (uint64, error) {
		i, ok := col[name]
		if !ok || i >= len(row) || row[i] == "" {
			return 0, nil
		}
		return strconv.ParseUint(row[i], 10, 64)
	}
	field := func(row []string, name string) string {
		if i, ok := col[name]; ok && i < len(row) {
			return row[i]
		}
		return ""
	}
	var out []ServerStat
	for _, row := range rows[1:] {
		if len(row) <= col["addr"] || len(row) <= col["svname"] {
			return nil, fmt.Errorf("%w: show stat row %q", ErrUnrecognizedReply, strings.Join(row, ","))
		}
		if sv := row[col["svname"]]; sv == "FRONTEND" || sv == "BACKEND" {
			continue
		}
		s := ServerStat{Backend: row[col["pxname"]], Server: row[col["svname"]], Addr: row[col["addr"]],
			Status: field(row, "status"), CheckStatus: field(row, "check_status")}
		if s.ConnErrors, err = num(row, "econ"); err == nil {
			if s.HandshakeFailures, err = num(row, "ssl_failed_handshake"); err == nil {
				if s.DeniedResponses, err = num(row, "dresp"); err == nil {
					s.Sessions, err = num(row, "scur")
				}
			}
		}
		if err != nil {
			return nil, fmt.Errorf("%w: show stat row of %s/%s: %v", ErrUnrecognizedReply, s.Backend, s.Server, err)
		}
		out = append(out, s)
	}
	return out, nil
}
