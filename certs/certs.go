// Package certs turns Consul's leaf certificate and CA roots into the PEM
// files HAProxy loads, checks them before they reach HAProxy, and writes them
// atomically. It knows neither the runtime socket nor the Consul API types.
package certs

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/haproxy-connect/haproxy-connect/input"
)

// ErrInvalid is wrapped by every rejection of certificate material.
var ErrInvalid = errors.New("invalid certificate material")

// Bundle is a leaf certificate with its intermediates and private key.
type Bundle struct {
	// PEM is what HAProxy loads: the leaf, its intermediates, then the key,
	// with no blank lines (a blank line ends a runtime payload early).
	PEM      string
	Serial   string // hex, as Consul reports it
	NotAfter time.Time
	SPIFFE   string // the URI SAN
}

// NewBundle checks a leaf from Consul (CertPEM holds the leaf first, then
// any intermediates; Consul's leaf has no DNS SAN and an empty subject, so
// its identity is the URI SAN) and the matching key.
func NewBundle(certPEM, keyPEM string, now time.Time) (Bundle, error) {
	chain, err := ParsePEM(certPEM)
	if err != nil {
		return Bundle{}, fmt.Errorf("leaf: %w", err)
	}
	leaf := chain[0]
	key, keyBlock, err := parseKey(keyPEM)
	if err != nil {
		return Bundle{}, fmt.Errorf("leaf key: %w", err)
	}
	if !publicKeyMatches(leaf.PublicKey, key) {
		return Bundle{}, fmt.Errorf("%w: leaf key does not match the certificate", ErrInvalid)
	}
	if now.After(leaf.NotAfter) {
		return Bundle{}, fmt.Errorf("%w: leaf expired at %s", ErrInvalid, leaf.NotAfter.Format(time.RFC3339))
	}
	id, err := SPIFFEOf(leaf)
	if err != nil {
		return Bundle{}, err
	}
	var b strings.Builder
	for _, c := range chain {
		b.Write(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
	}
	b.Write(pem.EncodeToMemory(keyBlock))
	return Bundle{PEM: b.String(), Serial: SerialOf(leaf), NotAfter: leaf.NotAfter, SPIFFE: id}, nil
}

// Roots is the set of trusted CA roots: every root Consul lists, so that
// leaves signed by an old or a new root both verify during a rotation.
type Roots struct {
	PEM string
	IDs []string // SHA-256 fingerprints, in input order
	// TrustDomain is Consul's trust domain for these roots (the
	// TrustDomain of /v1/agent/connect/ca/roots): the host part of every
	// SPIFFE ID the mesh issues. The caller sets it.
	TrustDomain string
}

// NewRoots checks and joins root certificates.
func NewRoots(pems []string) (Roots, error) {
	if len(pems) == 0 {
		return Roots{}, fmt.Errorf("%w: no CA roots", ErrInvalid)
	}
	var r Roots
	var b strings.Builder
	for i, p := range pems {
		certs, err := ParsePEM(p)
		if err != nil {
			return Roots{}, fmt.Errorf("root %d: %w", i, err)
		}
		for _, c := range certs {
			b.Write(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
			r.IDs = append(r.IDs, fmt.Sprintf("%x", sha256Sum(c.Raw)))
		}
	}
	r.PEM = b.String()
	return r, nil
}

// ParsePEM parses the certificates of a PEM bundle (other blocks are
// skipped); a bundle without one, or with one that does not parse, is an
// error.
func ParsePEM(s string) ([]*x509.Certificate, error) {
	rest := []byte(s)
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: no PEM certificate", ErrInvalid)
	}
	return out, nil
}

func parseKey(s string) (crypto.PrivateKey, *pem.Block, error) {
	rest := []byte(s)
	for {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			return nil, nil, fmt.Errorf("%w: no PEM private key", ErrInvalid)
		}
		switch blk.Type {
		case "EC PRIVATE KEY":
			k, err := x509.ParseECPrivateKey(blk.Bytes)
			if err != nil {
				return nil, nil, fmt.Errorf("%w: %v", ErrInvalid, err)
			}
			return k, blk, nil
		case "RSA PRIVATE KEY":
			k, err := x509.ParsePKCS1PrivateKey(blk.Bytes)
			if err != nil {
				return nil, nil, fmt.Errorf("%w: %v", ErrInvalid, err)
			}
			return k, blk, nil
		case "PRIVATE KEY":
			k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
			if err != nil {
				return nil, nil, fmt.Errorf("%w: %v", ErrInvalid, err)
			}
			return k, blk, nil
		}
	}
}

