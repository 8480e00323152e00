package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/haproxy-connect/haproxy-connect/runtime"
)

// Replies as haproxy 2.6.12 gives them (trimmed to the columns and rows
// that matter), in statusCommands' order.
const (
	replyProc = `#<PID>          <type>          <reloads>       <uptime>        <version>      
2596            master          2 [failed: 0]   0d00h01m52s     2.6.12-1+deb12u4
# workers
3555            worker          0               0d00h00m39s     2.6.12-1+deb12u4
3001            worker          1               0d00h01m39s     2.6.12-1+deb12u4
# programs
`
	replyServers = `1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port
3 local_app 1 app 127.0.0.1 2 0 1 1 100 1 0 0 0 0 0 0 - 8080 - 0 0 - - 0
5 up_web 1 s1 10.0.0.1 2 0 1 1 100 1 0 0 0 0 0 0 - 21000 - 1 0 - - 0
5 up_web 2 s2 10.0.0.2 2 8 5 5 100 1 0 0 0 0 0 0 - 21000 - 1 0 - - 0
5 up_web 3 s3 127.0.0.1 0 5 1 1 100 1 0 0 0 0 0 0 - 1 - 1 0 - - 0
5 up_web 4 s4 fd00::7 2 4 1 1 100 1 0 0 0 0 0 0 - 21000 - 1 0 - - 0
`
	replyStats = `# pxname,svname,qcur,scur,econ,status,check_status,addr
up_web,s1,0,3,0,no check,,10.0.0.1:21000
up_web,s2,0,1,0,DRAIN,,10.0.0.2:21000
up_web,s3,0,0,0,MAINT,,127.0.0.1:1
up_web,s4,0,0,0,no check,,[fd00::7]:21000
up_web,BACKEND,0,4,0,UP,,
`
	replyInstances = `0x55a427d38c50 up_web/s1 web-1@10.0.0.1:21000
0x55a427d38ce0 up_web/s2 ?@10.0.0.2:21000
0x55a427d38d70 up_web/s3 -
0x7fc440046d40 up_web/s4 web-4@[fd00::7]:21000
`
	replyState = `0x55a427cafc40 reload_reason registration:_upstream_up~5Fweb_added
0x55a427cafc90 config_id c0ffee-1
`
	replyLeaf = `Filename: /s/leaf.pem
Status: Used
Serial: 3A4B
notBefore: Dec  3 08:58:35 2026 GMT
notAfter: Dec  6 08:58:35 2026 GMT
Subject Alternative Name: URI:spiffe://td.consul/ns/default/dc/dc1/svc/client
Subject: 
`
	caFile262 = `Filename: /s/roots.pem
Status: Used
 
Certificate #1:
Serial: 2212E2E9E7DF94D6D245BD99D142B90FC4515B0C
notBefore: Dec  3 08:58:35 2026 GMT
notAfter: Dec  5 08:58:35 2026 GMT
Subject Alternative Name: 
Algorithm: EC256
SHA1 FingerPrint: 4355C4F76BBE9845874277BBCB0E5AF8A9BD7910
Subject: /CN=root1
Issuer: /CN=root1
 
Certificate #2:
Serial: 5CA791A3EDACBD30E221FA69900FD4E32B9B9635
notBefore: Dec  3 08:58:35 2026 GMT
notAfter: Dec  5 08:58:35 2026 GMT
Subject Alternative Name: 
Algorithm: EC256
SHA1 FingerPrint: F7B9ED17452E336626CE490D1708755DB4C7DFFD
Subject: /CN=root2
Issuer: /CN=root2
`
)

func results(replies ...string) runtime.Results {
	rs := make(runtime.Results, len(replies))
	for i, r := range replies {
		rs[i].Reply = r
	}
	return rs
}

