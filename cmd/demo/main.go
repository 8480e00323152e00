// Command demo runs a two-service Consul Connect mesh on this machine with
// haproxy-connect as the data plane: a Consul dev agent (deny-by-default
// intentions), the "web" and "client" demo apps, and a sidecar for each.
// It prints what to try, and stops everything on Ctrl-C. With -scripted it
// walks the deny -> allow -> deny path itself and exits (used by its test).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"
)

// Ports is where everything listens (all on 127.0.0.1).
type Ports struct {
	Consul, ConsulServer, ConsulSerf                                        int
	Web, WebSidecar, Client, ClientSidecar, Upstream, WebStats, ClientStats int
}

var defaultPorts = Ports{Consul: 8500, ConsulServer: 8300, ConsulSerf: 8301, Web: 9090, WebSidecar: 21000, Client: 9091, ClientSidecar: 21001, Upstream: 9191, WebStats: 19000, ClientStats: 19001}

func main() {
	consulBin := flag.String("consul-bin", "bin/consul", "consul binary")
	sidecarBin := flag.String("sidecar-bin", "bin/haproxy-connect", "haproxy-connect binary")
	haproxyBin := flag.String("haproxy-bin", "haproxy", "haproxy binary")
	dir := flag.String("dir", "", "working directory (default: a new temp dir)")
	scripted := flag.Bool("scripted", false, "run the deny/allow/deny path, print the result and exit")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	d := &Demo{ConsulBin: *consulBin, SidecarBin: *sidecarBin, HAProxyBin: *haproxyBin, Dir: *dir, Ports: defaultPorts, Out: os.Stdout}
	if err := d.Run(ctx, *scripted); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

// Demo is one run of the mesh.
type Demo struct {
	ConsulBin, SidecarBin, HAProxyBin, Dir string
	Ports                                  Ports
	Out                                    io.Writer
	procs                                  []*proc
}

type proc struct {
	name, log string
	cmd       *exec.Cmd
	done      chan struct{}
}

// alive fails once any started process has exited, naming its log.
func (d *Demo) alive() error {
	for _, p := range d.procs {
		select {
		case <-p.done:
			return fmt.Errorf("%s exited: %v (see %s)", p.name, p.cmd.ProcessState, p.log)
		default:
		}
	}
	return nil
}

// Run starts the mesh; it returns when ctx ends (or, scripted, when the
// path has been walked), after stopping everything it started.
func (d *Demo) Run(ctx context.Context, scripted bool) error {
	for _, b := range []*string{&d.ConsulBin, &d.SidecarBin, &d.HAProxyBin} {
		p, err := exec.LookPath(*b)
		if err != nil {
			return fmt.Errorf("%s not found (run make demo, which builds it)", *b)
		}
		*b, _ = filepath.Abs(p)
	}
	if d.Dir == "" {
		dir, err := os.MkdirTemp("", "hc-demo-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		d.Dir = dir
	}
	if err := d.checkPortsFree(); err != nil {
		return err
	}
	defer d.stopAll()

	p := d.Ports
	consulAddr := fmt.Sprintf("127.0.0.1:%d", p.Consul)
	hcl := fmt.Sprintf(`default_intention_policy = "deny"
ports { http = %d, server = %d, serf_lan = %d, serf_wan = -1, dns = -1, grpc = -1, grpc_tls = -1 }
`, p.Consul, p.ConsulServer, p.ConsulSerf)
	if err := os.WriteFile(filepath.Join(d.Dir, "consul.hcl"), []byte(hcl), 0o600); err != nil {
		return err
	}
	if err := d.start("consul", d.ConsulBin, "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
		"-config-file", filepath.Join(d.Dir, "consul.hcl")); err != nil {
		return err
	}
	cfg := api.DefaultConfig()
	cfg.Address = consulAddr
	client, err := api.NewClient(cfg)
	if err != nil {
		return err
	}
	if err := d.waitFor(ctx, 30*time.Second, "consul leader and CA", func() error {
		leader, err := client.Status().Leader()
		if err != nil || leader == "" {
			return fmt.Errorf("no leader yet: %v", err)
		}
		roots, _, err := client.Agent().ConnectCARoots(nil)
		if err != nil || len(roots.Roots) == 0 {
			return fmt.Errorf("no CA root yet: %v", err)
		}
		return nil
	}); err != nil {
		return err
	}

	// The apps: web answers; client calls web through its upstream port.
	stopApps := serveApps(p)
	defer stopApps()

	reg := func(name string, port, sidecarPort int, ups ...api.Upstream) error {
		return client.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: name, Name: name, Port: port, Address: "127.0.0.1",
			Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
				Port: sidecarPort, Address: "127.0.0.1",
				Proxy: &api.AgentServiceConnectProxyConfig{Config: map[string]any{"protocol": "http"}, Upstreams: ups},
			}},
		})
	}
	if err := reg("web", p.Web, p.WebSidecar); err != nil {
		return fmt.Errorf("register web: %w", err)
	}
	if err := reg("client", p.Client, p.ClientSidecar, api.Upstream{DestinationName: "web", LocalBindPort: p.Upstream, Config: map[string]any{"protocol": "http"}}); err != nil {
		return fmt.Errorf("register client: %w", err)
	}
	for _, s := range []struct {
		name  string
		stats int
	}{{"web", p.WebStats}, {"client", p.ClientStats}} {
		state := filepath.Join(d.Dir, s.name)
		if err := d.start(s.name+"-sidecar", d.SidecarBin, "-sidecar-for", s.name, "-http-addr", consulAddr,
			"-haproxy-bin", d.HAProxyBin, "-state-dir", state, "-stats-addr", fmt.Sprintf("127.0.0.1:%d", s.stats)); err != nil {
			return err
		}
	}
	for _, stats := range []int{p.WebStats, p.ClientStats} {
		if err := d.waitFor(ctx, 30*time.Second, "sidecar ready", func() error { return httpOK(fmt.Sprintf("http://127.0.0.1:%d/readyz", stats)) }); err != nil {
			return err
		}
	}
	// Consul marks a new sidecar passing after its first TCP check.
	if err := d.waitFor(ctx, 30*time.Second, "web's sidecar passing in Consul", func() error {
		entries, _, err := client.Health().Connect("web", "", true, nil)
		if err != nil || len(entries) == 0 {
			return fmt.Errorf("not passing yet: %v", err)
		}
		return nil
	}); err != nil {
		return err
	}
	if scripted {
		return d.script(ctx, client)
	}
	d.instructions()
	<-ctx.Done()
	fmt.Fprintln(d.Out, "\nstopping...")
	return nil
}