func publicKeyMatches(pub crypto.PublicKey, key crypto.PrivateKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	var kp crypto.PublicKey
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		kp = k.Public()
	case *rsa.PrivateKey:
		kp = k.Public()
	case ed25519.PrivateKey:
		kp = k.Public()
	default:
		return false
	}
	e, ok := kp.(equaler)
	return ok && e.Equal(pub)
}

// SerialOf is c's serial number as Consul reports it: lower-case hex bytes
// joined by colons.
func SerialOf(c *x509.Certificate) string {
	b := c.SerialNumber.Bytes()
	parts := make([]string, len(b))
	for i, x := range b {
		parts[i] = fmt.Sprintf("%02x", x)
	}
	return strings.Join(parts, ":")
}

// ID is a parsed Consul SPIFFE service identity:
// spiffe://<trust-domain>/[ap/<partition>/]ns/<ns>/dc/<dc>/svc/<service>.
type ID struct {
	TrustDomain, Partition, Namespace, Datacenter, Service string
}

// ParseSPIFFE parses a Consul service SPIFFE ID.
func ParseSPIFFE(s string) (ID, error) {
	u, err := url.Parse(s)
	if err != nil || u.Scheme != "spiffe" || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
		return ID{}, fmt.Errorf("%w: %q is not a SPIFFE ID", ErrInvalid, s)
	}
	parts := strings.Split(strings.TrimPrefix(u.Path, "/"), "/")
	id := ID{TrustDomain: u.Host, Partition: "default"}
	if len(parts) == 8 && parts[0] == "ap" {
		id.Partition = parts[1]
		parts = parts[2:]
	}
	if len(parts) != 6 || parts[0] != "ns" || parts[2] != "dc" || parts[4] != "svc" || parts[1] == "" || parts[3] == "" || parts[5] == "" {
		return ID{}, fmt.Errorf("%w: %q is not a Consul service SPIFFE ID", ErrInvalid, s)
	}
	id.Namespace, id.Datacenter, id.Service = parts[1], parts[3], parts[5]
	if _, err := input.DNSName("SPIFFE ID trust domain", id.TrustDomain); err != nil {
		return ID{}, fmt.Errorf("%w: %q: %w", ErrInvalid, s, err)
	}
	// Each part from the alphabet the sidecar accepts anywhere (package
	// input): the ID is compared with names taken from the registration,
	// and logged.
	for _, c := range []struct {
		check func(string, string) (string, error)
		field string
		v     string
	}{
		{input.Name, "partition", id.Partition}, {input.Name, "namespace", id.Namespace},
		{input.Datacenter, "datacenter", id.Datacenter}, {input.Name, "service", id.Service},
	} {
		if _, err := c.check("SPIFFE ID "+c.field, c.v); err != nil {
			return ID{}, fmt.Errorf("%w: %q: %w", ErrInvalid, s, err)
		}
	}
	return id, nil
}

// SNI is the TLS server name Consul gives the service of id:
// <service>.<namespace>.<datacenter>.internal.<trust domain>, with the
// partition before the datacenter and "internal-v1" outside the default
// partition (Consul's connect.ServiceSNI), in lower case as HAProxy
// compares server names.
func (id ID) SNI() string {
	return strings.ToLower(id.sni())
}

func (id ID) sni() string {
	if id.Partition == "" || id.Partition == "default" {
		return strings.Join([]string{id.Service, id.Namespace, id.Datacenter, "internal", id.TrustDomain}, ".")
	}
	return strings.Join([]string{id.Service, id.Namespace, id.Partition, id.Datacenter, "internal-v1", id.TrustDomain}, ".")
}

// SPIFFEOf returns the one SPIFFE URI SAN of c.
func SPIFFEOf(c *x509.Certificate) (string, error) {
	var found []string
	for _, u := range c.URIs {
		if u.Scheme == "spiffe" {
			found = append(found, u.String())
		}
	}
	if len(found) != 1 {
		return "", fmt.Errorf("%w: certificate has %d SPIFFE URI SANs, want 1", ErrInvalid, len(found))
	}
	if _, err := ParseSPIFFE(found[0]); err != nil {
		return "", err
	}
	return found[0], nil
}

// WriteFile replaces path with content atomically (a temporary file in the
// same directory, synced, then renamed), mode 0600: a reload or a reader
// never sees half a key.
func WriteFile(path, content string) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if _, err := f.WriteString(content); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
