// Package deploy holds the files users deploy haproxy-connect with: a
// systemd template unit and a Nomad job. It has no Go code; its tests check
// those files: the unit with systemd-analyze verify and for the stop and
// crash settings the README promises, the job by parsing it and by
// registering what its registration task renders with a real Consul agent,
// and both by running the command line they run (the built binary, real
// HAProxy, Consul with ACLs and default deny, the token as they pass it)
// until ready, then stopping it with the signal they stop it with.
package deploy

import (
	"bufio"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclsyntax"
	"github.com/zclconf/go-cty/cty"

	"github.com/haproxy-connect/haproxy-connect/controller"
	"github.com/haproxy-connect/haproxy-connect/runtime"
	"github.com/haproxy-connect/haproxy-connect/testenv"
)

const (
	unitFile = "haproxy-connect@.service"
	jobFile  = "nomad/haproxy-connect.nomad.hcl"
	// unitBin is the unit's ExecStart binary.
	unitBin = "/usr/local/bin/haproxy-connect"
	// stopTimeout is haproxy-connect's default -stop-timeout (keep it in
	// step with cmd/haproxy-connect): systemd and Nomad must give it longer
	// before they SIGKILL it.
	stopTimeout = 15 * time.Second
)

// TestUnitVerifies runs systemd-analyze verify on an instance of the unit.
// verify fails when ExecStart's binary does not exist, so the test runs it
// on a copy whose ExecStart points at an executable it creates; that path
// is the only change. verify exits 0 on an unknown key or a bad value and
// only prints a warning, so any output at all fails the test.
func TestUnitVerifies(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed (Debian: apt-get install systemd): the unit is not verified")
	}
	unit, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "haproxy-connect")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(unit), unitBin); n != 1 {
		t.Fatalf("%s names %s %d times, want once (in ExecStart)", unitFile, unitBin, n)
	}
	copied := strings.Replace(string(unit), unitBin, bin, 1)
	if err := os.WriteFile(filepath.Join(dir, unitFile), []byte(copied), 0o644); err != nil {
		t.Fatal(err)
	}
	// A template is verified through an instance; verify loads the
	// template from the instance's directory.
	out, err := exec.Command(sa, "verify", filepath.Join(dir, "haproxy-connect@web.service")).CombinedOutput()
	if err != nil || len(out) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}

	// The test can fail: a unit whose binary is missing does not verify.
	broken := strings.Replace(string(unit), unitBin, filepath.Join(dir, "missing"), 1)
	if err := os.WriteFile(filepath.Join(dir, unitFile), []byte(broken), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(sa, "verify", filepath.Join(dir, "haproxy-connect@web.service")).CombinedOutput(); err == nil && len(out) == 0 {
		t.Error("systemd-analyze verify accepted a unit whose ExecStart binary is missing")
	}
}

// TestUnitStopAndCrash checks the unit's settings that make a stop and a
// crash different: systemd signals only haproxy-connect (which stops
// HAProxy itself on SIGTERM), a dead haproxy-connect is restarted within a
// second and HAProxy is left running for it to adopt, systemd waits longer
// than haproxy-connect's own stop bound, and the state dir persists.
func TestUnitStopAndCrash(t *testing.T) {
	keys := unitKeys(t, unitFile)
	want := map[string]string{
		"KillMode":                "process",
		"KillSignal":              "SIGTERM",
		"Restart":                 "always",
		"RestartSec":              "1",
		"StateDirectory":          "haproxy-connect/%i",
		"StateDirectoryMode":      "0700",
		"StartLimitIntervalSec":   "0",
		"Environment":             "CONSUL_HTTP_TOKEN_FILE=%d/consul-token",
		"LoadCredential":          "consul-token:/etc/haproxy-connect/%i.token",
		"RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
	}
	for k, v := range want {
		if got := keys[k]; got != v {
			t.Errorf("%s=%q, want %q", k, got, v)
		}
	}
	stop, err := time.ParseDuration(keys["TimeoutStopSec"])
	if err != nil || stop <= stopTimeout {
		t.Errorf("TimeoutStopSec=%q (%v): want a duration above haproxy-connect's -stop-timeout (%s)", keys["TimeoutStopSec"], err, stopTimeout)
	}
	execStart := keys["ExecStart"]
	for _, arg := range []string{"-sidecar-for %i", "-state-dir /var/lib/haproxy-connect/%i"} {
		if !strings.Contains(execStart, arg) {
			t.Errorf("ExecStart %q lacks %q", execStart, arg)
		}
	}
	// PCRE2's JIT, which Debian's HAProxy uses, needs memory that is
	// writable and executable.
	if _, ok := keys["MemoryDenyWriteExecute"]; ok {
		t.Error("MemoryDenyWriteExecute breaks HAProxy's regex JIT")
	}
}

