package spoa

import (
	"bytes"
	"crypto/ecdh"
	"crypto/x509"
	"encoding/asn1"
	"time"
	"unicode/utf8"

	"golang.org/x/crypto/cryptobyte"
	cbasn1 "golang.org/x/crypto/cryptobyte/asn1"
)

// The leaf fast path. On a first decision for a certificate whose chain
// HAProxy verified against roots the agent trusts (served.go), the agent
// needs of the leaf only its serial, its one URI SAN, its AuthorityKeyId,
// its validity and whether its ExtKeyUsage allows client authentication.
// x509.ParseCertificate builds all of a Certificate for that (most of
// such a decision's time, and about 3 KB of garbage, whose collection was
// most of the decision's tail latency). parseLeaf reads just those fields.
//
// The DER is hostile input, and the contract is: parseLeaf accepts only a
// certificate x509.ParseCertificate accepts too, and then its fields are
// the ones x509 parses (FuzzParseLeaf and TestParseLeafMatchesX509 hold it
// to that). It does so by accepting a narrow shape, the one of Consul's
// leaves, and declining everything else, where "declined" is not a
// verdict: the caller then parses the certificate with x509 and decides
// exactly as before. Within that shape it checks everything x509 checks,
// and more strictly (trailing bytes x509 skips are refused):
//   - v3, a positive minimally encoded serial;
//   - a signature algorithm from a short list (ECDSA with SHA-2, RSA
//     PKCS #1 v1.5 with SHA-2), equal in the TBS and outside it;
//   - issuer and subject names whose attribute types are from a short list
//     and whose values are valid PrintableString or UTF8String;
//   - UTCTime or GeneralizedTime validity, read as x509 reads it (the same
//     cryptobyte functions);
//   - an EC public key on P-256, P-384 or P-521, checked on its curve (as
//     x509 does, through crypto/ecdh instead of crypto/ecdsa: no big.Int);
//   - no unique identifiers; extensions from this list only, each at most
//     once and well formed: SubjectKeyId, KeyUsage, SubjectAltName with
//     exactly one URI and nothing else, BasicConstraints without a path
//     length, AuthorityKeyId holding only a key id, ExtKeyUsage of
//     serverAuth, clientAuth and any. Any other extension, critical or
//     not, sends the certificate to x509, so an unknown critical extension
//     is handled exactly as before;
//   - the URI is spiffe://<host>/<path> in a narrow alphabet, for which
//     url.Parse and URL.String give back the same text (so the identity is
//     the one x509's URL would print) and the URI checks of checkCert hold.

// leaf is what the fast path reads of a client certificate.
type leaf struct {
	// serial is the serial number's magnitude, big-endian, without
	// leading zeros (big.Int.Bytes; empty for 0).
	serial []byte
	// uri is the only URI SAN; host is its authority (the trust domain).
	uri, host           string
	authorityKeyID      []byte
	notBefore, notAfter time.Time
	// clientAuth: the ExtKeyUsage allows client authentication as
	// issuedByTrusted reads it (no known usage, clientAuth, or any).
	clientAuth bool
}

// leafOf is what the fast path would read of cert, from x509's parse: the
// reference parseLeaf is held to, and how issuedByTrusted reads a
// certificate x509 parsed.
func leafOf(cert *x509.Certificate) leaf {
	l := leaf{serial: cert.SerialNumber.Bytes(), authorityKeyID: cert.AuthorityKeyId,
		notBefore: cert.NotBefore, notAfter: cert.NotAfter, clientAuth: len(cert.ExtKeyUsage) == 0}
	if len(cert.URIs) == 1 {
		l.uri, l.host = cert.URIs[0].String(), cert.URIs[0].Host
	}
	for _, u := range cert.ExtKeyUsage {
		if u == x509.ExtKeyUsageClientAuth || u == x509.ExtKeyUsageAny {
			l.clientAuth = true
		}
	}
	return l
}

