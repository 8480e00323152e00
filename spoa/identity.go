package spoa

import (
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"strings"
)

// Reasons a client certificate gives no identity. Each one is a deny.
var (
	errNoCert     = errors.New("no client certificate")
	errBadCert    = errors.New("unparsable client certificate")
	errNoSPIFFEID = errors.New("no SPIFFE ID in client certificate")
)

// identity is what Consul needs from a client leaf.
type identity struct {
	uri    string // spiffe://<trust-domain>/ns/<ns>/dc/<dc>/svc/<name>
	serial string // colon-hex, as Consul writes it (connect.HexString)
}

// parseIdentity reads the SPIFFE ID and serial of a DER leaf. HAProxy has
// already verified the chain against the Consul roots ("verify required"),
// so the certificate is trusted; what is checked here is its shape. Consul
// leaves carry exactly one URI SAN, an empty subject and no DNS SAN: a
// certificate with several URIs is ambiguous and refused.
func parseIdentity(der []byte) (identity, error) {
	if len(der) == 0 {
		return identity{}, errNoCert
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return identity{}, fmt.Errorf("%w: %v", errBadCert, err)
	}
	if n := len(cert.URIs); n != 1 {
		return identity{}, fmt.Errorf("%w: %d URI SANs, want 1", errNoSPIFFEID, n)
	}
	u := cert.URIs[0]
	// url.Parse lower-cases the scheme. Consul validates the path
	// (ns/dc/svc) itself and rejects other shapes with an error.
	if u.Scheme != "spiffe" || u.Host == "" || u.Opaque != "" || u.User != nil ||
		!strings.HasPrefix(u.Path, "/") || u.RawQuery != "" || u.Fragment != "" {
		return identity{}, fmt.Errorf("%w: URI SAN %q is not a SPIFFE ID", errNoSPIFFEID, u.String())
	}
	return identity{uri: u.String(), serial: hexSerial(cert.SerialNumber)}, nil
}

// hexSerial formats a serial number as Consul's connect.HexString does:
// lower-case hex bytes joined by colons ("0a:1b:...").
func hexSerial(n *big.Int) string {
	b := n.Bytes()
	if len(b) == 0 {
		b = []byte{0}
	}
	var s strings.Builder
	s.Grow(3 * len(b))
	const digits = "0123456789abcdef"
	for i, c := range b {
		if i > 0 {
			s.WriteByte(':')
		}
		s.WriteByte(digits[c>>4])
		s.WriteByte(digits[c&0xf])
	}
	return s.String()
}
