package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/testenv"
)

// runStatus runs the built binary's status on the sidecar's state dir,
// with -json, and returns the report. A non-zero exit fails the test.
func (s *sidecar) runStatus(t *testing.T) statusReport {
	t.Helper()
	var out, errOut bytes.Buffer
	cmd := exec.Command(sidecarBin, "status", "-state-dir", s.stateDir, "-json")
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		t.Fatalf("status: %v\nstdout:\n%s\nstderr:\n%s", err, out.String(), errOut.String())
	}
	var r statusReport
	if err := json.Unmarshal(out.Bytes(), &r); err != nil {
		t.Fatalf("status -json: %v\n%s", err, out.String())
	}
	return r
}

// slotOf returns the slot of backend that serves instance id, or nil.
func (r statusReport) slotOf(backend, id string) *slotStatus {
	for _, u := range r.Upstreams {
		if u.Backend != backend {
			continue
		}
		for i, s := range u.Slots {
			if s.Instance == id {
				return &u.Slots[i]
			}
		}
	}
	return nil
}

// slotOfAddr returns the slot of backend that serves port on loopback, or
// nil.
func (r statusReport) slotOfAddr(backend string, port int) *slotStatus {
	u := r.upstream(backend)
	if u == nil {
		return nil
	}
	want := fmt.Sprintf("127.0.0.1:%d", port)
	for i, s := range u.Slots {
		if s.Address == want && s.State == "ready" {
			return &u.Slots[i]
		}
	}
	return nil
}

func (r statusReport) upstream(backend string) *upstreamStatus {
	for i, u := range r.Upstreams {
		if u.Backend == backend {
			return &r.Upstreams[i]
		}
	}
	return nil
}