// DER encodings parseLeaf accepts, compared byte for byte.
var (
	// Signature AlgorithmIdentifier contents: ecdsa-with-SHA256/384/512
	// (no parameters, RFC 5758), sha256/384/512WithRSAEncryption (NULL
	// parameters, RFC 4055).
	leafSigAlgs = [][]byte{
		{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02},
		{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03},
		{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04},
		{0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b, 0x05, 0x00},
		{0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c, 0x05, 0x00},
		{0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d, 0x05, 0x00},
	}
	// Public key AlgorithmIdentifier contents: id-ecPublicKey with the
	// named curves prime256v1, secp384r1, secp521r1 (RFC 5480).
	leafKeyAlgs = []struct {
		der   []byte
		curve ecdh.Curve
	}{
		{[]byte{0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}, ecdh.P256()},
		{[]byte{0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22}, ecdh.P384()},
		{[]byte{0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23}, ecdh.P521()},
	}
	// Name attribute types (OID contents): 2.5.4.x for x in CN (3),
	// serialNumber (5), C (6), L (7), ST (8), street (9), O (10), OU (11),
	// postalCode (17).
	leafNameAttrs = []byte{3, 5, 6, 7, 8, 9, 10, 11, 17}
	// ExtKeyUsage OID contents: anyExtendedKeyUsage (2.5.29.37.0),
	// serverAuth and clientAuth (1.3.6.1.5.5.7.3.1, .2).
	ekuAny        = []byte{0x55, 0x1d, 0x25, 0x00}
	ekuServerAuth = []byte{0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01}
	ekuClientAuth = []byte{0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02}
)

// Certificate extensions parseLeaf reads: the last byte of their OID
// 2.5.29.x (contents 0x55 0x1d x).
const (
	extSubjectKeyID     = 14
	extKeyUsage         = 15
	extSubjectAltName   = 17
	extBasicConstraints = 19
	extAuthorityKeyID   = 35
	extExtKeyUsage      = 37
)

// maxLeafExtensions bounds the extensions parseLeaf reads: it accepts six
// kinds, each once.
const maxLeafExtensions = 6

// parseLeaf reads the fast path's fields of the DER certificate der.
// ok is false when der is not of the shape it reads (see above); the
// certificate may still be valid, and is then for x509 to parse. The
// slices of l point into der.
func parseLeaf(der []byte) (l leaf, ok bool) {
	input := cryptobyte.String(der)
	var cert, tbs, sigAlg, outerSigAlg, name, validity, spki, exts cryptobyte.String
	if !input.ReadASN1(&cert, cbasn1.SEQUENCE) || !input.Empty() ||
		!cert.ReadASN1(&tbs, cbasn1.SEQUENCE) {
		return leaf{}, false
	}
	var version int
	if !tbs.ReadOptionalASN1Integer(&version, cbasn1.Tag(0).Constructed().ContextSpecific(), 0) || version != 2 {
		return leaf{}, false
	}
	var serial cryptobyte.String
	if !tbs.ReadASN1(&serial, cbasn1.INTEGER) || !positiveInteger(serial) {
		return leaf{}, false
	}
	l.serial = serial
	for len(l.serial) > 0 && l.serial[0] == 0 {
		l.serial = l.serial[1:]
	}
	if !tbs.ReadASN1(&sigAlg, cbasn1.SEQUENCE) || !oneOf(sigAlg, leafSigAlgs) ||
		!tbs.ReadASN1(&name, cbasn1.SEQUENCE) || !leafName(name) ||
		!tbs.ReadASN1(&validity, cbasn1.SEQUENCE) || !readTime(&validity, &l.notBefore) ||
		!readTime(&validity, &l.notAfter) || !validity.Empty() ||
		!tbs.ReadASN1(&name, cbasn1.SEQUENCE) || !leafName(name) ||
		!tbs.ReadASN1(&spki, cbasn1.SEQUENCE) || !leafKey(spki) ||
		!tbs.ReadASN1(&exts, cbasn1.Tag(3).Constructed().ContextSpecific()) || !tbs.Empty() ||
		!exts.ReadASN1(&tbs, cbasn1.SEQUENCE) || !exts.Empty() {
		return leaf{}, false
	}
	// tbs is now the extensions' SEQUENCE OF.
	var seen [maxLeafExtensions]byte
	n, sawEKU, sans := 0, false, 0
	for !tbs.Empty() {
		var ext, oid, value cryptobyte.String
		critical := false
		if !tbs.ReadASN1(&ext, cbasn1.SEQUENCE) || !ext.ReadASN1(&oid, cbasn1.OBJECT_IDENTIFIER) ||
			len(oid) != 3 || oid[0] != 0x55 || oid[1] != 0x1d {
			return leaf{}, false
		}
		if ext.PeekASN1Tag(cbasn1.BOOLEAN) && !ext.ReadASN1Boolean(&critical) {
			return leaf{}, false
		}
		if !ext.ReadASN1(&value, cbasn1.OCTET_STRING) || !ext.Empty() || n == len(seen) {
			return leaf{}, false
		}
		kind := oid[2]
		for _, k := range seen[:n] {
			if k == kind {
				return leaf{}, false // x509 refuses duplicate extensions
			}
		}
		seen[n] = kind
		n++
		var ok bool
		switch kind {
		case extSubjectKeyID:
			// Marked critical, x509 refuses it (RFC 5280 4.2.1.2).
			var id cryptobyte.String
			ok = !critical && value.ReadASN1(&id, cbasn1.OCTET_STRING)
		case extKeyUsage:
			var bits asn1.BitString
			ok = value.ReadASN1BitString(&bits)
		case extSubjectAltName:
			ok = readURISAN(&value, &l)
			sans++
		case extBasicConstraints:
			var bc cryptobyte.String
			isCA := false
			ok = value.ReadASN1(&bc, cbasn1.SEQUENCE) &&
				(!bc.PeekASN1Tag(cbasn1.BOOLEAN) || bc.ReadASN1Boolean(&isCA)) && bc.Empty()
		case extAuthorityKeyID:
			// Marked critical, x509 refuses it (RFC 5280 4.2.1.1).
			var aki, id cryptobyte.String
			ok = !critical && value.ReadASN1(&aki, cbasn1.SEQUENCE) &&
				aki.ReadASN1(&id, cbasn1.Tag(0).ContextSpecific()) && aki.Empty()
			l.authorityKeyID = id
		case extExtKeyUsage:
			ok = readEKU(&value, &l.clientAuth)
			sawEKU = true
		}
		if !ok || !value.Empty() {
			return leaf{}, false
		}
	}
	if sans != 1 {
		return leaf{}, false
	}
	if !sawEKU {
		l.clientAuth = true
	}
	var sig asn1.BitString
	if !cert.ReadASN1(&outerSigAlg, cbasn1.SEQUENCE) || !bytes.Equal(outerSigAlg, sigAlg) ||
		!cert.ReadASN1BitString(&sig) || !cert.Empty() {
		return leaf{}, false
	}
	return l, true
}

