package runtime

import (
	"encoding/csv"
	"fmt"
	"io"
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
//
// It reads one row at a time and keeps only the fields it returns: the
// reply has about a hundred columns, and the sidecar reads it every second
// (statPoll), so holding every row's fields at once would cost about 1 KB
// per server for each read.
func ParseServerStats(text string) ([]ServerStat, error) {
	text = strings.TrimPrefix(strings.TrimSpace(text), "# ")
	r := csv.NewReader(strings.NewReader(text))
	r.FieldsPerRecord = -1
	r.ReuseRecord = true
	header, err := r.Read()
	if err != nil {
		return nil, fmt.Errorf("%w: show stat: %v", ErrUnrecognizedReply, err)
	}
	col := map[string]int{}
	for i, name := range header {
		col[name] = i
	}
	for _, name := range []string{"pxname", "svname", "econ", "addr"} {
		if _, ok := col[name]; !ok {
			return nil, fmt.Errorf("%w: show stat has no %s column", ErrUnrecognizedReply, name)
		}
	}
	at := func(name string) int { // -1: no such column
		if i, ok := col[name]; ok {
			return i
		}
		return -1
	}
	pxname, svname, addr := col["pxname"], col["svname"], col["addr"]
	econ, hsfail, dresp, scur := at("econ"), at("ssl_failed_handshake"), at("dresp"), at("scur")
	status, checkStatus := at("status"), at("check_status")
	field := func(row []string, i int) string {
		if i >= 0 && i < len(row) {
			return row[i]
		}
		return ""
	}
	num := func(row []string, i int) (uint64, error) {
		if f := field(row, i); f != "" {
			return strconv.ParseUint(f, 10, 64)
		}
		return 0, nil
	}
	// Row fields share one string per row; what is kept is copied out of
	// it, and the values that repeat (backend names, statuses) once.
	seen := map[string]string{}
	intern := func(f string) string {
		if v, ok := seen[f]; ok {
			return v
		}
		v := strings.Clone(f)
		seen[v] = v
		return v
	}
	var out []ServerStat
	for {
		row, err := r.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%w: show stat: %v", ErrUnrecognizedReply, err)
		}
		if len(row) <= addr || len(row) <= svname || len(row) <= pxname {
			return nil, fmt.Errorf("%w: show stat row %q", ErrUnrecognizedReply, strings.Join(row, ","))
		}
		if sv := row[svname]; sv == "FRONTEND" || sv == "BACKEND" {
			continue
		}
		s := ServerStat{Backend: intern(row[pxname]), Server: strings.Clone(row[svname]), Addr: strings.Clone(row[addr]),
			Status: intern(field(row, status)), CheckStatus: intern(field(row, checkStatus))}
		if s.ConnErrors, err = num(row, econ); err == nil {
			if s.HandshakeFailures, err = num(row, hsfail); err == nil {
				if s.DeniedResponses, err = num(row, dresp); err == nil {
					s.Sessions, err = num(row, scur)
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
