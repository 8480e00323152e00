package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// The data plane outlives its controller (RELIABILITY.md has a row per
// fault and names these tests).

// traffic is a new-connection client and a kept-alive client calling an
// upstream port until stopped; every failure is kept with its time.
type traffic struct {
	mu       sync.Mutex
	ok       int
	okBy     map[string]int // by kind
	failures []failure
	stop     chan struct{}
	wg       sync.WaitGroup
	// reused: the kept-alive client's last call went over a reused
	// connection.
	reused *atomic.Bool
}

type failure struct {
	at     time.Time
	kind   string
	reason string
}

func startTraffic(t *testing.T, port int) *traffic {
	t.Helper()
	tr := &traffic{stop: make(chan struct{}), okBy: map[string]int{}}
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	var kept func() (int, error)
	kept, tr.reused = keptAlive(t, &http.Transport{MaxIdleConnsPerHost: 1}, url)
	run := func(kind string, call func() (int, error)) {
		defer tr.wg.Done()
		for {
			select {
			case <-tr.stop:
				return
			default:
			}
			code, err := call()
			tr.mu.Lock()
			if err == nil && code == 200 {
				tr.ok++
				tr.okBy[kind]++
			} else {
				tr.failures = append(tr.failures, failure{time.Now(), kind, fmt.Sprintf("%d %v", code, err)})
			}
			tr.mu.Unlock()
		}
	}
	tr.wg.Add(3)
	go run("kept-alive", kept)
	for range 2 {
		go run("new connection", func() (int, error) { code, _, err := get(port); return code, err })
	}
	t.Cleanup(tr.halt)
	return tr
}

func (tr *traffic) halt() {
	select {
	case <-tr.stop:
	default:
		close(tr.stop)
	}
	tr.wg.Wait()
}

// served is the number of successful calls so far.
func (tr *traffic) served() int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.ok
}

// failedAfter returns the failures after at.
func (tr *traffic) failedAfter(at time.Time) []failure {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	var out []failure
	for _, f := range tr.failures {
		if f.at.After(at) {
			out = append(out, f)
		}
	}
	return out
}

// flowFor waits until d has passed and the traffic served at least n more
// calls: the window a fault must not disturb.
func (tr *traffic) flowFor(t *testing.T, d time.Duration, n int) {
	t.Helper()
	end, want := time.Now().Add(d), tr.served()+n
	eventually(t, d+30*time.Second, fmt.Sprintf("%s of traffic and %d more calls served", d, n), func() error {
		if time.Now().Before(end) || tr.served() < want {
			return errors.New("still observing")
		}
		return nil
	})
}

// moreEach waits until each kind of connection served n more calls.
func (tr *traffic) moreEach(t *testing.T, what string, n int) {
	t.Helper()
	count := func() (int, int) {
		tr.mu.Lock()
		defer tr.mu.Unlock()
		return tr.okBy["new connection"], tr.okBy["kept-alive"]
	}
	n0, k0 := count()
	eventually(t, 20*time.Second, what, func() error {
		if nn, k := count(); nn-n0 < n || k-k0 < n {
			return fmt.Errorf("%d more on new connections, %d kept alive", nn-n0, k-k0)
		}
		return nil
	})
}

func (tr *traffic) requireNoFailures(t *testing.T, since time.Time, what string) {
	t.Helper()
	if fs := tr.failedAfter(since); len(fs) > 0 {
		t.Fatalf("%s: %d failed calls (of %d served); first: %s at %s: %s", what, len(fs), tr.served(), fs[0].kind,
			fs[0].at.Format("15:04:05.000"), fs[0].reason)
	}
}

