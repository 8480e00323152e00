package main

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// aclToken makes an ACL token for a service whose sidecar has the given
// upstreams, with the management client, and returns its secret.
type aclToken func(t *testing.T, mgmt *api.Client, service string, upstreams ...string) string

// serviceIdentityToken is what `consul acl token create
// -service-identity=<service>` makes: Consul's builtin/service template,
// service:write on the service and on <service>-sidecar-proxy,
// service:read and node:read on everything.
func serviceIdentityToken(t *testing.T, mgmt *api.Client, service string, _ ...string) string {
	t.Helper()
	tok, _, err := mgmt.ACL().TokenCreate(&api.ACLToken{
		Description:       "sidecar of " + service,
		ServiceIdentities: []*api.ACLServiceIdentity{{ServiceName: service}},
	}, nil)
	if err != nil {
		t.Fatalf("create service-identity token for %s: %v", service, err)
	}
	return tok.SecretID
}

// minimalRules is the smallest policy a sidecar's token needs, the one
// the README gives; each line says which of the sidecar's calls needs it.
func minimalRules(service string, upstreams ...string) string {
	var b strings.Builder
	// Leaf certificate (/v1/agent/connect/ca/leaf/<service>) and
	// authorize (/v1/agent/connect/authorize, Target <service>) need
	// write; intentions:read on <service>, for the intentions watch
	// (/v1/connect/intentions/match), comes with it.
	fmt.Fprintf(&b, "service %q { policy = \"write\" }\n", service)
	// The proxy registration (/v1/agent/services, /v1/agent/service/<id>);
	// write also lets the token register it.
	fmt.Fprintf(&b, "service %q { policy = \"write\" }\n", service+"-sidecar-proxy")
	for _, u := range upstreams {
		// /v1/health/connect/<upstream> answers 403 without it.
		fmt.Fprintf(&b, "service %q { policy = \"read\" }\n", u)
		// Its instances are the upstream's proxies: without read on
		// their name Consul leaves them out of the answer.
		fmt.Fprintf(&b, "service %q { policy = \"read\" }\n", u+"-sidecar-proxy")
	}
	// Instances on nodes the token cannot read are left out as well.
	b.WriteString("node_prefix \"\" { policy = \"read\" }\n")
	return b.String()
}

// minimalPolicyToken makes a token with minimalRules as its only policy.
func minimalPolicyToken(t *testing.T, mgmt *api.Client, service string, upstreams ...string) string {
	t.Helper()
	return policyToken(t, mgmt, service+"-sidecar", minimalRules(service, upstreams...))
}

// policyToken makes a token whose only policy is rules, named name.
func policyToken(t *testing.T, mgmt *api.Client, name, rules string) string {
	t.Helper()
	p, _, err := mgmt.ACL().PolicyCreate(&api.ACLPolicy{Name: name, Rules: rules}, nil)
	if err != nil {
		t.Fatalf("create policy %s: %v", name, err)
	}
	tok, _, err := mgmt.ACL().TokenCreate(&api.ACLToken{Policies: []*api.ACLTokenPolicyLink{{ID: p.ID}}}, nil)
	if err != nil {
		t.Fatalf("create token with policy %s: %v", name, err)
	}
	return tok.SecretID
}

