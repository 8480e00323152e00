package certs

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

const webID = "spiffe://11111111-2222.consul/ns/default/dc/dc1/svc/web"

func TestNewBundle(t *testing.T) {
	ca := testenv.NewCA(t, "root")
	other := testenv.NewCA(t, "other")
	cert, key := ca.Leaf(t, webID)
	_, otherKey := other.Leaf(t, webID)
	noURI, noURIKey := ca.Leaf(t, "https://example.com/x")

	b, err := NewBundle(cert+"\n\n"+ca.CertPEM, key, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if b.SPIFFE != webID || b.Serial == "" || strings.Contains(b.PEM, "\n\n") || strings.Count(b.PEM, "BEGIN CERTIFICATE") != 2 {
		t.Errorf("bundle: %+v", b)
	}
	bad := []struct {
		name      string
		cert, key string
		now       time.Time
	}{
		{"key of another cert", cert, otherKey, time.Now()},
		{"no certificate", "", key, time.Now()},
		{"garbage certificate", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", key, time.Now()},
		{"no key", cert, "", time.Now()},
		{"expired", cert, key, time.Now().Add(48 * time.Hour)},
		{"no SPIFFE URI", noURI, noURIKey, time.Now()},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := NewBundle(tt.cert, tt.key, tt.now); !errors.Is(err, ErrInvalid) {
				t.Fatalf("got %v, want ErrInvalid", err)
			}
		})
	}
}

func TestNewRoots(t *testing.T) {
	a, b := testenv.NewCA(t, "a"), testenv.NewCA(t, "b")
	r, err := NewRoots([]string{a.CertPEM, b.CertPEM})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.IDs) != 2 || strings.Count(r.PEM, "BEGIN CERTIFICATE") != 2 {
		t.Errorf("roots: %+v", r)
	}
	if _, err := NewRoots(nil); !errors.Is(err, ErrInvalid) {
		t.Errorf("no roots: %v", err)
	}
	if _, err := NewRoots([]string{"junk"}); !errors.Is(err, ErrInvalid) {
		t.Errorf("junk root: %v", err)
	}
}

func TestParseSPIFFE(t *testing.T) {
	good := []struct {
		in   string
		want ID
		sni  string
	}{
		{webID, ID{TrustDomain: "11111111-2222.consul", Partition: "default", Namespace: "default", Datacenter: "dc1", Service: "web"},
			"web.default.dc1.internal.11111111-2222.consul"},
		{"spiffe://td.consul/ap/team/ns/ns1/dc/dc2/svc/api", ID{TrustDomain: "td.consul", Partition: "team", Namespace: "ns1", Datacenter: "dc2", Service: "api"},
			"api.ns1.team.dc2.internal-v1.td.consul"},
	}
	for _, tt := range good {
		got, err := ParseSPIFFE(tt.in)
		if err != nil {
			t.Fatalf("%s: %v", tt.in, err)
		}
		if diff := cmp.Diff(tt.want, got); diff != "" {
			t.Errorf("%s (-want +got):\n%s", tt.in, diff)
		}
		if sni := got.SNI(); sni != tt.sni {
			t.Errorf("%s: SNI %q, want %q", tt.in, sni, tt.sni)
		}
	}
	for _, bad := range []string{"", "web", "https://td/ns/default/dc/dc1/svc/web", "spiffe://td/ns/default/dc/dc1/svc/", "spiffe:///ns/a/dc/b/svc/c",
		"spiffe://td/ns/default/dc/dc1/svc/web/extra", "spiffe://td/agent/client/dc/dc1/id/x", "spiffe://td/ns/a/dc/b/svc/c?x=1",
		"spiffe://td/ns/default/dc/dc1/svc/a%20b", "spiffe://td/ns/default/dc/dc.1/svc/web", "spiffe://td/ns/default/dc/dc1/svc/w%C3%A9b",
		"spiffe://TD.consul/ns/a/dc/b/svc/c", "spiffe://td.consul:8080/ns/a/dc/b/svc/c", "spiffe://td_x.consul/ns/a/dc/b/svc/c"} {
		if _, err := ParseSPIFFE(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("ParseSPIFFE(%q) accepted", bad)
		}
	}
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "leaf.pem")
	for _, content := range []string{"one", "two"} {
		if err := WriteFile(p, content); err != nil {
			t.Fatal(err)
		}
		got, _ := os.ReadFile(p)
		st, _ := os.Stat(p)
		if string(got) != content || st.Mode().Perm() != 0o600 {
			t.Errorf("content %q mode %v", got, st.Mode())
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("temporary files left: %v", entries)
	}
	if err := WriteFile(filepath.Join(dir, "missing", "x.pem"), "x"); err == nil {
		t.Error("write into a missing directory succeeded")
	}
}