// TestControllerCrashAndAdoption: kill -9 of the client's haproxy-connect
// under load loses no request; a new haproxy-connect on the same state
// directory adopts the same master with no reload, and applies an endpoint
// registered afterwards; a second one on that directory exits non-zero
// and disturbs nothing.
func TestControllerCrashAndAdoption(t *testing.T) {
	m := startMesh(t, testenv.ConsulOptions{}, "http")
	up := m.ports[3]
	eventually(t, 10*time.Second, "the mesh serves", serves(up, "hello from server"))
	master, reloads := m.client.masterPID(), m.client.reloads(t)
	begin := time.Now()
	tr := startTraffic(t, up)
	tr.flowFor(t, time.Second, 20)

	if err := m.client.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-m.client.done
	killed := time.Now()
	tr.flowFor(t, 5*time.Second, 100)
	tr.requireNoFailures(t, begin, "while the controller is dead")
	if !runtime.ProcessAlive(master) {
		t.Fatalf("haproxy master %d died with its controller", master)
	}
	// status needs only the master socket: it works with no controller.
	st := m.client.runStatus(t)
	if up := st.upstream("up_server"); st.Master.PID != master || up == nil || st.slotOfAddr("up_server", m.ports[0]) == nil {
		t.Errorf("status with the controller dead: master %d (want %d), upstreams %+v", st.Master.PID, master, st.Upstreams)
	}

	launched := time.Now()
	next := launchSidecar(t, m.consul, "client", m.client.stateDir)
	next.waitReady(t)
	t.Logf("the new controller was ready (adopted) %s after it was launched", time.Since(launched).Round(time.Millisecond))
	eventually(t, 10*time.Second, "the new controller logs the adoption", func() error {
		if !strings.Contains(next.out.String(), "haproxy adopted") {
			return errors.New("no adoption logged")
		}
		return nil
	})
	if got := next.masterPID(); got != master {
		t.Errorf("master PID %d after the restart, want the adopted %d", got, master)
	}
	if got := next.reloads(t); got != reloads {
		t.Errorf("master reloads %d after adoption, want %d (none)", got, reloads)
	}
	if v, err := next.metric("haproxy_connect_haproxy_adoptions_total"); err != nil || v != 1 {
		t.Errorf("adoptions metric: %v %v, want 1", v, err)
	}

	second := launchSidecar(t, m.consul, "client", m.client.stateDir)
	select {
	case <-second.done:
	case <-time.After(20 * time.Second):
		t.Fatal("a second haproxy-connect on the same state directory did not exit")
	}
	if second.cmd.ProcessState.Success() {
		t.Errorf("the second haproxy-connect exited 0")
	}
	if out := second.out.String(); !strings.Contains(out, "is in use by another haproxy-connect") {
		t.Errorf("the second haproxy-connect said:\n%s", out)
	}

	extra := addServerEndpoint(t, m.c, "server-sidecar-2", m.ports[0])
	eventually(t, 10*time.Second, "an endpoint registered after the adoption is in service", next.inBackend("up_server", extra))
	tr.flowFor(t, 2*time.Second, 50)
	tr.halt()
	tr.requireNoFailures(t, begin, "through the crash, the adoption and the churn")
	if got := next.masterPID(); got != master {
		t.Errorf("master PID %d at the end, want %d", got, master)
	}
	t.Logf("%d calls served, none failed, from 1 s before the kill to %s after it", tr.served(), time.Since(killed).Round(time.Millisecond))
}

