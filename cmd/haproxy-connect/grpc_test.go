package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// startProtocolMesh is startMesh for a server application on port app
// whose protocol comes from Consul's service-defaults, as it does for
// gRPC users: neither registration names a protocol, and the agent merges
// the entry into the server's sidecar (its public listener) and into the
// client's upstream. It returns the client's upstream port, once the
// client sidecar has the server sidecar as endpoint.
func startProtocolMesh(t *testing.T, protocol string, app int) (upstream int) {
	t.Helper()
	return startProtocolMeshWith(t, protocol, app, func(consul *testenv.ConsulProc) { startSidecar(t, consul, "server") })
}

// startProtocolMeshWith is startProtocolMesh with the server's sidecar
// started by startServer.
func startProtocolMeshWith(t *testing.T, protocol string, app int, startServer func(*testenv.ConsulProc)) (upstream int) {
	t.Helper()
	consul := testenv.Consul(t, testenv.ConsulOptions{})
	c := consul.Client
	if _, _, err := c.ConfigEntries().Set(&api.ServiceConfigEntry{Kind: api.ServiceDefaults, Name: "server", Protocol: protocol}, nil); err != nil {
		t.Fatal(err)
	}
	// ports: server sidecar, client app, client sidecar, client's upstream.
	ports := testenv.FreePorts(t, 4)
	register(t, c, "server", app, ports[0], nil)
	register(t, c, "client", ports[1], ports[2], nil, api.Upstream{DestinationName: "server", LocalBindPort: ports[3]})
	// The test is only worth its name if the protocol really came from the
	// config entry into both registrations.
	for _, id := range []string{"server-sidecar-proxy", "client-sidecar-proxy"} {
		eventually(t, 10*time.Second, id+" carries protocol "+protocol, func() error {
			svc, _, err := c.Agent().Service(id, nil)
			if err != nil {
				return err
			}
			got := svc.Proxy.Config["protocol"]
			if id == "client-sidecar-proxy" && len(svc.Proxy.Upstreams) == 1 {
				got = svc.Proxy.Upstreams[0].Config["protocol"]
			}
			if got != protocol {
				return fmt.Errorf("protocol %v", got)
			}
			return nil
		})
	}
	startServer(consul)
	client := startSidecar(t, consul, "client")
	eventually(t, 10*time.Second, "client sidecar has the server endpoint", client.inBackend("up_server", ports[0]))
	return ports[3]
}

// The test service, defined without protoc: a grpc.ServiceDesc whose
// handlers decode well-known wrapper messages with grpc's default proto
// codec.
const testService = "hctest.Probe"

// probeServer is the server side of testService, and what it observed.
type probeServer struct {
	// slow receives, for each Slow call, the deadline the server saw
	// (zero if none) and the error its context ended with.
	slow chan slowCall
}

type slowCall struct {
	deadline time.Time
	err      error
}