// TestStatus runs "haproxy-connect status" against a live client sidecar
// whose upstream has two endpoints: it names the real Consul instances
// and their addresses, the free slots, the leaf Consul issued, the reload
// count and the last reload's reason. Then one endpoint is deregistered
// and another registered, under load: status, and the access log of a
// request, name the new instance on the reused slot, and no request fails.
func TestStatus(t *testing.T) {
	m := startMesh(t, testenv.ConsulOptions{}, "http")
	c, ports, client := m.c, m.ports, m.client
	extra1 := addServerEndpoint(t, c, "server-extra-1", ports[0])
	eventually(t, 10*time.Second, "both endpoints in the client's upstream", func() error {
		if err := client.inBackend("up_server", ports[0])(); err != nil {
			return err
		}
		return client.inBackend("up_server", extra1)()
	})

	r := client.runStatus(t)
	if len(r.Errors) > 0 {
		t.Fatalf("status errors: %q", r.Errors)
	}
	for id, port := range map[string]int{"server-sidecar-proxy": ports[0], "server-extra-1": extra1} {
		s := r.slotOf("up_server", id)
		if s == nil {
			t.Fatalf("status names no slot for instance %s: %+v", id, r.Upstreams)
		}
		if want := fmt.Sprintf("127.0.0.1:%d", port); s.Address != want || s.State != "ready" || s.Weight != 1 {
			t.Errorf("instance %s: %+v, want address %s, ready, weight 1", id, *s, want)
		}
	}
	u := r.upstream("up_server")
	if u.Used != 2 || u.Free != len(u.Slots)-2 || u.Free < 1 {
		t.Errorf("up_server: %d used, %d free of %d slots; want 2 used and the rest free", u.Used, u.Free, len(u.Slots))
	}
	leaf, _, err := c.Agent().ConnectCALeaf("client", nil)
	if err != nil {
		t.Fatal(err)
	}
	if r.Leaf == nil || normSerial(r.Leaf.Serial) != normSerial(leaf.SerialNumber) {
		t.Errorf("leaf %+v, Consul's serial %s", r.Leaf, leaf.SerialNumber)
	}
	roots, _, err := c.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Roots) != len(roots.Roots) {
		t.Errorf("%d roots in status, Consul has %d", len(r.Roots), len(roots.Roots))
	}
	if r.LastReload != "start" || r.Master.Reloads != client.reloads(t) || r.Master.PID == 0 || len(r.Workers) == 0 {
		t.Errorf("master %+v, workers %+v, last reload %q; want the show proc figures and \"start\"", r.Master, r.Workers, r.LastReload)
	}

	// A reload: its count and its reason.
	before := client.reloads(t)
	register(t, c, "client", ports[1], ports[2], nil, m.upstream,
		api.Upstream{DestinationName: "nobody", LocalBindPort: testenv.FreePort(t)})
	eventually(t, 10*time.Second, "the reload for the new upstream", func() error {
		if n := client.reloads(t); n != before+1 {
			return fmt.Errorf("%d reloads, want %d", n, before+1)
		}
		return nil
	})
	eventually(t, 5*time.Second, "status after the reload", func() error {
		r = client.runStatus(t)
		if r.Master.Reloads != before+1 || r.LastReload != "registration: upstream up_nobody added" || r.upstream("up_nobody") == nil {
			return fmt.Errorf("reloads %d, last reload %q, upstreams %d", r.Master.Reloads, r.LastReload, len(r.Upstreams))
		}
		return nil
	})
	old := r.slotOf("up_server", "server-extra-1")
	if old == nil {
		t.Fatalf("after the reload status lost server-extra-1: %+v", r.Upstreams)
	}

	// The instance changes, under load: the new one takes the freed slot.
	// Before, the access log names the old one on that slot.
	inst := fmt.Sprintf("up_server/%s ", old.Slot)
	stopLoad := load(get200(ports[3]))
	eventually(t, 10*time.Second, "access log names server-extra-1", func() error {
		if n := client.logCount(inst, fmt.Sprintf("inst=server-extra-1@127.0.0.1:%d", extra1)); n < 5 {
			return fmt.Errorf("%d lines", n)
		}
		return nil
	})
	if err := c.Agent().ServiceDeregister("server-extra-1"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "server-extra-1 parked", func() error {
		if client.inBackend("up_server", extra1)() == nil {
			return fmt.Errorf("still in service")
		}
		return nil
	})
	extra2 := addServerEndpoint(t, c, "server-extra-2", ports[0])
	eventually(t, 10*time.Second, "server-extra-2 in service", client.inBackend("up_server", extra2))
	r = client.runStatus(t)
	s := r.slotOf("up_server", "server-extra-2")
	if s == nil || s.Slot != old.Slot || s.Address != fmt.Sprintf("127.0.0.1:%d", extra2) || r.slotOf("up_server", "server-extra-1") != nil {
		t.Errorf("server-extra-2 on %+v, want the slot %s server-extra-1 had, at port %d; slots %+v", s, old.Slot, extra2, r.upstream("up_server").Slots)
	}
	// Requests that the new instance served say so in the access log,
	// with the slot they went to: wait for a few, then for a thousand
	// more, so that traffic keeps flowing for a while after the change.
	named := fmt.Sprintf("inst=server-extra-2@127.0.0.1:%d", extra2)
	eventually(t, 10*time.Second, "access log names server-extra-2", func() error {
		if n := client.logCount(inst, named); n < 20 {
			return fmt.Errorf("%d lines", n)
		}
		return nil
	})
	seen := client.logCount(inst, named)
	eventually(t, 30*time.Second, "traffic after the change", func() error {
		if n := client.logCount(inst, named); n < seen+1000 {
			return fmt.Errorf("%d lines", n)
		}
		return nil
	})
	ok, failed, first := stopLoad()
	if failed > 0 {
		t.Errorf("%d of %d requests failed across the instance change; first: %v", failed, ok+failed, first)
	}

	// The text form says the same for a person.
	out, err := exec.Command(sidecarBin, "status", "-state-dir", client.stateDir).CombinedOutput()
	if err != nil {
		t.Fatalf("status: %v\n%s", err, out)
	}
	for _, want := range []string{"last reload  registration: upstream up_nobody added", "upstream up_server: 2 used, ",
		fmt.Sprintf("server-extra-2        127.0.0.1:%d", extra2), "server-sidecar-proxy"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("status text lacks %q:\n%s", want, out)
		}
	}
	t.Logf("status:\n%s", out)
}
