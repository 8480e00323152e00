package bench

import (
	"math"
	"testing"
)

const wrkOut = `Running 2s test @ http://127.0.0.1:20001/
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   255.77us  123.45us   5.00ms   90.00%
    Req/Sec    30.00k     2.00k   35.00k    70.00%
  Latency Distribution
     50%  230.00us
     75%  280.00us
     90%  350.00us
     99%    1.20ms
  120000 requests in 2.00s, 10.00MB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 5
Requests/sec:  60000.50
Transfer/sec:      5.00MB
`

func TestParseWrk(t *testing.T) {
	r, err := ParseWrk(wrkOut)
	if err != nil {
		t.Fatal(err)
	}
	want := WrkResult{RPS: 60000.5, P50: 230e-6, P99: 1.2e-3, Requests: 120000, Connect: 1, Read: 2, Write: 3, Timeout: 4, Non2xx: 5}
	if math.Abs(r.P50-want.P50) > 1e-12 || math.Abs(r.P99-want.P99) > 1e-12 {
		t.Errorf("latencies %v %v, want %v %v", r.P50, r.P99, want.P50, want.P99)
	}
	r.P50, r.P99, want.P50, want.P99 = 0, 0, 0, 0
	if r != want {
		t.Errorf("got %+v, want %+v", r, want)
	}
	if r.Errors() != 15 {
		t.Errorf("errors %d, want 15", r.Errors())
	}

	// No error lines when there are none; seconds as a unit.
	clean := `  Latency Distribution
     50%    1.00s
     99%    2.50s
  10 requests in 5.00s, 1.00KB read
Requests/sec:      2.00
`
	r, err = ParseWrk(clean)
	if err != nil {
		t.Fatal(err)
	}
	if r.P50 != 1 || r.P99 != 2.5 || r.Errors() != 0 || r.Requests != 10 || r.RPS != 2 {
		t.Errorf("got %+v", r)
	}

	if _, err := ParseWrk("Requests/sec: 1.0\n"); err == nil {
		t.Error("output without latency distribution parsed")
	}
}

func TestParseStot(t *testing.T) {
	csv := "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin\n" +
		"public_listener,FRONTEND,,,0,3,2000,1234,0\n" +
		"up_server,FRONTEND,,,0,1,2000,7,0\n\n"
	for _, tt := range []struct {
		frontend string
		want     int64
	}{{"public_listener", 1234}, {"up_server", 7}} {
		got, err := ParseStot(csv, tt.frontend)
		if err != nil || got != tt.want {
			t.Errorf("%s: %d, %v; want %d", tt.frontend, got, err, tt.want)
		}
	}
	if _, err := ParseStot(csv, "missing"); err == nil {
		t.Error("missing frontend found")
	}
}

func TestPairFiguresAdd(t *testing.T) {
	var f PairFigures
	f.Add([]WrkResult{{RPS: 100, P99: 2, Requests: 500}, {RPS: 110, P99: 3, Requests: 550}},
		[]WrkResult{{RPS: 90, P99: 4, Requests: 450}, {RPS: 95, P99: 5, Requests: 475}}, 185.0/210)
	f.Add([]WrkResult{{RPS: 120}}, []WrkResult{{RPS: 60, Requests: 300}}, 0.5)
	if len(f.A) != 3 || len(f.B) != 3 || len(f.AP99) != 3 || len(f.BP99) != 3 || len(f.Ratio) != 2 {
		t.Fatalf("rounds: %+v", f)
	}
	if f.B[2] != 60 || f.BP99[1] != 5 || f.Ratio[1] != 0.5 || f.BRequests != 1225 {
		t.Fatalf("figures: %+v", f)
	}
}