func (p *probeServer) desc() *grpc.ServiceDesc {
	unary := func(name string, h func(ctx context.Context, in *wrapperspb.StringValue) (*wrapperspb.StringValue, error)) grpc.MethodDesc {
		return grpc.MethodDesc{MethodName: name, Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			in := new(wrapperspb.StringValue)
			if err := dec(in); err != nil {
				return nil, err
			}
			return h(ctx, in)
		}}
	}
	return &grpc.ServiceDesc{
		ServiceName: testService,
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{
			// Echo answers its input and sets a trailer.
			unary("Echo", func(ctx context.Context, in *wrapperspb.StringValue) (*wrapperspb.StringValue, error) {
				_ = grpc.SetTrailer(ctx, metadata.Pairs("x-probe-trailer", "echo "+in.Value))
				return wrapperspb.String(in.Value), nil
			}),
			// Missing fails with NotFound, and still sets a trailer.
			unary("Missing", func(ctx context.Context, in *wrapperspb.StringValue) (*wrapperspb.StringValue, error) {
				_ = grpc.SetTrailer(ctx, metadata.Pairs("x-probe-trailer", "missing "+in.Value))
				return nil, status.Errorf(codes.NotFound, "no such thing: %q", in.Value)
			}),
			// Slow answers only after its caller's deadline, or after 10 s.
			unary("Slow", func(ctx context.Context, in *wrapperspb.StringValue) (*wrapperspb.StringValue, error) {
				dl, _ := ctx.Deadline()
				select {
				case <-ctx.Done():
				case <-time.After(10 * time.Second):
				}
				p.slow <- slowCall{deadline: dl, err: ctx.Err()}
				return wrapperspb.String("too late"), nil
			}),
		},
		Streams: []grpc.StreamDesc{{
			// Count sends n messages "1".."n", then a trailer.
			StreamName: "Count", ServerStreams: true,
			Handler: func(_ any, stream grpc.ServerStream) error {
				in := new(wrapperspb.UInt32Value)
				if err := stream.RecvMsg(in); err != nil {
					return err
				}
				for i := range in.Value {
					if err := stream.SendMsg(wrapperspb.String(fmt.Sprint(i + 1))); err != nil {
						return err
					}
				}
				stream.SetTrailer(metadata.Pairs("x-probe-trailer", fmt.Sprintf("counted %d", in.Value)))
				return nil
			},
		}},
	}
}

// grpcApp serves the gRPC health service (with service "server" SERVING)
// and testService on a free loopback port, over cleartext HTTP/2 only, as
// grpc-go does.
func grpcApp(t *testing.T) (int, *probeServer) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus("server", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	p := &probeServer{slow: make(chan slowCall, 1)}
	srv.RegisterService(p.desc(), p)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)
	return ln.Addr().(*net.TCPAddr).Port, p
}