// TestHAProxyCrashRecovery: a killed worker (which makes the 2.6 master
// exit) or a killed master is noticed, HAProxy starts again with the
// applied state, and churn still reaches it.
func TestHAProxyCrashRecovery(t *testing.T) {
	for _, victim := range []string{"worker", "master"} {
		t.Run(victim, func(t *testing.T) {
			m := startMesh(t, testenv.ConsulOptions{}, "http")
			up := m.ports[3]
			eventually(t, 10*time.Second, "the mesh serves", serves(up, "hello from server"))
			pl, err := m.client.rt.Procs(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			pid := pl.Master.PID
			if victim == "worker" {
				cur, ok := pl.Current()
				if !ok {
					t.Fatalf("no current worker: %+v", pl)
				}
				pid = cur.PID
			}
			tr := startTraffic(t, up)
			tr.flowFor(t, 500*time.Millisecond, 10)
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			killed := time.Now()
			// Back means served by a new master: after a killed master,
			// its worker may still answer for a moment before it sees
			// the master gone and exits.
			took := eventually(t, 10*time.Second, "served again by a new master", func() error {
				now, err := m.client.rt.Procs(context.Background())
				if err != nil {
					return err
				}
				if now.Master.PID == pl.Master.PID || now.Master.PID != m.client.masterPID() {
					return fmt.Errorf("master %d, pid file %d, before %d", now.Master.PID, m.client.masterPID(), pl.Master.PID)
				}
				return serves(up, "hello from server")()
			})
			back := time.Now()
			t.Logf("killed the %s (pid %d): served again by a new master %s after the kill", victim, pid, took.Round(time.Millisecond))
			eventually(t, 5*time.Second, "the restart is counted", func() error {
				v, err := m.client.metric("haproxy_connect_haproxy_restarts_total")
				if err == nil && v != 1 {
					err = fmt.Errorf("restarts %v, want 1", v)
				}
				return err
			})
			extra := addServerEndpoint(t, m.c, "server-sidecar-2", m.ports[0])
			eventually(t, 10*time.Second, "churn after the restart is applied", m.client.inBackend("up_server", extra))
			tr.flowFor(t, 2*time.Second, 50)
			tr.halt()
			tr.requireNoFailures(t, back, "after service came back")
			t.Logf("%d calls failed between the kill and the first served one", len(tr.failedAfter(killed)))
		})
	}
}

// TestGracefulStop: SIGTERM lets an in-flight request finish, then
// haproxy-connect and its HAProxy are all gone.
func TestGracefulStop(t *testing.T) {
	release := make(chan struct{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan struct{}, 1)
	app := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			started <- struct{}{}
			<-release
		}
		fmt.Fprintln(w, "hello from server")
	})}
	go app.Serve(ln)
	t.Cleanup(func() { app.Close() })
	m := startMeshWith(t, testenv.ConsulOptions{}, "http", ln.Addr().(*net.TCPAddr).Port)
	up := m.ports[3]
	eventually(t, 10*time.Second, "the mesh serves", serves(up, "hello from server"))
	pl, err := m.server.rt.Procs(context.Background())
	if err != nil {
		t.Fatal(err)
	}

	slow := make(chan error, 1)
	go func() {
		resp, err := (&http.Client{Timeout: 20 * time.Second}).Get(fmt.Sprintf("http://127.0.0.1:%d/slow", up))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode != 200 {
				err = fmt.Errorf("status %d", resp.StatusCode)
			}
		}
		slow <- err
	}()
	<-started
	if err := m.server.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// The listener closes at once: a new connection is refused while the
	// in-flight request still runs.
	eventually(t, 5*time.Second, "the server's public listener is closed", func() error {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", m.ports[0]), time.Second)
		if err == nil {
			c.Close()
			return errors.New("still accepting")
		}
		return nil
	})
	close(release)
	if err := <-slow; err != nil {
		t.Errorf("the request in flight at SIGTERM: %v", err)
	}
	select {
	case <-m.server.done:
	case <-time.After(20 * time.Second):
		t.Fatal("haproxy-connect did not exit after SIGTERM")
	}
	if !m.server.cmd.ProcessState.Success() {
		t.Errorf("haproxy-connect exited with %v after SIGTERM", m.server.cmd.ProcessState)
	}
	for _, p := range append(pl.Workers, pl.Master) {
		if runtime.ProcessAlive(p.PID) {
			t.Errorf("haproxy %s %d still runs after haproxy-connect stopped", p.Type, p.PID)
		}
	}
}

