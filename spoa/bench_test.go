package spoa

import (
	"crypto/x509"
	"fmt"
	"io"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/haproxy-connect/haproxy-connect/intentions"
)

// BenchmarkDecide times the agent's whole decision for one client
// certificate, as HAProxy's NOTIFY handler runs it (decide: the
// certificate's SHA-256, the cache; on a miss the certificate's checks and
// the intentions held; the log line), without the SPOP framing; the timed
// span is decide alone, what HAProxy waits for. uncached drops the
// decision cache before each decision (Invalidate), as an intention change
// does: the certificate is known (not
// parsed again) and its checks are remembered (checkOnce), the intentions
// are walked again. uncached_new_cert forgets the certificate and its
// decision instead: one never seen, parsed and checked, with the agent verifying its chain (one
// ECDSA P-256 signature check, most of the time), as when HAProxy's roots
// are not known to be the agent's (served.go). uncached_new_cert_served is
// the same with HAProxy's roots announced (RootsServed), the sidecar's
// steady state: HAProxy verified the chain at the handshake, and the agent
// reads only the fields it checks (parseLeaf, leaf.go). Both keep the
// source's parsed SPIFFE ID (sourceID), as for a renewed leaf or another
// instance of a source seen before. The
// destination holds 64 intentions and the source matches the 48th.
// Reported: mean (ns/op) and p50/p99/p99.9 per decision (ns). Logging as
// the sidecar does: info, JSON, to nowhere.
func BenchmarkDecide(b *testing.B) {
	log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(io.Discard), zapcore.InfoLevel))
	a := New("web", nil, log)
	defer a.Close()
	ca := testCA()
	if err := a.SetRoots(testTD, []*x509.Certificate{ca.Cert}, nil); err != nil {
		b.Fatal(err)
	}
	var served []*api.Intention
	for i := range 64 {
		served = append(served, &api.Intention{SourceNS: "default", SourceName: fmt.Sprintf("svc-%02d", i),
			DestinationNS: "default", DestinationName: "web", Action: api.IntentionActionAllow})
	}
	served = append(served, &api.Intention{SourceNS: "default", SourceName: "*", DestinationNS: "default", DestinationName: "*", Action: api.IntentionActionDeny})
	set, skipped := intentions.New(destination("web"), served, intentions.Default{Reason: "Default intention policy"})
	if len(skipped) > 0 {
		b.Fatal(skipped)
	}
	a.SetIntentions(set)
	der := leafDER(b, ca, 7, "spiffe://"+testTD+"/ns/default/dc/dc1/svc/svc-47")
	for _, bc := range []struct {
		name     string
		uncached bool
		// newCert also forgets the certificate's chain check: a
		// certificate the agent has never seen.
		newCert bool
		// served announces the CA's root as HAProxy's (RootsServed).
		served bool
	}{{"cached", false, false, false}, {"uncached", true, false, false}, {"uncached_new_cert", true, true, false},
		{"uncached_new_cert_served", true, true, true}} {
		b.Run(bc.name, func(b *testing.B) {
			a.served = servedRoots{}
			if bc.served {
				if err := a.RootsServed(ca.CertPEM, true); err != nil {
					b.Fatal(err)
				}
			}
			if d := a.decide(der, nil); !d.allowed {
				b.Fatalf("not allowed: %s", d.reason)
			}
			before := a.Stats().ChainVerifications
			took := make([]time.Duration, 0, b.N)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if bc.newCert {
					a.verifiedMu.Lock()
					clear(a.verified)
					a.verifiedMu.Unlock()
					a.certs.mu.Lock()
					clear(a.certs.m)
					a.certs.mu.Unlock()
					a.mu.Lock()
					clear(a.cache)
					a.mu.Unlock()
				} else if bc.uncached {
					a.Invalidate()
				}
				start := time.Now()
				d := a.decide(der, nil)
				took = append(took, time.Since(start))
				if !d.allowed || (d.how == originCache) == bc.uncached {
					b.Fatalf("decision %+v", d)
				}
			}
			b.StopTimer()
			if n := a.Stats().ChainVerifications - before; (n > 0) != (bc.newCert && !bc.served) {
				b.Fatalf("%d chain verifications", n)
			}
			slices.Sort(took)
			b.ReportMetric(float64(took[len(took)/2].Nanoseconds()), "p50-ns")
			b.ReportMetric(float64(took[len(took)*99/100].Nanoseconds()), "p99-ns")
			b.ReportMetric(float64(took[len(took)*999/1000].Nanoseconds()), "p99.9-ns")
		})
	}
}
