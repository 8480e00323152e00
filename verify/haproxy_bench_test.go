package verify

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// BenchmarkProofHAProxy is what one proof costs the other sidecar's
// HAProxy and this process, against a real HAProxy listener configured as
// the public one is (bootstrap: crt, ca-file, verify required, alpn, the
// session cache), with and without stateless TLS tickets. Reported per
// proof: haproxy-µs, the worker's CPU; client-µs, this process's.
// "stop-at-server-finished" is a lever measured and not taken: a proof
// that ends once the server has proven itself (before the client's
// certificate) costs the listener far less, but every proof then reaches
// the other sidecar's log and counters as a failed handshake.
//
//	go test -run '^$' -bench ProofHAProxy -benchtime 2000x ./verify
func BenchmarkProofHAProxy(b *testing.B) {
	ca := testenv.NewCA(b, "mesh root")
	dir := testenv.ShortTempDir(b)
	wc, wk := ca.Leaf(b, webID)
	crt := testenv.WriteFile(b, dir, "web.pem", wc+wk)
	roots := testenv.WriteFile(b, dir, "roots.pem", ca.CertPEM)
	cc, ck := ca.Leaf(b, clientID)
	cfg, err := NewConfig(cc+ck, ca.CertPEM)
	if err != nil {
		b.Fatal(err)
	}
	cfg.ALPN = []string{"h2", "http/1.1"}
	ports := testenv.FreePorts(b, 2)
	bind := func(port int, opts string) string {
		return fmt.Sprintf("frontend f%d\n    bind 127.0.0.1:%d ssl crt %s ca-file %s verify required alpn h2,http/1.1%s\n    default_backend none\n", port, port, crt, roots, opts)
	}
	h := testenv.HAProxy(b, fmt.Sprintf("global\n    nbthread 1\n    ssl-default-bind-options ssl-min-ver TLSv1.2\n    tune.ssl.cachesize %d\n"+
		"defaults\n    mode http\n    timeout connect 5s\n    timeout client 5s\n    timeout server 5s\n%s%sbackend none\n",
		bootstrap.SSLSessionCache, bind(ports[0], ""), bind(ports[1], " no-tls-tickets")))
	worker := workerPID(b, h)
	for _, bm := range []struct {
		name  string
		port  int
		proof func(addr string) error
	}{
		{"listener=tickets", ports[0], func(addr string) error { _, err := Endpoint(context.Background(), cfg, addr, webID); return err }},
		{"listener=no-tls-tickets", ports[1], func(addr string) error { _, err := Endpoint(context.Background(), cfg, addr, webID); return err }},
		{"listener=no-tls-tickets/proof=stop-at-server-finished", ports[1], func(addr string) error { return stopAtServerFinished(cfg, addr) }},
	} {
		b.Run(bm.name, func(b *testing.B) {
			addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(bm.port))
			w0, c0 := cpuOf(b, worker), selfCPU()
			for b.Loop() {
				if err := bm.proof(addr); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64((cpuOf(b, worker)-w0).Microseconds())/float64(b.N), "haproxy-µs/op")
			b.ReportMetric(float64((selfCPU()-c0).Microseconds())/float64(b.N), "client-µs/op")
		})
	}
}

var errServerProven = errors.New("server proven")

// stopAtServerFinished is the lever: Endpoint's checks, then the
// handshake is dropped where the client would send its certificate, after
// the server's CertificateVerify and Finished.
func stopAtServerFinished(cfg Config, addr string) error {
	tc := &tls.Config{
		Certificates: []tls.Certificate{cfg.Leaf}, NextProtos: cfg.ALPN, MinVersion: tls.VersionTLS13,
		CurvePreferences: []tls.CurveID{tls.X25519}, InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			id, _, err := Check(cs.PeerCertificates, cfg.Roots)
			if err == nil && id != webID {
				err = ErrMismatch
			}
			return err
		},
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return nil, errServerProven },
	}
	conn, err := tls.Dial("tcp", addr, tc)
	if err == nil {
		conn.Close()
		return errors.New("handshake completed")
	}
	if !errors.Is(err, errServerProven) {
		return err
	}
	return nil
}

// workerPID is the pid of h's current worker.
func workerPID(tb testing.TB, h *testenv.HAProxyProc) int {
	tb.Helper()
	out, err := h.MasterCommand("show proc")
	if err != nil {
		tb.Fatal(err)
	}
	procs, err := runtime.ParseProcList(out)
	if err != nil {
		tb.Fatal(err)
	}
	w, ok := procs.Current()
	if !ok {
		tb.Fatalf("no current worker in:\n%s", out)
	}
	return w.PID
}

// cpuOf is pid's CPU time so far.
func cpuOf(tb testing.TB, pid int) time.Duration {
	tb.Helper()
	d, err := testenv.CPUTime(pid)
	if err != nil {
		tb.Fatal(err)
	}
	return d
}

// selfCPU is this process's user and system time.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