// TestGRPC: a grpc-go client on the client sidecar's upstream port calls a
// grpc-go server behind the server sidecar, the protocol set to grpc by
// service-defaults. Unary and server-streaming calls succeed; a deadline
// reaches the server and ends the call with DeadlineExceeded; the server's
// error status and trailers reach the client unchanged.
func TestGRPC(t *testing.T) {
	app, probe := grpcApp(t)
	upstream := startProtocolMesh(t, "grpc", app)
	conn := grpcConn(t, upstream)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	healthClient := healthpb.NewHealthClient(conn)
	check := func() error {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		resp, err := healthClient.Check(ctx, &healthpb.HealthCheckRequest{Service: "server"})
		if err != nil {
			return err
		}
		if resp.Status != healthpb.HealthCheckResponse_SERVING {
			return fmt.Errorf("status %s", resp.Status)
		}
		return nil
	}
	// Intentions and the first pooled connection settle on the first call.
	eventually(t, 10*time.Second, "the first Health/Check call succeeds", check)

	t.Run("unary", func(t *testing.T) {
		if failed, first := failures(50, check); failed > 0 {
			t.Errorf("%d of 50 Health/Check calls failed; first: %v", failed, first)
		}
		if err := echo(ctx, conn); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("server streaming", func(t *testing.T) { checkCount(ctx, t, conn, 20) })

	t.Run("deadline", func(t *testing.T) {
		const timeout = 500 * time.Millisecond
		callCtx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		sent := time.Now()
		err := conn.Invoke(callCtx, "/"+testService+"/Slow", wrapperspb.String("x"), new(wrapperspb.StringValue))
		if code := status.Code(err); code != codes.DeadlineExceeded {
			t.Fatalf("Slow: %v (code %s), want DeadlineExceeded", err, code)
		}
		// The deadline travelled with the call (grpc-timeout) through both
		// sidecars, and the call ended at the server too, rather than the
		// client giving up alone: the server computes its deadline from
		// grpc-timeout on arrival, so a little after the client's, and
		// its context ends either by that deadline or, when the client's
		// RST_STREAM at its own deadline comes through first, canceled.
		select {
		case s := <-probe.slow:
			if s.deadline.IsZero() || s.deadline.After(sent.Add(timeout+time.Second)) {
				t.Errorf("the server saw deadline %v, want one near %v", s.deadline, sent.Add(timeout))
			}
			if !errors.Is(s.err, context.DeadlineExceeded) && !errors.Is(s.err, context.Canceled) {
				t.Errorf("the server's context ended with %v, want its deadline or the client's cancel", s.err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("the server's Slow handler did not end within 5 s of the deadline")
		}
		// The connection serves on after the abandoned call.
		if err := check(); err != nil {
			t.Errorf("Health/Check after the deadline: %v", err)
		}
	})

	t.Run("error status", func(t *testing.T) {
		var trailer metadata.MD
		err := conn.Invoke(ctx, "/"+testService+"/Missing", wrapperspb.String("thing-7"), new(wrapperspb.StringValue), grpc.Trailer(&trailer))
		st, ok := status.FromError(err)
		if !ok || st.Code() != codes.NotFound || st.Message() != `no such thing: "thing-7"` {
			t.Errorf("Missing: %v, want NotFound with message %q", err, `no such thing: "thing-7"`)
		}
		if got := trailer.Get("x-probe-trailer"); len(got) != 1 || got[0] != "missing thing-7" {
			t.Errorf("Missing trailer x-probe-trailer = %q, want [\"missing thing-7\"]", got)
		}
		// A status of the health service itself: unknown service.
		_, err = healthClient.Check(ctx, &healthpb.HealthCheckRequest{Service: "nope"})
		if st := status.Convert(err); st.Code() != codes.NotFound || st.Message() != "unknown service" {
			t.Errorf("Health/Check of an unknown service: %v, want NotFound \"unknown service\"", err)
		}
	})
}

// h2cApp serves, over cleartext HTTP/2 only (prior knowledge; it resets
// HTTP/1.1 connections), the protocol its request arrived in, with a
// trailer. It flushes the body before the trailer, so the response has no
// length and goes chunked to an HTTP/1.1 client: HAProxy forwards trailers
// to one only in a chunked response.
func h2cApp(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	srv := &http.Server{Protocols: &p, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Probe-Trailer")
		fmt.Fprintf(w, "app got %s", r.Proto)
		w.(http.Flusher).Flush()
		w.Header().Set("X-Probe-Trailer", "kept")
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().(*net.TCPAddr).Port
}

// TestHTTP2: a service with protocol http2 (service-defaults) whose
// application speaks only cleartext HTTP/2 answers, through both sidecars,
// a client speaking prior-knowledge h2c to the upstream port and a client
// speaking HTTP/1.1 to the same port, trailer included for both.
func TestHTTP2(t *testing.T) {
	upstream := startProtocolMesh(t, "http2", h2cApp(t))
	url := fmt.Sprintf("http://127.0.0.1:%d/", upstream)
	client := func(set func(*http.Protocols)) *http.Client {
		var p http.Protocols
		set(&p)
		tr := &http.Transport{Protocols: &p}
		t.Cleanup(tr.CloseIdleConnections)
		return &http.Client{Timeout: 5 * time.Second, Transport: tr}
	}
	tests := []struct {
		name      string
		client    *http.Client
		wantProto string
	}{
		{"h2c prior knowledge", client(func(p *http.Protocols) { p.SetUnencryptedHTTP2(true) }), "HTTP/2.0"},
		{"HTTP/1.1", client(func(p *http.Protocols) { p.SetHTTP1(true) }), "HTTP/1.1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			call := func() error {
				resp, err := tt.client.Get(url)
				if err != nil {
					return err
				}
				defer resp.Body.Close()
				b, err := io.ReadAll(resp.Body)
				if err != nil {
					return err
				}
				if resp.StatusCode != 200 || resp.Proto != tt.wantProto || strings.TrimSpace(string(b)) != "app got HTTP/2.0" {
					return fmt.Errorf("%s %d %q, want %s 200 %q", resp.Proto, resp.StatusCode, b, tt.wantProto, "app got HTTP/2.0")
				}
				if got := resp.Trailer.Get("X-Probe-Trailer"); got != "kept" {
					return fmt.Errorf("trailer X-Probe-Trailer %q, want %q", got, "kept")
				}
				return nil
			}
			eventually(t, 10*time.Second, "the first call succeeds", call)
			for i := range 20 {
				if err := call(); err != nil {
					t.Fatalf("call %d: %v", i+2, err)
				}
			}
		})
	}
}

// TestGRPCBehindBuiltinProxy: the server's sidecar is Consul's built-in
// proxy, which negotiates no ALPN and hands the decrypted bytes to the
// application. A grpc upstream still reaches the grpc-go server: the
// client sidecar speaks HTTP/2 to it whatever ALPN said (HTTP/1.1 would
// reach a server that answers only HTTP/2). Calls, a trailer and a
// server stream pass.
func TestGRPCBehindBuiltinProxy(t *testing.T) {
	app, _ := grpcApp(t)
	upstream := startProtocolMeshWith(t, "grpc", app, func(consul *testenv.ConsulProc) { startBuiltinProxy(t, consul, "server") })
	conn := grpcConn(t, upstream)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	call := func() error {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		return echo(ctx, conn)
	}
	eventually(t, 10*time.Second, "the first Echo call succeeds", call)
	if failed, first := failures(20, call); failed > 0 {
		t.Errorf("%d of 20 Echo calls failed; first: %v", failed, first)
	}
	checkCount(ctx, t, conn, 5)
}

// grpcConn is a grpc-go client of 127.0.0.1:port without TLS, closed at
// the end of the test.
func grpcConn(t *testing.T, port int) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(fmt.Sprintf("127.0.0.1:%d", port), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// echo calls testService's Echo("hi") on conn: the answer and the
// trailer must come back.
func echo(ctx context.Context, conn *grpc.ClientConn) error {
	var trailer metadata.MD
	out := new(wrapperspb.StringValue)
	if err := conn.Invoke(ctx, "/"+testService+"/Echo", wrapperspb.String("hi"), out, grpc.Trailer(&trailer)); err != nil {
		return err
	}
	if out.Value != "hi" {
		return fmt.Errorf("Echo answered %q, want %q", out.Value, "hi")
	}
	if got := trailer.Get("x-probe-trailer"); len(got) != 1 || got[0] != "echo hi" {
		return fmt.Errorf("Echo trailer x-probe-trailer = %q, want [\"echo hi\"] (all trailers: %v)", got, trailer)
	}
	return nil
}

// failures calls f n times and counts the calls that failed.
func failures(n int, f func() error) (failed int, first error) {
	for range n {
		if err := f(); err != nil {
			failed++
			first = cmp.Or(first, err)
		}
	}
	return failed, first
}

// checkCount calls testService's Count(n) on conn: the stream must bring
// "1".."n", then the trailer.
func checkCount(ctx context.Context, t *testing.T, conn *grpc.ClientConn, n int) {
	t.Helper()
	stream, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/"+testService+"/Count")
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.SendMsg(wrapperspb.UInt32(uint32(n))); err != nil {
		t.Fatal(err)
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	var got []string
	for {
		m := new(wrapperspb.StringValue)
		err := stream.RecvMsg(m)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("after %d messages: %v", len(got), err)
		}
		got = append(got, m.Value)
	}
	if len(got) != n || got[0] != "1" || got[n-1] != fmt.Sprint(n) {
		t.Errorf("received %d messages %v, want \"1\"..\"%d\"", len(got), got, n)
	}
	if tr := stream.Trailer().Get("x-probe-trailer"); len(tr) != 1 || tr[0] != fmt.Sprintf("counted %d", n) {
		t.Errorf("stream trailer x-probe-trailer = %q, want [\"counted %d\"]", tr, n)
	}
}

// startBuiltinProxy runs "consul connect proxy -sidecar-for id" until the
// end of the test.
func startBuiltinProxy(t *testing.T, consul *testenv.ConsulProc, id string) {
	t.Helper()
	out := &syncBuf{}
	cmd := exec.Command(testenv.ConsulBin(t), "connect", "proxy", "-sidecar-for", id, "-http-addr", consul.Addr)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("built-in proxy %s output:\n%s", id, out.String())
		}
	})
}