// unitKeys reads a unit file's Key=Value lines (continuations joined,
// comments skipped); a key set twice keeps its last value.
func unitKeys(t *testing.T, path string) map[string]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	keys := map[string]string{}
	var line string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if line == "" && (l == "" || l[0] == '#' || l[0] == ';' || l[0] == '[') {
			continue
		}
		if cont, ok := strings.CutSuffix(l, "\\"); ok {
			line += cont + " "
			continue
		}
		line += l
		if k, v, ok := strings.Cut(line, "="); ok {
			keys[strings.TrimSpace(k)] = strings.Join(strings.Fields(v), " ")
		}
		line = ""
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return keys
}

// TestNomadJob parses the Nomad job as HCL (HCL2's native syntax, which
// Nomad 1.0 and later read; Nomad's own schema is not checked: its
// jobspec package is not a dependency here) and checks the sidecar task:
// a raw_exec task beside the service in the same group, started after it
// as a sidecar, stopped with SIGTERM, with a kill_timeout above
// haproxy-connect's stop bound and within Nomad's default
// max_kill_timeout (30 s), and a state dir in the task's own directory.
func TestNomadJob(t *testing.T) {
	body := parseJob(t)
	group := onlyBlock(t, onlyBlock(t, body, "job").Body, "group").Body
	tasks := map[string]*hclsyntax.Body{}
	for _, b := range group.Blocks {
		if b.Type == "task" {
			tasks[b.Labels[0]] = b.Body
		}
	}
	for _, name := range []string{"register", "web", "haproxy-connect", "deregister"} {
		if tasks[name] == nil {
			t.Fatalf("group has no task %q (tasks: %v)", name, mapKeys(tasks))
		}
	}
	sidecar := tasks["haproxy-connect"]
	if got := stringAttr(t, sidecar, "driver"); got != "raw_exec" {
		t.Errorf("sidecar driver %q, want raw_exec (the only driver whose task restart leaves HAProxy running)", got)
	}
	lc := onlyBlock(t, sidecar, "lifecycle").Body
	if got := stringAttr(t, lc, "hook"); got != "poststart" {
		t.Errorf("sidecar lifecycle hook %q, want poststart", got)
	}
	if v := attrValue(t, lc, "sidecar"); !v.True() {
		t.Error("sidecar lifecycle: sidecar is not true")
	}
	if got := stringAttr(t, sidecar, "kill_signal"); got != "SIGTERM" {
		t.Errorf("kill_signal %q, want SIGTERM", got)
	}
	kt, err := time.ParseDuration(stringAttr(t, sidecar, "kill_timeout"))
	if err != nil || kt <= stopTimeout || kt > 30*time.Second {
		t.Errorf("kill_timeout %v (%v): want above %s and at most 30s", kt, err, stopTimeout)
	}
	args := strings.Join(stringList(t, onlyBlock(t, sidecar, "config").Body, "args"), " ")
	for _, arg := range []string{"-sidecar-for web-${NOMAD_ALLOC_ID}", "-state-dir ${NOMAD_TASK_DIR}/state"} {
		if !strings.Contains(args, arg) {
			t.Errorf("sidecar args %q lack %q", args, arg)
		}
	}
	if onlyBlock(t, group, "restart") == nil {
		t.Error("group has no restart block")
	}
}