// TestInboundWhileControllerAway: the SPOE agent lives in the controller,
// so with the controller dead the sidecar fails closed for new inbound
// connections with a certificate it never allowed, while connections
// already authorized keep being served, and so do new connections with a
// certificate HAProxy remembers allowing; once a new controller adopts
// HAProxy, new certificates are authorized again.
func TestInboundWhileControllerAway(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{DefaultDeny: true})
	c := consul.Client
	port := testenv.FreePort(t)
	register(t, c, "server", httpApp(t, "server"), port, map[string]any{"protocol": "http"})
	server := startSidecar(t, consul, "server")
	_, _, err := c.ConfigEntries().Set(&api.ServiceIntentionsConfigEntry{
		Kind: api.ServiceIntentions, Name: "server",
		Sources: []*api.SourceIntention{{Name: "other", Action: api.IntentionActionAllow}, {Name: "unseen", Action: api.IntentionActionAllow}},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	entry, _, err := c.ConfigEntries().Get(api.ServiceIntentions, "server", nil)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the server sidecar sees the intentions", server.sawIntentions(entry.GetModifyIndex()))

	tlsCfg := &tls.Config{Certificates: []tls.Certificate{meshCert(t, c, "other")}, InsecureSkipVerify: true}
	url := fmt.Sprintf("https://127.0.0.1:%d/", port)
	kept, reused := keptAlive(t, &http.Transport{MaxIdleConnsPerHost: 1, TLSClientConfig: tlsCfg}, url)
	fresh := freshCaller(tlsCfg, url)
	// A source allowed too, whose certificate HAProxy has never seen.
	unseen := freshCaller(&tls.Config{Certificates: []tls.Certificate{meshCert(t, c, "unseen")}, InsecureSkipVerify: true}, url)
	for name, call := range map[string]func() (int, error){"kept-alive": kept, "new connection": fresh} {
		if code, err := call(); err != nil || code != 200 {
			t.Fatalf("%s before the kill: %d %v", name, code, err)
		}
	}

	if err := server.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-server.done
	for i := range 20 {
		if code, err := kept(); err != nil || code != 200 || !reused.Load() {
			t.Fatalf("kept-alive request %d with the controller dead: %d %v (reused %v), want 200 on the same connection", i, code, err, reused.Load())
		}
	}
	for i := range 20 {
		if code, err := fresh(); err != nil || code != 200 {
			t.Fatalf("new connection %d with a remembered allow and the controller dead: %d %v, want 200", i, code, err)
		}
	}
	if code, err := unseen(); err == nil && code == 200 {
		t.Fatalf("a new connection with a certificate never allowed was served with no agent to authorize it")
	} else {
		t.Logf("new connection with an unseen certificate and the controller dead: %d %v", code, err)
	}

	next := launchSidecar(t, consul, "server", server.stateDir)
	next.waitReady(t)
	eventually(t, 10*time.Second, "new certificates are authorized again", func() error {
		code, err := unseen()
		if err == nil && code != 200 {
			err = fmt.Errorf("status %d", code)
		}
		return err
	})
	if code, err := fresh(); err != nil || code != 200 {
		t.Errorf("new connection after the adoption: %d %v", code, err)
	}
	if code, err := kept(); err != nil || code != 200 {
		t.Errorf("kept-alive request after the adoption: %d %v", code, err)
	}
}

// TestAdoptionAfterUpstreamsChanged: an upstream added while no controller
// ran is the one case where adoption reloads: exactly once, with that
// reason, and the upstreams HAProxy already served lose no request.
func TestAdoptionAfterUpstreamsChanged(t *testing.T) {
	m := startMesh(t, testenv.ConsulOptions{}, "http")
	up := m.ports[3]
	eventually(t, 10*time.Second, "the mesh serves", serves(up, "hello from server"))
	master, reloads := m.client.masterPID(), m.client.reloads(t)
	begin := time.Now()
	tr := startTraffic(t, up)
	tr.flowFor(t, 500*time.Millisecond, 10)
	if err := m.client.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-m.client.done

	ports := testenv.FreePorts(t, 2)
	register(t, m.c, "two", httpApp(t, "two"), ports[0], map[string]any{"protocol": "http"})
	startSidecar(t, m.consul, "two")
	second := ports[1]
	register(t, m.c, "client", m.ports[1], m.ports[2], nil, m.upstream,
		api.Upstream{DestinationName: "two", LocalBindPort: second, Config: map[string]any{"protocol": "http"}})
	next := launchSidecar(t, m.consul, "client", m.client.stateDir)
	next.waitReady(t)
	eventually(t, 10*time.Second, "the added upstream serves", serves(second, "hello from two"))
	tr.flowFor(t, 2*time.Second, 50)
	tr.halt()
	tr.requireNoFailures(t, begin, "through the crash and the adoption's reload")
	if got := next.masterPID(); got != master {
		t.Errorf("master PID %d, want the adopted %d", got, master)
	}
	if got := next.reloads(t) - reloads; got != 1 {
		t.Errorf("%d reloads after the adoption, want exactly 1", got)
	}
	if out := next.out.String(); !strings.Contains(out, "adopted haproxy runs another configuration") {
		t.Errorf("the reload's reason is not logged")
	}
}