func (d *Demo) instructions() {
	p := d.Ports
	sock := func(s string) string { return filepath.Join(d.Dir, s, "master.sock") }
	fmt.Fprintf(d.Out, `
The mesh is up: client -> client's sidecar (HAProxy) -> mTLS -> web's sidecar (HAProxy) -> web.
Intentions deny by default.

  curl http://127.0.0.1:%[1]d/            # client's upstream port for web: 403/reset until allowed
  curl http://127.0.0.1:%[2]d/            # the client app, which calls web through that port

Allow, then deny again (takes effect for new connections within milliseconds):
  CONSUL_HTTP_ADDR=127.0.0.1:%[3]d %[4]s intention create -allow client web
  CONSUL_HTTP_ADDR=127.0.0.1:%[3]d %[4]s intention create -deny -replace client web

Consul UI:  http://127.0.0.1:%[3]d/ui
Metrics:    curl http://127.0.0.1:%[5]d/metrics

Watch the slots of client's upstream, and the HAProxy processes (no reloads for endpoint churn):
  echo '@1 show servers state up_web' | socat stdio unix-connect:%[6]s
  echo 'show proc' | socat stdio unix-connect:%[6]s
  watch -n1 "echo '@1 show servers state up_web' | socat stdio unix-connect:%[6]s"
Web's own sidecar: unix-connect:%[7]s

What the client's HAProxy serves (slots and their Consul instances, leaf, workers, last reload):
  %[8]s status -state-dir %[9]s

Ctrl-C stops everything this demo started.
`, p.Upstream, p.Client, p.Consul, d.ConsulBin, p.ClientStats, sock("client"), sock("web"), d.SidecarBin, filepath.Join(d.Dir, "client"))
}