// TestNomadRegistration registers what the job's registration task
// renders (its template, with Nomad's env values filled in) with a real
// Consul agent, using the consul CLI as the task does, and finds the
// sidecar registration the way haproxy-connect -sidecar-for does.
func TestNomadRegistration(t *testing.T) {
	var register *hclsyntax.Body
	for _, b := range onlyBlock(t, onlyBlock(t, parseJob(t), "job").Body, "group").Body.Blocks {
		if b.Type == "task" && b.Labels[0] == "register" {
			register = b.Body
		}
	}
	if register == nil {
		t.Fatal("the job has no register task")
	}
	consul := testenv.Consul(t, testenv.ConsulOptions{})
	alloc := "5d6f8a1e-0c1b-4c3e-9a55-1d2f3e4a5b6c"
	env := map[string]string{
		"NOMAD_ALLOC_ID":    alloc,
		"NOMAD_IP_app":      "127.0.0.1",
		"NOMAD_PORT_app":    "23001",
		"NOMAD_ADDR_app":    "127.0.0.1:23001",
		"NOMAD_IP_public":   "127.0.0.1",
		"NOMAD_PORT_public": "23002",
		"NOMAD_ADDR_public": "127.0.0.1:23002",
	}
	rendered := renderServices(t, register, env)
	file := filepath.Join(t.TempDir(), "services.hcl")
	if err := os.WriteFile(file, []byte(rendered), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(testenv.ConsulBin(t), "services", "register", "-http-addr="+consul.Addr, file).CombinedOutput()
	if err != nil {
		t.Fatalf("consul services register: %v\n%s\n%s", err, out, rendered)
	}
	services, err := consul.Client.Agent().Services()
	if err != nil {
		t.Fatal(err)
	}
	id, err := controller.FindSidecar(services, "web-"+alloc)
	if err != nil {
		t.Fatalf("-sidecar-for web-%s: %v", alloc, err)
	}
	proxy := services[id]
	if proxy.Proxy.DestinationServiceName != "web" || proxy.Port != 23002 || proxy.Proxy.LocalServicePort != 23001 ||
		len(proxy.Proxy.Upstreams) != 1 || proxy.Proxy.Upstreams[0].DestinationName != "api" {
		t.Errorf("sidecar registration %s: %+v %+v", id, proxy, proxy.Proxy)
	}
}

// envCall is consul-template's {{ env "NAME" }}.
var envCall = regexp.MustCompile(`\{\{\s*env\s+"([A-Za-z0-9_]+)"\s*\}\}`)

func parseJob(t *testing.T) *hclsyntax.Body {
	t.Helper()
	src, err := os.ReadFile(jobFile)
	if err != nil {
		t.Fatal(err)
	}
	f, diags := hclsyntax.ParseConfig(src, jobFile, hcl.InitialPos)
	if diags.HasErrors() {
		t.Fatalf("parse %s: %s", jobFile, diags.Error())
	}
	return f.Body.(*hclsyntax.Body)
}

func onlyBlock(t *testing.T, body *hclsyntax.Body, typ string) *hclsyntax.Block {
	t.Helper()
	var found []*hclsyntax.Block
	for _, b := range body.Blocks {
		if b.Type == typ {
			found = append(found, b)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%d %q blocks, want 1", len(found), typ)
	}
	return found[0]
}

// attrValue evaluates an attribute. A reference to a variable, such as
// Nomad's ${NOMAD_ALLOC_ID}, evaluates to its own text, so that the test
// sees what Nomad would interpolate.
func attrValue(t *testing.T, body *hclsyntax.Body, name string) cty.Value {
	t.Helper()
	a, ok := body.Attributes[name]
	if !ok {
		t.Fatalf("no attribute %q", name)
	}
	ctx := &hcl.EvalContext{Variables: map[string]cty.Value{}}
	for _, tr := range a.Expr.Variables() {
		root := tr.RootName()
		ctx.Variables[root] = cty.StringVal("${" + root + "}")
	}
	v, diags := a.Expr.Value(ctx)
	if diags.HasErrors() {
		t.Fatalf("attribute %s: %s", name, diags.Error())
	}
	return v
}

func stringAttr(t *testing.T, body *hclsyntax.Body, name string) string {
	t.Helper()
	v := attrValue(t, body, name)
	if v.Type() != cty.String {
		t.Fatalf("attribute %s is a %s, want a string", name, v.Type().FriendlyName())
	}
	return v.AsString()
}

func stringList(t *testing.T, body *hclsyntax.Body, name string) []string {
	t.Helper()
	v := attrValue(t, body, name)
	if !v.Type().IsTupleType() && !v.Type().IsListType() {
		t.Fatalf("attribute %s is a %s, want a list", name, v.Type().FriendlyName())
	}
	var out []string
	for _, e := range v.AsValueSlice() {
		if e.Type() != cty.String {
			t.Fatalf("attribute %s has a %s element, want strings", name, e.Type().FriendlyName())
		}
		out = append(out, e.AsString())
	}
	return out
}

func mapKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	return keys
}

// TestUnitCommandLine runs the unit's ExecStart as systemd would for the
// instance "web", with only the paths a test cannot use replaced (each
// replacement must happen): the built binary for /usr/local/bin, a temp
// dir for /var/lib/haproxy-connect/web, this machine's haproxy,
// $HAPROXY_CONNECT_OPTS from the example env file with a free stats port,
// CONSUL_HTTP_ADDR pointing at a test Consul that has ACLs on with default
// deny, and the token where LoadCredential puts it (%d/consul-token) and
// nowhere else. The sidecar must become ready, and the unit's KillSignal
// must stop it with exit 0 and its HAProxy gone.
func TestUnitCommandLine(t *testing.T) {
	keys := unitKeys(t, unitFile)
	env := envFile(t, "haproxy-connect.env.example")
	consul := testenv.Consul(t, testenv.ConsulOptions{ACL: true})
	token := serviceToken(t, consul, "web")
	register(t, consul, token, "web")

	stateDir := filepath.Join(testenv.ShortTempDir(t), "web")
	creds := t.TempDir()
	if err := os.WriteFile(filepath.Join(creds, "consul-token"), []byte(token+"\n"), 0o400); err != nil {
		t.Fatal(err)
	}
	stats := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	opts := mustReplace(t, env["HAPROXY_CONNECT_OPTS"], "127.0.0.1:19100", stats)
	line := keys["ExecStart"]
	line = mustReplace(t, line, unitBin, sidecarBin(t))
	line = mustReplace(t, line, "/var/lib/haproxy-connect/%i", stateDir)
	line = mustReplace(t, line, "%i", "web")
	line = mustReplace(t, line, "/usr/sbin/haproxy", testenv.HAProxyBin(t))
	line = mustReplace(t, line, "$HAPROXY_CONNECT_OPTS", opts)
	tokenEnv := mustReplace(t, keys["Environment"], "%d", creds)
	addrEnv := mustReplace(t, "CONSUL_HTTP_ADDR="+env["CONSUL_HTTP_ADDR"], "127.0.0.1:8500", consul.Addr)

	runUntilStopped(t, strings.Fields(line), []string{tokenEnv, addrEnv}, stats, stateDir, signalNamed(t, keys["KillSignal"]))
}

// TestNomadCommandLine runs the job's haproxy-connect task as Nomad would,
// after its registration task: Nomad's variables filled in, the token in
// the file the job's env block names, against a test Consul with ACLs on
// and default deny; only the binary, haproxy and the agent's address are
// replaced (each replacement must happen). The sidecar must become ready
// and the task's kill_signal must stop it with exit 0 and its HAProxy gone.
func TestNomadCommandLine(t *testing.T) {
	group := onlyBlock(t, onlyBlock(t, parseJob(t), "job").Body, "group").Body
	tasks := map[string]*hclsyntax.Body{}
	for _, b := range group.Blocks {
		if b.Type == "task" {
			tasks[b.Labels[0]] = b.Body
		}
	}
	consul := testenv.Consul(t, testenv.ConsulOptions{ACL: true})
	token := serviceToken(t, consul, "web")
	alloc := "0b8e3c8e-58a4-4f0b-8f0e-3f4c2d1a9b7e"
	taskDir, secrets := testenv.ShortTempDir(t), t.TempDir()
	if err := os.WriteFile(filepath.Join(secrets, "consul-token"), []byte(token), 0o400); err != nil {
		t.Fatal(err)
	}
	ports := testenv.FreePorts(t, 4)
	nomad := map[string]string{
		"NOMAD_ALLOC_ID":    alloc,
		"NOMAD_TASK_DIR":    taskDir,
		"NOMAD_SECRETS_DIR": secrets,
		"NOMAD_IP_app":      "127.0.0.1",
		"NOMAD_PORT_app":    fmt.Sprint(ports[0]),
		"NOMAD_ADDR_app":    fmt.Sprintf("127.0.0.1:%d", ports[0]),
		"NOMAD_IP_public":   "127.0.0.1",
		"NOMAD_PORT_public": fmt.Sprint(ports[1]),
		"NOMAD_ADDR_public": fmt.Sprintf("127.0.0.1:%d", ports[1]),
		"NOMAD_ADDR_stats":  fmt.Sprintf("127.0.0.1:%d", ports[2]),
	}
	interpolate := func(s string) string {
		return nomadVar.ReplaceAllStringFunc(s, func(v string) string {
			name := nomadVar.FindStringSubmatch(v)[1]
			val, ok := nomad[name]
			if !ok {
				t.Errorf("the job uses ${%s}, which this test does not set", name)
			}
			return val
		})
	}

	// The registration task, with its token from the env block.
	register := tasks["register"]
	services := renderServices(t, register, nomad)
	services = mustReplace(t, services, "local_bind_port  = 9191", fmt.Sprintf("local_bind_port  = %d", ports[3]))
	file := filepath.Join(t.TempDir(), "services.hcl")
	if err := os.WriteFile(file, []byte(services), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(testenv.ConsulBin(t), "services", "register", "-http-addr="+consul.Addr, file)
	cmd.Env = append(os.Environ(), taskEnv(t, register, interpolate)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("the register task with its token: %v\n%s", err, out)
	}

	sidecar := tasks["haproxy-connect"]
	args := stringList(t, onlyBlock(t, sidecar, "config").Body, "args")
	for i := range args {
		args[i] = interpolate(args[i])
	}
	line := strings.Join(args, "\x00")
	line = mustReplace(t, line, "127.0.0.1:8500", consul.Addr)
	line = mustReplace(t, line, "/usr/sbin/haproxy", testenv.HAProxyBin(t))
	argv := append([]string{sidecarBin(t)}, strings.Split(line, "\x00")...)
	stateDir := filepath.Join(taskDir, "state")
	if !slices.Contains(argv, stateDir) {
		t.Fatalf("args %q: no state dir %s", argv, stateDir)
	}
	runUntilStopped(t, argv, taskEnv(t, sidecar, interpolate), nomad["NOMAD_ADDR_stats"], stateDir,
		signalNamed(t, stringAttr(t, sidecar, "kill_signal")))
}

// nomadVar is Nomad's ${NAME} interpolation.
var nomadVar = regexp.MustCompile(`\$\{([A-Za-z0-9_]+)\}`)

// renderServices renders the register task's services.hcl template with
// the env values consul-template's env function would give.
func renderServices(t *testing.T, task *hclsyntax.Body, env map[string]string) string {
	t.Helper()
	var data string
	for _, tb := range task.Blocks {
		if tb.Type == "template" && strings.HasSuffix(stringAttr(t, tb.Body, "destination"), "/services.hcl") {
			data = stringAttr(t, tb.Body, "data")
		}
	}
	if data == "" {
		t.Fatal("the register task has no services.hcl template")
	}
	out := envCall.ReplaceAllStringFunc(data, func(call string) string {
		name := envCall.FindStringSubmatch(call)[1]
		v, ok := env[name]
		if !ok {
			t.Errorf("the template reads %s, which this test does not set", name)
		}
		return v
	})
	if strings.Contains(out, "{{") {
		t.Fatalf("template calls this test does not render:\n%s", out)
	}
	return out
}

// taskEnv is a task's env block as NAME=value, interpolated.
func taskEnv(t *testing.T, task *hclsyntax.Body, interpolate func(string) string) []string {
	t.Helper()
	var out []string
	for name := range onlyBlock(t, task, "env").Body.Attributes {
		out = append(out, name+"="+interpolate(stringAttr(t, onlyBlock(t, task, "env").Body, name)))
	}
	return out
}

// runUntilStopped starts argv with env added to this process's, waits until
// /readyz on stats answers 200, sends sig, and requires exit 0 and the
// HAProxy master named in stateDir's pid file gone.
func runUntilStopped(t *testing.T, argv, env []string, stats, stateDir string, sig syscall.Signal) {
	t.Helper()
	var out strings.Builder
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = &out, &out
	// HAProxy inherits the output and may outlive a failed test.
	cmd.WaitDelay = time.Second
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	master := 0
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			<-done
		}
		if master > 0 && runtime.ProcessAlive(master) {
			runtime.Kill(master)
		}
		if t.Failed() {
			t.Logf("%q output:\n%s", argv, out.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for ready := false; !ready; {
		resp, err := http.Get("http://" + stats + "/readyz")
		if err == nil {
			resp.Body.Close()
			ready = resp.StatusCode == http.StatusOK
		}
		select {
		case err := <-done:
			t.Fatalf("exited before it was ready: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
		if !ready && time.Now().After(deadline) {
			t.Fatal("not ready in 30s")
		}
	}
	b, err := os.ReadFile(filepath.Join(stateDir, "haproxy.pid"))
	if err != nil {
		t.Fatal(err)
	}
	if master, err = strconv.Atoi(strings.TrimSpace(string(b))); err != nil || !runtime.ProcessAlive(master) {
		t.Fatalf("haproxy master %q not running: %v", b, err)
	}
	if err := cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("after %v: %v, want exit 0", sig, err)
		}
	case <-time.After(25 * time.Second):
		t.Fatalf("still running 25 s after %v", sig)
	}
	if runtime.ProcessAlive(master) {
		t.Errorf("haproxy master %d still runs after haproxy-connect stopped", master)
	}
}

func signalNamed(t *testing.T, name string) syscall.Signal {
	t.Helper()
	switch name {
	case "SIGTERM":
		return syscall.SIGTERM
	case "SIGINT":
		return syscall.SIGINT
	}
	t.Fatalf("stop signal %q: want SIGTERM or SIGINT, the signals haproxy-connect stops on", name)
	return 0
}

// mustReplace replaces every old in s with new, and fails if there is none.
func mustReplace(t *testing.T, s, old, new string) string {
	t.Helper()
	if !strings.Contains(s, old) {
		t.Fatalf("%q does not contain %q", s, old)
	}
	return strings.ReplaceAll(s, old, new)
}

// envFile reads a systemd EnvironmentFile's NAME=value lines.
func envFile(t *testing.T, path string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		l = strings.TrimSpace(l)
		if l == "" || l[0] == '#' {
			continue
		}
		if k, v, ok := strings.Cut(l, "="); ok {
			env[k] = v
		}
	}
	return env
}

// serviceToken makes a service-identity token for service.
func serviceToken(t *testing.T, consul *testenv.ConsulProc, service string) string {
	t.Helper()
	tok, _, err := consul.Client.ACL().TokenCreate(&api.ACLToken{
		ServiceIdentities: []*api.ACLServiceIdentity{{ServiceName: service}},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return tok.SecretID
}

// register registers service, with a sidecar, using token.
func register(t *testing.T, consul *testenv.ConsulProc, token, service string) {
	t.Helper()
	c, err := consul.NewClient(token)
	if err != nil {
		t.Fatal(err)
	}
	ports := testenv.FreePorts(t, 2)
	passing := api.AgentServiceChecks{{Name: "alive", TTL: "1h", Status: api.HealthPassing}}
	if err := c.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: service, Name: service, Port: ports[0], Address: "127.0.0.1", Checks: passing,
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
			Port: ports[1], Address: "127.0.0.1", Checks: passing,
		}},
	}); err != nil {
		t.Fatal(err)
	}
}

func TestMain(m *testing.M) {
	code := m.Run()
	if builtBin != "" {
		os.RemoveAll(filepath.Dir(builtBin))
	}
	os.Exit(code)
}

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// sidecarBin builds haproxy-connect once for this package's tests.
func sidecarBin(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "hcdeploy")
		if err != nil {
			buildErr = err
			return
		}
		builtBin = filepath.Join(dir, "haproxy-connect")
		if out, err := exec.Command("go", "build", "-o", builtBin, "../cmd/haproxy-connect").CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("build haproxy-connect: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtBin
}
