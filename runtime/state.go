package runtime

import (
	"context"
	"fmt"
	"strconv"
	"strings"
)

// Operational states and administrative flags of "show servers state"
// (enum srv_state and enum srv_admin, include/haproxy/server-t.h in 2.6).
const (
	OpStopped  = 0
	OpStarting = 1
	OpRunning  = 2
	OpStopping = 3

	AdminForcedMaint  = 0x01 // "set server ... state maint"
	AdminInheritMaint = 0x02 // tracks a server in maintenance
	AdminConfigMaint  = 0x04 // "disabled" in the configuration; stays set after "state ready"
	AdminForcedDrain  = 0x08 // "set server ... state drain"
	AdminInheritDrain = 0x10
	AdminResolvMaint  = 0x20 // address resolution failed
	AdminFQDNSet      = 0x40

	adminMaintMask = AdminForcedMaint | AdminInheritMaint | AdminResolvMaint // SRV_ADMF_MAINT
	adminDrainMask = AdminForcedDrain | AdminInheritDrain                    // SRV_ADMF_DRAIN
)

// ServerStatus is one server of "show servers state".
type ServerStatus struct {
	Backend    string
	Name       string
	Addr       string
	Port       int
	OpState    int
	AdminState int
	Weight     int // user weight
}

// Maint reports whether the server takes no traffic for an administrative reason.
func (s ServerStatus) Maint() bool {
	return s.AdminState&adminMaintMask != 0
}

// Drain reports whether the server is draining.
func (s ServerStatus) Drain() bool { return s.AdminState&adminDrainMask != 0 }

// ParseServersState parses "show servers state" (format version 1). Columns:
// be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state
// srv_uweight srv_iweight srv_time_since_last_change srv_check_status
// srv_check_result srv_check_health srv_check_state srv_agent_state
// bk_f_forced_id srv_f_forced_id srv_fqdn srv_port ...
func ParseServersState(text string) ([]ServerStatus, error) {
	lines := strings.Split(strings.TrimSpace(text), "\n")
	if len(lines) == 0 || strings.TrimSpace(lines[0]) != "1" {
		return nil, fmt.Errorf("%w: servers state format %q", ErrUnrecognizedReply, firstLine(text))
	}
	var out []ServerStatus
	for _, l := range lines[1:] {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		f := strings.Fields(l)
		if len(f) < 19 {
			return nil, fmt.Errorf("%w: servers state line %q", ErrUnrecognizedReply, l)
		}
		var s ServerStatus
		s.Backend, s.Name, s.Addr = f[1], f[3], f[4]
		ints := []struct {
			dst *int
			col int
		}{{&s.OpState, 5}, {&s.AdminState, 6}, {&s.Weight, 7}, {&s.Port, 18}}
		for _, x := range ints {
			n, err := strconv.Atoi(f[x.col])
			if err != nil {
				return nil, fmt.Errorf("%w: servers state column %d in %q", ErrUnrecognizedReply, x.col, l)
			}
			*x.dst = n
		}
		out = append(out, s)
	}
	return out, nil
}

// ServersState runs "show servers state" for backend ("" for all).
func (c *Client) ServersState(ctx context.Context, backend string) ([]ServerStatus, error) {
	cmd, err := ShowServersState(backend)
	if err != nil {
		return nil, err
	}
	reply, err := c.Do(ctx, cmd)
	if err != nil {
		return nil, err
	}
	return ParseServersState(reply)
}

// CertInfo is the parsed "show ssl cert <file>".
type CertInfo struct {
	Filename string
	Status   string
	Serial   string
	NotAfter string
	Subject  string
	SAN      string
	SHA1     string
}

// ParseCertInfo parses "show ssl cert <file>" ("Key: value" lines).
func ParseCertInfo(text string) (CertInfo, error) {
	var ci CertInfo
	fields := map[string]*string{
		"Filename": &ci.Filename, "Status": &ci.Status, "Serial": &ci.Serial,
		"notAfter": &ci.NotAfter, "Subject": &ci.Subject,
		"Subject Alternative Name": &ci.SAN, "SHA1 FingerPrint": &ci.SHA1,
	}
	for _, l := range strings.Split(text, "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		if dst, ok := fields[k]; ok && *dst == "" {
			*dst = strings.TrimSpace(v)
		}
	}
	if ci.Filename == "" || ci.Serial == "" {
		return CertInfo{}, fmt.Errorf("%w: show ssl cert: %q", ErrUnrecognizedReply, truncate(text, 200))
	}
	return ci, nil
}

// SSLCert runs "show ssl cert <file>".
func (c *Client) SSLCert(ctx context.Context, file string) (CertInfo, error) {
	cmd, err := ShowSSLCert(file)
	if err != nil {
		return CertInfo{}, err
	}
	reply, err := c.Do(ctx, cmd)
	if err != nil {
		return CertInfo{}, err
	}
	return ParseCertInfo(reply)
}

// UpdateCert replaces the certificate (chain and key) stored under file and
// commits it, in one round trip; on a failed set, the transaction is aborted.
// The caller writes the same PEM to file on disk first, so that a reload
// loads what was committed.
func (c *Client) UpdateCert(ctx context.Context, file, pem string) error {
	set, err := SetSSLCert(file, pem)
	if err != nil {
		return err
	}
	commit, err := CommitSSLCert(file)
	if err != nil {
		return err
	}
	rs, err := c.Exec(ctx, set, commit)
	if err != nil {
		return fmt.Errorf("update cert %s: %w", file, err)
	}
	if rs[0].Err != nil {
		if abort, aerr := AbortSSLCert(file); aerr == nil {
			_, _ = c.Exec(ctx, abort)
		}
		return fmt.Errorf("update cert %s: %w", file, rs[0].Err)
	}
	if rs[1].Err != nil {
		return fmt.Errorf("update cert %s: %w", file, rs[1].Err)
	}
	return nil
}