// positiveInteger: b is the content of a DER INTEGER as x509 accepts one
// for a serial (minimally encoded), and not negative.
func positiveInteger(b []byte) bool {
	switch {
	case len(b) == 0, b[0]&0x80 != 0:
		return false
	case len(b) > 1 && b[0] == 0 && b[1]&0x80 == 0:
		return false // not minimal
	}
	return true
}

func oneOf(b []byte, set [][]byte) bool {
	for _, s := range set {
		if bytes.Equal(b, s) {
			return true
		}
	}
	return false
}

// leafName checks the content of a Name (RDNSequence) as x509's parseName
// would, for the attribute types and string types parseLeaf accepts.
func leafName(rdns cryptobyte.String) bool {
	for !rdns.Empty() {
		var set cryptobyte.String
		if !rdns.ReadASN1(&set, cbasn1.SET) {
			return false
		}
		for !set.Empty() {
			var atv, oid, value cryptobyte.String
			var tag cbasn1.Tag
			if !set.ReadASN1(&atv, cbasn1.SEQUENCE) || !atv.ReadASN1(&oid, cbasn1.OBJECT_IDENTIFIER) ||
				len(oid) != 3 || oid[0] != 0x55 || oid[1] != 0x04 || bytes.IndexByte(leafNameAttrs, oid[2]) < 0 ||
				!atv.ReadAnyASN1(&value, &tag) || !atv.Empty() {
				return false
			}
			switch tag {
			case cbasn1.PrintableString:
				for _, b := range value {
					if !printable(b) {
						return false
					}
				}
			case cbasn1.UTF8String:
				if !utf8.Valid(value) {
					return false
				}
			default:
				return false
			}
		}
	}
	return true
}

