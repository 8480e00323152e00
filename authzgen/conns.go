package authzgen

import (
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// The connections table: how a deny reaches established TCP connections.
// HAProxy cannot run tcp-request rules again on a connection it accepted,
// so the tcp listener records each connection it authorizes in a stick
// table of its own, ConnTable, keyed by ConnKeyFormat: the client
// certificate's SHA-256 and the client's address and port. An entry stays
// while a stream tracks it (HAProxy shows use=1 and never expires it,
// checked on 2.6.12) and goes ConnTableExpire after the connection ends, so
// HAProxy itself forgets ended connections. On each intentions change, the
// sidecar reads the table, decides each certificate again under the new
// intentions (the agent knows the identity behind each SHA-256 it has
// seen), finds the streams of the denied ones by client address ("show
// sess") and shuts them ("shutdown session").
const (
	// ConnTable is the name of the proxy (a backend without servers)
	// that holds the connections table.
	ConnTable = "authz_conns"
	// ConnKeyFormat is the log-format of a connection's key:
	// "<SHA-256 of the client certificate, upper-case hex>-<client
	// address>-<client port>".
	// The digest is the rules' VarCert, set before the key is made.
	ConnKeyFormat = "%[var(txn." + VarPrefix + "." + VarCert + "),hex]-%ci-%cp"
	// ConnKeyLen bounds a key: 64 hex digits, an IPv6 address (at most
	// 45 characters as HAProxy prints it), a port and two dashes.
	ConnKeyLen = 128
	// ConnTableSize is how many connections one worker's listener can
	// record; past it HAProxy first drops entries of ended connections,
	// and a connection it cannot record is one a deny does not reach
	// (counted as unknown by the sweep).
	ConnTableSize = 200000
	// ConnTableExpire is how long an ended connection's entry stays.
	ConnTableExpire = "5s"
)

// Conn is one established connection recorded in the connections table.
type Conn struct {
	// Cert is the SHA-256 of the client certificate's DER.
	Cert [32]byte
	// Src is the client's address and port.
	Src netip.AddrPort
}

var errConnKey = errors.New("connections table key")

// ParseConnKey reads a connections table key (ConnKeyFormat).
func ParseConnKey(key string) (Conn, error) {
	sum, rest, ok := strings.Cut(key, "-")
	i := strings.LastIndexByte(rest, '-')
	if !ok || len(sum) != 64 || i < 0 {
		return Conn{}, fmt.Errorf("%w %q: want <sha256>-<address>-<port>", errConnKey, key)
	}
	var c Conn
	if strings.ToUpper(sum) != sum {
		return Conn{}, fmt.Errorf("%w %q: lower-case digest", errConnKey, key)
	}
	if _, err := hex.Decode(c.Cert[:], []byte(sum)); err != nil {
		return Conn{}, fmt.Errorf("%w %q: %v", errConnKey, key, err)
	}
	addr, err := netip.ParseAddr(rest[:i])
	if err != nil || addr.Zone() != "" {
		return Conn{}, fmt.Errorf("%w %q: address", errConnKey, key)
	}
	port, err := strconv.ParseUint(rest[i+1:], 10, 16)
	if err != nil || port == 0 || strconv.FormatUint(port, 10) != rest[i+1:] {
		return Conn{}, fmt.Errorf("%w %q: port", errConnKey, key)
	}
	c.Src = netip.AddrPortFrom(addr.Unmap(), uint16(port))
	return c, nil
}