// TestACL runs the mesh as users run it: Consul with ACLs enabled and
// default_policy deny, each service and its sidecar registered with that
// service's own token, and each sidecar given that token with -token and
// nothing else. Once with service-identity tokens, once with the minimal
// policy the README documents. It shows that the token is enough for every
// call the sidecar makes: the registration (it starts), leaf and roots
// (ready), the upstream's healthy instances (the client's slot fills),
// authorize (an allowed request goes through) and the intentions watch
// (the server's agent decides under the deny intention's index); and no
// call was refused (no "Permission denied" in either log).
func TestACL(t *testing.T) {
	tests := []struct {
		name  string
		token aclToken
	}{
		{"service identity", serviceIdentityToken},
		{"minimal policy", minimalPolicyToken},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			consul := testenv.Consul(t, testenv.ConsulOptions{ACL: true})
			mgmt := consul.Client
			// server sidecar, client app, client sidecar, client's upstream
			ports := testenv.FreePorts(t, 4)
			app := httpApp(t, "server")
			serverToken := tt.token(t, mgmt, "server")
			clientToken := tt.token(t, mgmt, "client", "server")

			register(t, tokenClient(t, consul, serverToken), "server", app, ports[0], map[string]any{"protocol": "http"})
			register(t, tokenClient(t, consul, clientToken), "client", ports[1], ports[2], nil,
				api.Upstream{DestinationName: "server", LocalBindPort: ports[3], Config: map[string]any{"protocol": "http"}})
			server := startSidecar(t, consul, "server", "-token", serverToken)
			client := startSidecar(t, consul, "client", "-token", clientToken)

			eventually(t, 10*time.Second, "client sidecar has the server endpoint", client.inBackend("up_server", ports[0]))
			// No intention yet: the ACL default (deny) applies.
			for range 5 {
				if err := serves(ports[3], "hello from server")(); err == nil {
					t.Fatal("a request went through under default deny with no intention")
				}
			}

			allow := intention(t, mgmt, "client", "server", api.IntentionActionAllow)
			eventually(t, 10*time.Second, "the server sidecar sees the allow", server.sawIntentions(allow))
			eventually(t, 5*time.Second, "allowed after the allow intention", serves(ports[3], "hello from server"))
			// Traffic keeps flowing, on new and on kept-alive connections.
			call, reused := keptAlive(t, &http.Transport{MaxIdleConnsPerHost: 1}, fmt.Sprintf("http://127.0.0.1:%d/", ports[3]))
			for i := range 100 {
				if err := serves(ports[3], "hello from server")(); err != nil {
					t.Fatalf("request %d on a new connection: %v", i, err)
				}
				if code, err := call(); err != nil || code != 200 {
					t.Fatalf("request %d on a kept-alive connection: %d %v", i, code, err)
				}
			}
			if !reused.Load() {
				t.Error("the kept-alive connection was not reused")
			}
			if v, err := server.metric("haproxy_connect_authz_decisions_total", "result", "allow"); err != nil || v < 1 {
				t.Errorf("server agent allow decisions: %v %v, want at least 1 (authorize with the service's token)", v, err)
			}

			// A crash of the client's controller under load, and a new one
			// on the same state dir given the token as the systemd unit
			// gives it, in a file named by CONSUL_HTTP_TOKEN_FILE: it adopts
			// the running HAProxy and no request fails.
			tokenFile := filepath.Join(t.TempDir(), "consul-token")
			if err := os.WriteFile(tokenFile, []byte(clientToken+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			master := client.masterPID()
			begin := time.Now()
			tr := startTraffic(t, ports[3])
			tr.flowFor(t, 500*time.Millisecond, 20)
			if err := client.cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			<-client.done
			crashed := client
			t.Setenv("CONSUL_HTTP_TOKEN_FILE", tokenFile) // inherited by the next sidecar only
			client = launchSidecar(t, consul, "client", client.stateDir)
			client.waitReady(t)
			if got := client.masterPID(); got != master {
				t.Errorf("master PID %d after the restart, want the adopted %d", got, master)
			}
			eventually(t, 10*time.Second, "the restarted client sidecar has the server endpoint", client.inBackend("up_server", ports[0]))
			tr.flowFor(t, time.Second, 50)
			tr.halt()
			tr.requireNoFailures(t, begin, "through the crash and the adoption")

			deny := intention(t, mgmt, "client", "server", api.IntentionActionDeny)
			eventually(t, 10*time.Second, "the server sidecar sees the deny", server.sawIntentions(deny))
			eventually(t, 10*time.Second, "refused after the deny", func() error {
				if err := serves(ports[3], "hello from server")(); err == nil {
					return errors.New("still allowed")
				}
				return nil
			})
			for i := range 20 {
				if err := serves(ports[3], "hello from server")(); err == nil {
					t.Fatalf("request %d on a new connection allowed after the deny", i)
				}
				if code, err := call(); err == nil && code == 200 {
					t.Fatalf("request %d on the kept-alive connection allowed after the deny", i)
				}
			}

			// Consul's words when a token lacks a permission; "ACL not
			// found" when it is unknown.
			for name, s := range map[string]*sidecar{"server": server, "client": crashed, "restarted client": client} {
				for _, refused := range []string{"Permission denied", "ACL not found"} {
					if out := s.out.String(); strings.Contains(out, refused) {
						t.Errorf("%s sidecar: Consul refused a call (%q):\n%s", name, refused, failureLog(out, 40, 0))
					}
				}
			}
		})
	}
}

