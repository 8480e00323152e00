package testenv

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// CA is a throwaway certificate authority for tests that need TLS material
// without a Consul agent: it issues leaf certificates carrying a SPIFFE URI
// SAN, like Consul's.
type CA struct {
	Cert    *x509.Certificate
	Key     *ecdsa.PrivateKey
	CertPEM string
}

var serial = big.NewInt(time.Now().UnixNano())

func nextSerial() *big.Int { return serial.Add(serial, big.NewInt(1)) }

// NewCA makes a self-signed root.
func NewCA(t testing.TB, name string) *CA {
	t.Helper()
	ca, err := GenerateCA(name)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// Intermediate makes a CA signed by ca, as Consul's providers other than
// the built-in one (and secondary datacenters) sign leaves.
func (ca *CA) Intermediate(t testing.TB, name string) *CA {
	t.Helper()
	in, err := generateCA(name, ca)
	if err != nil {
		t.Fatal(err)
	}
	return in
}

// GenerateCA is NewCA for callers outside tests (meshbench).
func GenerateCA(name string) (*CA, error) { return generateCA(name, nil) }

// generateCA makes a CA signed by parent, or self-signed if parent is nil.
func generateCA(name string, parent *CA) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          new(big.Int).Set(nextSerial()),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	signer, signerKey := tmpl, key
	if parent != nil {
		signer, signerKey = parent.Cert, parent.Key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signerKey)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key, CertPEM: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))}, nil
}

// Leaf issues a leaf for spiffeID (e.g. spiffe://x.consul/ns/default/dc/dc1/svc/web)
// and returns the certificate PEM and the key PEM.
func (ca *CA) Leaf(t testing.TB, spiffeID string) (certPEM, keyPEM string) {
	t.Helper()
	certPEM, keyPEM, err := ca.IssueLeaf(spiffeID)
	if err != nil {
		t.Fatal(err)
	}
	return certPEM, keyPEM
}

// IssueLeaf is Leaf for callers outside tests (meshbench).
func (ca *CA) IssueLeaf(spiffeID string) (certPEM, keyPEM string, err error) {
	return ca.IssueLeafURIs(spiffeID)
}

// IssueLeafURIs issues a leaf shaped like Consul's (empty subject, client
// and server auth) with any number of URI SANs: none, two, an agent's
// SPIFFE ID, one of another trust domain. Tests of what the sidecar refuses
// use it.
func (ca *CA) IssueLeafURIs(uris ...string) (certPEM, keyPEM string, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", err
	}
	var us []*url.URL
	for _, s := range uris {
		u, err := url.Parse(s)
		if err != nil {
			return "", "", err
		}
		us = append(us, u)
	}
	tmpl := &x509.Certificate{
		SerialNumber: new(big.Int).Set(nextSerial()),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		URIs:         us,
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return "", "", err
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return "", "", err
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})), nil
}

// WriteFile writes content to dir/name (0600) and returns the path.
func WriteFile(t testing.TB, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