// script walks deny -> allow -> deny through the client's upstream.
func (d *Demo) script(ctx context.Context, client *api.Client) error {
	url := fmt.Sprintf("http://127.0.0.1:%d/", d.Ports.Upstream)
	set := func(action api.IntentionAction) error {
		_, _, err := client.ConfigEntries().Set(&api.ServiceIntentionsConfigEntry{
			Kind: api.ServiceIntentions, Name: "web", Sources: []*api.SourceIntention{{Name: "client", Action: action}},
		}, nil)
		return err
	}
	if err := httpOK(url); err == nil {
		return errors.New("request allowed before any intention")
	}
	fmt.Fprintln(d.Out, "denied by default: ok")
	if err := set(api.IntentionActionAllow); err != nil {
		return err
	}
	if err := waitFor(ctx, 5*time.Second, "allowed", func() error { return httpOK(url) }); err != nil {
		return err
	}
	fmt.Fprintln(d.Out, "allowed after the allow intention: ok")
	if err := httpOK(fmt.Sprintf("http://127.0.0.1:%d/", d.Ports.Client)); err != nil {
		return fmt.Errorf("client app calling web: %w", err)
	}
	fmt.Fprintln(d.Out, "client app calls web through the mesh: ok")
	if err := set(api.IntentionActionDeny); err != nil {
		return err
	}
	if err := waitFor(ctx, time.Second, "denied", func() error {
		if httpOK(url) == nil {
			return errors.New("still allowed")
		}
		return nil
	}); err != nil {
		return err
	}
	fmt.Fprintln(d.Out, "denied again after the deny intention: ok")
	return nil
}

var noKeepAlive = &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

func httpOK(url string) error {
	resp, err := noKeepAlive.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("%s: status %d", url, resp.StatusCode)
	}
	return nil
}

func serveApps(p Ports) func() {
	web := &http.Server{Addr: fmt.Sprintf("127.0.0.1:%d", p.Web), ReadHeaderTimeout: 5 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			// The connection comes from web's sidecar, which has
			// authenticated and authorized the caller.
			fmt.Fprintf(w, "hello from web (%s %s, through its sidecar from %s)\n", r.Proto, r.Method, r.RemoteAddr)
		})}
	app := &http.Server{Addr: fmt.Sprintf("127.0.0.1:%d", p.Client), ReadHeaderTimeout: 5 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			resp, err := noKeepAlive.Get(fmt.Sprintf("http://127.0.0.1:%d/", p.Upstream))
			if err != nil {
				http.Error(w, "client: calling web: "+err.Error(), http.StatusBadGateway)
				return
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			w.WriteHeader(resp.StatusCode)
			fmt.Fprintf(w, "client got %d from web: %s", resp.StatusCode, b)
		})}
	go web.ListenAndServe()
	go app.ListenAndServe()
	return func() { web.Close(); app.Close() }
}

func (d *Demo) checkPortsFree() error {
	p := d.Ports
	for _, port := range []int{p.Consul, p.ConsulServer, p.ConsulSerf, p.Web, p.WebSidecar, p.Client, p.ClientSidecar, p.Upstream, p.WebStats, p.ClientStats} {
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			return fmt.Errorf("port %d is busy (is another demo or consul running?)", port)
		}
		ln.Close()
	}
	return nil
}

// start runs a process with its output in <dir>/<name>.log.
func (d *Demo) start(name, bin string, args ...string) error {
	logf, err := os.Create(filepath.Join(d.Dir, name+".log"))
	if err != nil {
		return err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	fmt.Fprintf(d.Out, "started %-15s pid %-7d log %s\n", name, cmd.Process.Pid, logf.Name())
	p := &proc{name: name, log: logf.Name(), cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); logf.Close(); close(p.done) }()
	d.procs = append(d.procs, p)
	return nil
}

// stopAll stops the processes in reverse order: sidecars, then consul.
func (d *Demo) stopAll() {
	for i := len(d.procs) - 1; i >= 0; i-- {
		p := d.procs[i]
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
	}
}

// waitFor polls f until it succeeds, d passes, or a process dies.
func (d *Demo) waitFor(ctx context.Context, limit time.Duration, what string, f func() error) error {
	return waitFor(ctx, limit, what, func() error {
		if err := d.alive(); err != nil {
			return backoffStop{err}
		}
		return f()
	})
}

// backoffStop ends waitFor at once.
type backoffStop struct{ error }

func waitFor(ctx context.Context, d time.Duration, what string, f func() error) error {
	deadline := time.Now().Add(d)
	var err error
	for time.Now().Before(deadline) {
		if err = f(); err == nil {
			return nil
		}
		var stop backoffStop
		if errors.As(err, &stop) {
			return fmt.Errorf("%s: %w", what, stop.error)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("%s: not within %s: %v", what, d, err)
}
