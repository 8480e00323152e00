package runtime

import (
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// caFile262 is "@1 show ssl ca-file <file>" on haproxy 2.6.12 for a file
// of two roots (the blank separators are a space, as 2.6 prints them).
const caFile262 = `Filename: /s/roots.pem
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
Subject Alternative Name: URI:spiffe://td
Algorithm: EC256
SHA1 FingerPrint: F7B9ED17452E336626CE490D1708755DB4C7DFFD
Subject: /CN=root2
Issuer: /CN=root2
`

func TestParseCAFile(t *testing.T) {
	tests := []struct {
		name string
		text string
		want CAFileInfo // zero: ErrUnrecognizedReply
	}{
		{"haproxy 2.6.12, two roots", caFile262, CAFileInfo{Filename: "/s/roots.pem", Status: "Used", Certs: []CertInfo{
			{Filename: "/s/roots.pem", Serial: "2212E2E9E7DF94D6D245BD99D142B90FC4515B0C", NotAfter: "Dec  5 08:58:35 2026 GMT", Subject: "/CN=root1", SHA1: "4355C4F76BBE9845874277BBCB0E5AF8A9BD7910"},
			{Filename: "/s/roots.pem", Serial: "5CA791A3EDACBD30E221FA69900FD4E32B9B9635", NotAfter: "Dec  5 08:58:35 2026 GMT", Subject: "/CN=root2", SAN: "URI:spiffe://td", SHA1: "F7B9ED17452E336626CE490D1708755DB4C7DFFD"},
		}}},
		{"no certificate", "Filename: /s/roots.pem\nStatus: Used\n", CAFileInfo{}},
		{"a certificate without serial", "Filename: /s/roots.pem\nCertificate #1:\nSubject: /CN=x\n", CAFileInfo{}},
		{"the list of files", "# filename\n/s/roots.pem - 2 certificate(s)\n", CAFileInfo{}},
		{"empty", "", CAFileInfo{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseCAFile(tt.text)
			if tt.want.Filename == "" {
				if !errors.Is(err, ErrUnrecognizedReply) {
					t.Fatalf("got %+v, %v; want ErrUnrecognizedReply", got, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestParseMap(t *testing.T) {
	tests := []struct {
		name    string
		text    string
		want    []MapEntry
		wantErr bool
	}{
		// Captured from haproxy 2.6.12.
		{"instances", "0x55a427d38c50 up_web/s1 -\n0x55a427d38ce0 up_web/s2 web-1@10.0.0.1:21000\n0x7fc440046d40 up_db/s1 db-7@[fd00::7]:21000\n",
			[]MapEntry{{"up_web/s1", "-"}, {"up_web/s2", "web-1@10.0.0.1:21000"}, {"up_db/s1", "db-7@[fd00::7]:21000"}}, false},
		{"a value with spaces is the rest of the line", "0x1 k a b\n", []MapEntry{{"k", "a b"}}, false},
		{"empty map", "", nil, false},
		{"no value", "0x1 key\n", nil, true},
		{"not a pointer", "up_web/s1 -\n", nil, true},
		{"an error sentence", "Unknown map identifier. Please use #<id> or <file>.", nil, true},
		{"the list of maps", "# id (file) description\n0 (/s/state.map) pattern loaded\n", nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseMap(tt.text)
			if tt.wantErr {
				if !errors.Is(err, ErrUnrecognizedReply) {
					t.Fatalf("got %+v, %v; want ErrUnrecognizedReply", got, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestMapCommands(t *testing.T) {
	tests := []struct {
		name string
		cmd  func() (Command, error)
		want string // "" for refused
	}{
		{"set", func() (Command, error) { return SetMap("/s/i.map", "up_web/s1", "web-1@10.0.0.1:21000") }, "@1 set map /s/i.map up_web/s1 web-1@10.0.0.1:21000"},
		{"add ipv6", func() (Command, error) { return AddMap("/s/i.map", "up_web/s9", "?@[fd00::7]:21000") }, "@1 add map /s/i.map up_web/s9 ?@[fd00::7]:21000"},
		{"show", func() (Command, error) { return ShowMap("/s/i.map") }, "@1 show map /s/i.map"},
		{"ca-file", func() (Command, error) { return ShowSSLCAFile("/s/roots.pem") }, "@1 show ssl ca-file /s/roots.pem"},
		{"value with a space", func() (Command, error) { return SetMap("/s/i.map", "k", "a b") }, ""},
		{"value with a comment", func() (Command, error) { return SetMap("/s/i.map", "k", "a#b") }, ""},
		{"value with a command", func() (Command, error) { return AddMap("/s/i.map", "k", "a;@1 reload") }, ""},
		{"value too long", func() (Command, error) { return SetMap("/s/i.map", "k", strings.Repeat("a", 513)) }, ""},
		{"empty value", func() (Command, error) { return SetMap("/s/i.map", "k", "") }, ""},
		{"key with @", func() (Command, error) { return SetMap("/s/i.map", "k@x", "v") }, ""},
		{"relative map", func() (Command, error) { return ShowMap("i.map") }, ""},
		{"ca-file with a space", func() (Command, error) { return ShowSSLCAFile("/s/roots.pem x") }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := tt.cmd()
			if tt.want == "" {
				if !errors.Is(err, ErrInvalidArgument) {
					t.Fatalf("got %q, %v; want ErrInvalidArgument", c.String(), err)
				}
				return
			}
			if err != nil || c.String() != tt.want {
				t.Fatalf("got %q, %v; want %q", c.String(), err, tt.want)
			}
		})
	}
}

// FuzzParseReplies: every parser of a "show" reply either classifies the
// reply as ErrUnrecognizedReply or returns values that hold together; none
// panics.
func FuzzParseReplies(f *testing.F) {
	f.Add(caFile262)
	f.Add("0x55a427d38c50 up_web/s1 -\n0x55a427d38ce0 up_web/s2 web-1@10.0.0.1:21000\n")
	f.Add("#<PID> <type> <reloads> <uptime> <version>\n2596 master 2 [failed: 1] 0d00h01m52s 2.6.12\n# workers\n3555 worker 1 0d 2.6.12\n")
	f.Add("1\n# be_id be_name\n3 up_web 1 s1 10.0.0.1 2 0 1 1 7 6 3 4 6 0 0 0 - 21000 - 0 0 - - 0\n")
	f.Add("# pxname,svname,scur,econ,status,addr\nup_web,s1,3,0,UP,10.0.0.1:21000\n")
	f.Add("# pxname,svname,addr,econ,check_desc\nb,s1,10.0.0.1:1,0,\"a,\"\"b\"\nb,FRONTEND,,,\nb,s2\n")
	f.Add("Filename: /s/leaf.pem\nSerial: 01\n")
	for _, h := range hostile {
		f.Add(h)
	}
	f.Fuzz(func(t *testing.T, text string) {
		check := func(what string, err error) {
			if err != nil && !errors.Is(err, ErrUnrecognizedReply) {
				t.Fatalf("%s: error %v is not ErrUnrecognizedReply", what, err)
			}
		}
		m, err := ParseMap(text)
		check("ParseMap", err)
		for _, e := range m {
			if e.Key == "" || e.Value == "" || strings.ContainsAny(e.Key, " \n") || strings.Contains(e.Value, "\n") {
				t.Fatalf("ParseMap entry %+v", e)
			}
		}
		ca, err := ParseCAFile(text)
		check("ParseCAFile", err)
		if err == nil && (ca.Filename == "" || len(ca.Certs) == 0) {
			t.Fatalf("ParseCAFile accepted %+v", ca)
		}
		_, err = ParseServerStats(text)
		check("ParseServerStats", err)
		_, err = ParseProcList(text)
		check("ParseProcList", err)
		_, err = ParseServersState(text)
		check("ParseServersState", err)
		_, err = ParseCertInfo(text)
		check("ParseCertInfo", err)
	})
}
