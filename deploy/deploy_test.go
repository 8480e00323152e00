// Package deploy holds the files users deploy haproxy-connect with: a
// systemd template unit and a Nomad job. It has no Go code; its tests check
// those files: the unit with systemd-analyze verify and for the stop and
// crash settings the README promises, the job by parsing it and by
// registering what its registration task renders with a real Consul agent.
package deploy

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclsyntax"
	"github.com/zclconf/go-cty/cty"

	"github.com/haproxy-connect/haproxy-connect/controller"
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
	body := parseJob(t)
	var data string
	for _, b := range onlyBlock(t, onlyBlock(t, body, "job").Body, "group").Body.Blocks {
		if b.Type != "task" || b.Labels[0] != "register" {
			continue
		}
		for _, tb := range b.Body.Blocks {
			if tb.Type == "template" && strings.HasSuffix(stringAttr(t, tb.Body, "destination"), "/services.hcl") {
				data = stringAttr(t, tb.Body, "data")
			}
		}
	}
	if data == "" {
		t.Fatal("the register task has no services.hcl template")
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
	rendered := envCall.ReplaceAllStringFunc(data, func(call string) string {
		name := envCall.FindStringSubmatch(call)[1]
		v, ok := env[name]
		if !ok {
			t.Errorf("the template reads %s, which this test does not set", name)
		}
		return v
	})
	if strings.Contains(rendered, "{{") {
		t.Fatalf("template calls this test does not render:\n%s", rendered)
	}
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