func TestBuildStatus(t *testing.T) {
	got := buildStatus("/s", results(replyProc, replyServers, replyStats, replyInstances, replyState, replyLeaf, caFile262))
	want := statusReport{
		StateDir:   "/s",
		Master:     processStatus{PID: 2596, Reloads: 2, Version: "2.6.12-1+deb12u4"},
		Workers:    []processStatus{{PID: 3555, Version: "2.6.12-1+deb12u4"}, {PID: 3001, Reloads: 1, Version: "2.6.12-1+deb12u4"}},
		LastReload: "registration: upstream up_web added",
		ConfigID:   "c0ffee-1",
		Leaf:       &certStatus{Serial: "3A4B", NotAfter: "Dec  6 08:58:35 2026 GMT", SAN: "URI:spiffe://td.consul/ns/default/dc/dc1/svc/client"},
		Roots: []certStatus{
			{Serial: "2212E2E9E7DF94D6D245BD99D142B90FC4515B0C", NotAfter: "Dec  5 08:58:35 2026 GMT", Subject: "/CN=root1"},
			{Serial: "5CA791A3EDACBD30E221FA69900FD4E32B9B9635", NotAfter: "Dec  5 08:58:35 2026 GMT", Subject: "/CN=root2"},
		},
		Upstreams: []upstreamStatus{{Backend: "up_web", Used: 3, Free: 1, Slots: []slotStatus{
			{Slot: "s1", Instance: "web-1", Address: "10.0.0.1:21000", State: "ready", Weight: 1, Check: "no check", Sessions: 3},
			{Slot: "s2", Instance: "?", Address: "10.0.0.2:21000", State: "drain", Weight: 5, Check: "DRAIN", Sessions: 1},
			{Slot: "s3", State: "maint", Weight: 1, Check: "MAINT"},
			// Config maintenance ("disabled") alone, after "state ready", serves.
			{Slot: "s4", Instance: "web-4", Address: "[fd00::7]:21000", State: "ready", Weight: 1, Check: "no check"},
		}}},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("report (-want +got):\n%s", diff)
	}

	var b bytes.Buffer
	if err := writeStatusText(&b, got); err != nil {
		t.Fatal(err)
	}
	wantText := `state dir    /s
master       pid 2596, haproxy 2.6.12-1+deb12u4, reloads 2 (failed 0)
workers      3555 (current), 3001 (old, reloads since: 1)
last reload  registration: upstream up_web added
config id    c0ffee-1
leaf         serial 3A4B, expires Dec  6 08:58:35 2026 GMT
roots        serial 2212E2E9E7DF94D6D245BD99D142B90FC4515B0C, /CN=root1, expires Dec  5 08:58:35 2026 GMT
             serial 5CA791A3EDACBD30E221FA69900FD4E32B9B9635, /CN=root2, expires Dec  5 08:58:35 2026 GMT

upstream up_web: 3 used, 1 free of 4 slots
  SLOT  INSTANCE  ADDRESS          STATE  WEIGHT  CHECK     SESSIONS
  s1    web-1     10.0.0.1:21000   ready  1       no check  3
  s2    ?         10.0.0.2:21000   drain  5       DRAIN     1
  s3    -         -                maint  1       MAINT     0
  s4    web-4     [fd00::7]:21000  ready  1       no check  0
`
	if diff := cmp.Diff(wantText, b.String()); diff != "" {
		t.Errorf("text (-want +got):\n%s", diff)
	}
}

// TestBuildStatusErrors: a reply that is an error, or that its parser does
// not recognise, is named in Errors; the rest of the report stands.
func TestBuildStatusErrors(t *testing.T) {
	unknownMap := &runtime.ReplyError{Command: "@1 show map /s/state.map", Reply: "Unknown map identifier. Please use #<id> or <file>.", Err: runtime.ErrNoSuchMap}
	tests := []struct {
		name    string
		rs      runtime.Results
		errs    []string
		upCount int
	}{
		{"state map not loaded (an HAProxy from an older version)", func() runtime.Results {
			rs := results(replyProc, replyServers, replyStats, replyInstances, "", replyLeaf, caFile262)
			rs[4].Err = unknownMap
			return rs
		}(), []string{"state map: @1 show map /s/state.map: no such map"}, 1},
		{"garbled replies", results("master 1", "2\n", "x", "0x1 up_web/s1 web@nowhere\n", "nonsense", "Filename: /s/leaf.pem\n", "# filename\n"), []string{
			"show proc: unrecognized reply",
			"state map: unrecognized reply",
			"leaf certificate: unrecognized reply",
			"CA roots: unrecognized reply",
			"show stat: unrecognized reply",
			"show servers state: unrecognized reply",
		}, 0},
		{"an instance map value not written by the sidecar", results(replyProc, replyServers, replyStats, strings.Replace(replyInstances, "web-1@10.0.0.1:21000", "web-1", 1), replyState, replyLeaf, caFile262), []string{
			"instance map entry up_web/s1: instance map value \"web-1\": no '@'",
		}, 1},
		{"batch cut short", results(replyProc), []string{"instance map: not executed", "state map: not executed", "leaf certificate: not executed", "CA roots: not executed", "show stat: not executed", "show servers state: not executed"}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := buildStatus("/s", tt.rs)
			if len(r.Errors) != len(tt.errs) {
				t.Fatalf("errors %q, want %d like %q", r.Errors, len(tt.errs), tt.errs)
			}
			for i, want := range tt.errs {
				if !strings.HasPrefix(r.Errors[i], want) {
					t.Errorf("error %d %q, want it to start with %q", i, r.Errors[i], want)
				}
			}
			if len(r.Upstreams) != tt.upCount {
				t.Errorf("%d upstreams, want %d", len(r.Upstreams), tt.upCount)
			}
		})
	}
}

func TestStatusUsage(t *testing.T) {
	var out, errOut bytes.Buffer
	for _, args := range [][]string{nil, {"-state-dir"}, {"-state-dir", "/x", "extra"}, {"-nope"}} {
		out.Reset()
		errOut.Reset()
		if code := statusMain(args, &out, &errOut); code != 2 {
			t.Errorf("status %q: exit %d, want 2 (stderr %q)", args, code, errOut.String())
		}
	}
	dir := t.TempDir()
	if code := statusMain([]string{"-state-dir", dir}, &out, &errOut); code != 1 || !strings.Contains(errOut.String(), "no master socket at "+dir+"/master.sock") {
		t.Errorf("no master: exit %d, stderr %q", code, errOut.String())
	}
}
