package bootstrap

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/haproxy-connect/haproxy-connect/slots"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// TestSANPattern: the pattern is the DER encoding of the URI SAN, so it
// is found in a certificate that carries the ID and not in one whose URI
// only starts with it.
func TestSANPattern(t *testing.T) {
	ca := testenv.NewCA(t, "root")
	const id = "spiffe://td.consul/ns/default/dc/dc1/svc/web"
	tests := []struct {
		name, uri string
		want      bool
	}{
		{"the ID", id, true},
		{"another service", "spiffe://td.consul/ns/default/dc/dc1/svc/api", false},
		{"a longer name with the ID as prefix", id + "-admin", false},
		{"another trust domain", "spiffe://other.consul/ns/default/dc/dc1/svc/web", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			certPEM, _ := ca.Leaf(t, tt.uri)
			blk, _ := pem.Decode([]byte(certPEM))
			hexDER := strings.ToUpper(hex.EncodeToString(blk.Bytes))
			if got := strings.Contains(hexDER, sanPattern(id)); got != tt.want {
				t.Errorf("pattern found = %v, want %v", got, tt.want)
			}
		})
	}
	// Long IDs use DER's long length forms.
	for _, n := range []int{127, 128, 255, 256} {
		p := sanPattern(strings.Repeat("a", n))
		want := map[int]string{127: "867F", 128: "868180", 255: "8681FF", 256: "86820100"}[n]
		if !strings.HasPrefix(p, want) || len(p) != len(want)+2*n {
			t.Errorf("sanPattern of %d bytes starts %q (len %d), want %q", n, p[:8], len(p), want)
		}
	}
}

// TestServerIdentityLine runs the rendered configuration on real HAProxy
// with an upstream whose one server holds a valid mesh leaf: of the
// destination, or of another service (an address that changed hands after
// it was verified). The other service's answer never reaches the caller.
func TestServerIdentityLine(t *testing.T) {
	ca := testenv.NewCA(t, "mesh root")
	const webID = "spiffe://td.consul/ns/default/dc/dc1/svc/web"
	const otherID = "spiffe://td.consul/ns/default/dc/dc1/svc/other"
	dir := testenv.ShortTempDir(t)
	clientCert, clientKey := ca.Leaf(t, "spiffe://td.consul/ns/default/dc/dc1/svc/client")
	testenv.WriteFile(t, dir, "leaf.pem", clientCert+clientKey)
	testenv.WriteFile(t, dir, "roots.pem", ca.CertPEM)
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)

	// meshServer serves as holder of id: HTTP answers "hello from <name>",
	// TCP writes that line first.
	meshServer := func(id, name string, httpMode bool) int {
		certPEM, keyPEM := ca.Leaf(t, id)
		cert, err := tls.X509KeyPair([]byte(certPEM), []byte(keyPEM))
		if err != nil {
			t.Fatal(err)
		}
		ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert},
			ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: roots, NextProtos: []string{"http/1.1"}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		if httpMode {
			srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
				fmt.Fprintf(w, "hello from %s\n", name)
			})}
			go srv.Serve(ln)
			t.Cleanup(func() { srv.Close() })
		} else {
			go testenv.Serve(ln, func(c net.Conn) { fmt.Fprintf(c, "hello from %s\n", name) })
		}
		return ln.Addr().(*net.TCPAddr).Port
	}

	spec := baseSpec()
	spec.LeafFile, spec.RootsFile, spec.SPOEFile, spec.AuthzMap = dir+"/leaf.pem", dir+"/roots.pem", dir+"/spoe.cfg", dir+"/authz.map"
	spec.CrtList, spec.StateMap, spec.SourcesMap = dir+"/public.crtlist", dir+"/state.map", dir+"/sources.map"
	ports := testenv.FreePorts(t, 5)
	spec.Public.BindAddr, spec.Public.BindPort = "127.0.0.1", ports[0]
	type tc struct {
		name     string
		httpMode bool
		holder   string // the name of the service whose leaf the server holds
		port     int    // the upstream's local port
	}
	cases := []tc{{"http, the destination", true, "web", ports[1]}, {"http, another service", true, "other", ports[2]},
		{"tcp, the destination", false, "web", ports[3]}, {"tcp, another service", false, "other", ports[4]}}
	for i, c := range cases {
		id := map[string]string{"web": webID, "other": otherID}[c.holder]
		proto := "tcp"
		if c.httpMode {
			proto = "http"
		}
		u := upstream(fmt.Sprintf("web%d", i), c.port, proto, 1,
			slots.Endpoint{Addr: "127.0.0.1", Port: meshServer(id, c.holder, c.httpMode), Weight: 1})
		u.ServerID = webID
		spec.Upstreams = append(spec.Upstreams, u)
	}
	cfg, files, err := RenderFiles(spec, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		testenv.WriteFile(t, dir, filepath.Base(f.Path), f.Content)
	}
	testenv.HAProxy(t, cfg)

	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var got string
			if c.httpMode {
				resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/", c.port))
				if err != nil {
					t.Fatal(err)
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				got = fmt.Sprintf("%d %s", resp.StatusCode, strings.TrimSpace(string(b)))
			} else {
				conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", c.port), 2*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
				line, _ := bufio.NewReader(conn).ReadString('\n')
				conn.Close()
				got = strings.TrimSpace(line)
			}
			if c.holder == "web" {
				want := "hello from web"
				if c.httpMode {
					want = "200 " + want
				}
				if got != want {
					t.Errorf("got %q, want %q", got, want)
				}
				return
			}
			if strings.Contains(got, "hello from other") {
				t.Errorf("the other service's answer reached the caller: %q", got)
			}
			if c.httpMode && !strings.HasPrefix(got, "502 ") {
				t.Errorf("got %q, want a 502", got)
			}
		})
	}
}