// TestACLUpstreamPolicy pins down what the README says a token needs for
// an upstream's healthy instances (/v1/health/connect/<upstream>, the
// client sidecar's upstream watch), on this Consul: read on the upstream,
// else a 403; read on its proxies' service name and on their nodes, else
// Consul leaves them out of the answer and says so only in a header
// (X-Consul-Results-Filtered-By-ACLs), so the upstream looks empty.
func TestACLUpstreamPolicy(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{ACL: true})
	mgmt := consul.Client
	register(t, mgmt, "server", testenv.FreePort(t), testenv.FreePort(t), nil)
	own := `service "client" { policy = "write" }
service "client-sidecar-proxy" { policy = "write" }
`
	tests := []struct {
		name, rules  string
		wantErr      string
		wantN        int
		wantFiltered bool
	}{
		{"minimal", minimalRules("client", "server"), "", 1, false},
		{"no read on the upstream", own + `node_prefix "" { policy = "read" }`, "Permission denied", 0, false},
		{"no read on its proxies", own + `service "server" { policy = "read" }
node_prefix "" { policy = "read" }`, "", 0, true},
		{"no read on the nodes", own + `service "server" { policy = "read" }
service "server-sidecar-proxy" { policy = "read" }`, "", 0, true},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := tokenClient(t, consul, policyToken(t, mgmt, fmt.Sprintf("p%d", i), tt.rules))
			entries, meta, err := c.Health().Connect("server", "", true, nil)
			switch {
			case tt.wantErr != "":
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("health of server: %v, want an error with %q", err, tt.wantErr)
				}
				return
			case err != nil:
				t.Fatalf("health of server: %v", err)
			}
			if len(entries) != tt.wantN || meta.ResultsFilteredByACLs != tt.wantFiltered {
				t.Errorf("health of server: %d instances, filtered by ACLs %v; want %d, %v",
					len(entries), meta.ResultsFilteredByACLs, tt.wantN, tt.wantFiltered)
			}
		})
	}
}

// tokenClient is a Consul API client that sends token.
func tokenClient(t *testing.T, consul *testenv.ConsulProc, token string) *api.Client {
	t.Helper()
	c, err := consul.NewClient(token)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestACLTokenRefused: a sidecar whose token Consul does not know, or
// whose token may not read its registration, exits non-zero with one line
// that says so, instead of calling Consul unreachable or the registration
// missing without a word about ACLs.
func TestACLTokenRefused(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{ACL: true})
	mgmt := consul.Client
	register(t, mgmt, "client", testenv.FreePort(t), testenv.FreePort(t), nil)
	tests := []struct {
		name, token, want string
	}{
		{"unknown token", "3f9c1c52-5a0e-4d8b-9d7e-2b6f0c1a4e5d", "refused the token"},
		{"token that cannot read the registration",
			policyToken(t, mgmt, "nodes-only", `node_prefix "" { policy = "read" }`),
			"the agent lists only the services the token may read"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := launchSidecar(t, consul, "client", testenv.ShortTempDir(t), "-token", tt.token, "-start-timeout", "1s")
			select {
			case <-s.done:
			case <-time.After(20 * time.Second):
				t.Fatal("the sidecar did not exit")
			}
			if s.cmd.ProcessState.Success() {
				t.Error("the sidecar exited 0")
			}
			if out := s.out.String(); !strings.Contains(out, tt.want) {
				t.Errorf("the sidecar said, without %q:\n%s", tt.want, out)
			}
		})
	}
}

// TestConsulLeafWithoutToken pins what the README's "Running it in
// production" warns about, on this Consul (1.22.3, dev agent, default
// deny): the agent refuses a service's leaf to a request without a token
// until a sidecar of the service is registered on it, and then hands out
// the leaf and its private key to that same request. If this fails,
// Consul no longer does so: update the README.
func TestConsulLeafWithoutToken(t *testing.T) {
	consul := testenv.Consul(t, testenv.ConsulOptions{ACL: true})
	anonymous := tokenClient(t, consul, "")
	if _, _, err := anonymous.Agent().ConnectCALeaf("client", nil); err == nil || !strings.Contains(err.Error(), "Permission denied") {
		t.Fatalf("leaf without a token, before registration: %v, want Permission denied", err)
	}
	register(t, consul.Client, "client", testenv.FreePort(t), testenv.FreePort(t), nil)
	leaf, _, err := anonymous.Agent().ConnectCALeaf("client", nil)
	if err != nil {
		t.Fatalf("leaf without a token, after the sidecar registration: %v (Consul no longer hands it out: update the README)", err)
	}
	if !strings.Contains(leaf.PrivateKeyPEM, "PRIVATE KEY") {
		t.Errorf("leaf without its private key: %q", leaf.PrivateKeyPEM)
	}
}
