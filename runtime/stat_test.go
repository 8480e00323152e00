package runtime

import (
	"errors"
	"os"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseServerStats(t *testing.T) {
	// Captured from haproxy 2.6.12: "@1 show stat -1 4 -1" after one
	// request to b_bad/s1, whose server certificate is from another CA,
	// and one to b_imp/s1 and t_imp/s1, whose responses a rule denied.
	real, err := os.ReadFile("testdata/show_stat_2.6.12.csv")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		text    string
		want    []ServerStat
		wantErr bool
	}{
		{"haproxy 2.6.12", string(real), []ServerStat{
			{Backend: "b_web", Server: "s1", Addr: "127.0.0.1:19443", Status: "no check"},
			{Backend: "b_imp", Server: "s1", Addr: "127.0.0.1:19444", Status: "no check", DeniedResponses: 1},
			{Backend: "b_bad", Server: "s1", Addr: "127.0.0.1:19445", Status: "no check", ConnErrors: 1, HandshakeFailures: 4},
			{Backend: "b_bad", Server: "s2", Addr: "127.0.0.1:19446", Status: "no check"},
			{Backend: "t_imp", Server: "s1", Addr: "127.0.0.1:19444", Status: "no check", DeniedResponses: 1},
			{Backend: "t_web", Server: "s1", Addr: "127.0.0.1:19443", Status: "no check"},
		}, false},
		{"columns in another order, frontend rows skipped",
			"# addr,svname,pxname,econ,scur,status,check_status\n,FRONTEND,f,,,,\n[::1]:80,s2,up_web,7,12,UP,L4OK\n", []ServerStat{
				{Backend: "up_web", Server: "s2", Addr: "[::1]:80", ConnErrors: 7, Sessions: 12, Status: "UP", CheckStatus: "L4OK"},
			}, false},
		{"a quoted field with commas and quotes; a short row; values that repeat",
			"# pxname,svname,addr,econ,status,check_desc\nb,s1,10.0.0.1:1,0,UP,\"Layer4 \"\"x,y\"\"\"\nb,s2,10.0.0.2:1,3,UP\nb,BACKEND,,,UP,\n", []ServerStat{
				{Backend: "b", Server: "s1", Addr: "10.0.0.1:1", Status: "UP"},
				{Backend: "b", Server: "s2", Addr: "10.0.0.2:1", ConnErrors: 3, Status: "UP"},
			}, false},
		{"a row without its address", "# pxname,svname,econ,addr\nb,s1,0,1.2.3.4:5\nb,s2,0\n", nil, true},
		{"an unterminated quote", "# pxname,svname,econ,addr\nb,\"s1,0,1.2.3.4:5\n", nil, true},
		{"a header alone", "# pxname,svname,econ,addr\n", nil, false},
		{"sessions not a number", "# pxname,svname,econ,addr,scur\nb,s1,0,1.2.3.4:5,many\n", nil, true},
		{"no econ column", "# pxname,svname,addr\nb,s1,1.2.3.4:5\n", nil, true},
		{"not a number", "# pxname,svname,econ,addr\nb,s1,x,1.2.3.4:5\n", nil, true},
		{"an error sentence", "Unknown command.", nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseServerStats(tt.text)
			if tt.wantErr {
				if !errors.Is(err, ErrUnrecognizedReply) {
					t.Fatalf("err = %v, want ErrUnrecognizedReply", err)
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