// printable is x509's PrintableString alphabet (which admits '*' and '&'
// besides ASN.1's).
func printable(b byte) bool {
	return 'a' <= b && b <= 'z' || 'A' <= b && b <= 'Z' || '0' <= b && b <= '9' ||
		'\'' <= b && b <= ')' || '+' <= b && b <= '/' ||
		b == ' ' || b == ':' || b == '=' || b == '?' || b == '*' || b == '&'
}

// readTime reads a UTCTime or GeneralizedTime as x509's parseTime does.
func readTime(s *cryptobyte.String, t *time.Time) bool {
	switch {
	case s.PeekASN1Tag(cbasn1.UTCTime):
		return s.ReadASN1UTCTime(t)
	case s.PeekASN1Tag(cbasn1.GeneralizedTime):
		return s.ReadASN1GeneralizedTime(t)
	}
	return false
}

// leafKey checks a SubjectPublicKeyInfo's content: an EC key on one of
// leafKeyAlgs' curves, whose point is on that curve (x509 refuses a key
// that is not).
func leafKey(spki cryptobyte.String) bool {
	var alg cryptobyte.String
	var key asn1.BitString
	if !spki.ReadASN1(&alg, cbasn1.SEQUENCE) || !spki.ReadASN1BitString(&key) || !spki.Empty() || key.BitLength%8 != 0 {
		return false
	}
	for _, k := range leafKeyAlgs {
		if bytes.Equal(alg, k.der) {
			// x509 takes only the uncompressed form (0x04 || X || Y),
			// as crypto/ecdh does.
			_, err := k.curve.NewPublicKey(key.Bytes)
			return err == nil
		}
	}
	return false
}

// readURISAN reads a SubjectAltName extension's value holding exactly one
// URI and nothing else, into l.uri and l.host. The URI must be
// spiffe://<host>/<path>: host labels of [a-z0-9-], non-empty, no
// trailing dot (x509's domain check); the path of [A-Za-z0-9-._~/]
// (unreserved characters: url.Parse keeps them as they are and
// URL.String writes them back unescaped).
func readURISAN(value *cryptobyte.String, l *leaf) bool {
	var names, uri cryptobyte.String
	if !value.ReadASN1(&names, cbasn1.SEQUENCE) ||
		!names.ReadASN1(&uri, cbasn1.Tag(6).ContextSpecific()) || !names.Empty() {
		return false
	}
	const scheme = "spiffe://"
	if !bytes.HasPrefix(uri, []byte(scheme)) {
		return false
	}
	rest := uri[len(scheme):]
	slash := bytes.IndexByte(rest, '/')
	if slash <= 0 || !leafHost(rest[:slash]) {
		return false
	}
	for _, c := range rest[slash:] {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
			c == '-' || c == '.' || c == '_' || c == '~' || c == '/') {
			return false
		}
	}
	// One string for both: the URI is what the decision keys on and logs.
	l.uri = string(uri)
	l.host = l.uri[len(scheme) : len(scheme)+slash]
	return true
}

// leafHost: h is dot-separated non-empty labels of [a-z0-9-].
func leafHost(h []byte) bool {
	label := 0
	for i := 0; i <= len(h); i++ {
		if i == len(h) || h[i] == '.' {
			if label == 0 {
				return false
			}
			label = 0
			continue
		}
		c := h[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
			return false
		}
		label++
	}
	return true
}

// readEKU reads an ExtKeyUsage extension's value whose usages are all
// serverAuth, clientAuth or any, and reports in clientAuth whether it
// allows client authentication as issuedByTrusted reads x509's
// ExtKeyUsage: no usage at all, or clientAuth or any among them.
func readEKU(value *cryptobyte.String, clientAuth *bool) bool {
	var usages cryptobyte.String
	if !value.ReadASN1(&usages, cbasn1.SEQUENCE) {
		return false
	}
	*clientAuth = usages.Empty()
	for !usages.Empty() {
		var oid cryptobyte.String
		if !usages.ReadASN1(&oid, cbasn1.OBJECT_IDENTIFIER) {
			return false
		}
		switch {
		case bytes.Equal(oid, ekuClientAuth), bytes.Equal(oid, ekuAny):
			*clientAuth = true
		case bytes.Equal(oid, ekuServerAuth):
		default:
			return false
		}
	}
	return true
}
