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
// certificate, as HAProxy's NOTIFY handler runs it (decide: parse the
// certificate, its SHA-256, the cache; on a miss the chain check against
// the CA roots and the intentions held; the log line), without the SPOP
// framing. uncached drops the decision cache before each decision
// (Invalidate is in the timed span), as an intention change does: the
// certificate's chain check is remembered (checkOnce), the intentions are
// walked again. uncached_new_cert forgets the chain check too: a
// certificate never seen, the chain verified (one ECDSA P-256 signature
// check, most of the time). The destination holds 64 intentions and the
// source matches the 48th. Reported: mean (ns/op) and p50/p99 per
// decision (ns). Logging as the sidecar does: info, JSON, to nowhere.
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
	}{{"cached", false, false}, {"uncached", true, false}, {"uncached_new_cert", true, true}} {
		b.Run(bc.name, func(b *testing.B) {
			if d := a.decide(der, nil); !d.allowed {
				b.Fatalf("not allowed: %s", d.reason)
			}
			took := make([]time.Duration, 0, b.N)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				start := time.Now()
				if bc.newCert {
					a.verifiedMu.Lock()
					clear(a.verified)
					a.verifiedMu.Unlock()
				}
				if bc.uncached {
					a.Invalidate()
				}
				d := a.decide(der, nil)
				took = append(took, time.Since(start))
				if !d.allowed || (d.how == originCache) == bc.uncached {
					b.Fatalf("decision %+v", d)
				}
			}
			b.StopTimer()
			slices.Sort(took)
			b.ReportMetric(float64(took[len(took)/2].Nanoseconds()), "p50-ns")
			b.ReportMetric(float64(took[len(took)*99/100].Nanoseconds()), "p99-ns")
		})
	}
}
