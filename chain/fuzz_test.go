package chain

import (
	"encoding/json"
	"os"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
)

// FuzzCompile feeds arbitrary chain JSON to Compile. Whatever it accepts
// must be safe to write inside a single-quoted HAProxy word and a map
// entry: no string in the result carries a control byte, a quote, a byte
// outside printable ASCII or more than 1024 bytes; identifiers carry
// HAProxy's identifier alphabet only; weights sum to TotalWeight.
func FuzzCompile(f *testing.F) {
	for _, name := range []string{"default", "split", "full"} {
		b, err := os.ReadFile("testdata/" + name + ".json")
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
		s := string(b)
		// Seeds that reach the dangerous shapes: a newline, a quote, a
		// space, a '%', a huge value, in each kind of field.
		for _, r := range []struct{ old, new string }{
			{`"x-route": "admin"`, `"x-route": "admin\nhttp-request redirect location /"`},
			{`"x-route": "admin"`, `"x-route": "a'b"`},
			{`"x-route": "admin"`, `"x-route": "%[env(HOME)]"`},
			{`"PathPrefix": "/admin"`, `"PathPrefix": "/admin x"`},
			{`"PathPrefix": "/admin"`, `"PathPrefix": "/` + strings.Repeat("a", 5000) + `"`},
			{`"PathRegex": "/v2/.*"`, `"PathRegex": "/v2/'\n"`},
			{`"PathRegex": "/v2/.*"`, `"PathRegex": "(a+)+$"`},
			{`"Name": "x-debug"`, `"Name": "x debug"`},
			{`"FieldValue": "x-user"`, `"FieldValue": "x),src("`},
			{`"Exact": "1"`, `"Exact": "1\r\n@1 reload"`},
			{`"Weight": 90`, `"Weight": 1e30`},
			{`"Weight": 90`, `"Weight": -90`},
			{`"Service": "web"`, `"Service": "web;@1 reload"`},
			{`"Datacenter": "dc1"`, `"Datacenter": "dc1 x"`},
			{`"Filter": "Service.Tags contains v1"`, `"Filter": "Service.Tags contains v1\u0000"`},
			{`"ConnectTimeout": "3s"`, `"ConnectTimeout": "-3s"`},
			{`"ConnectTimeout": "3s"`, `"ConnectTimeout": "99999h"`},
			{`"RequestTimeout": "2s"`, `"RequestTimeout": "1ns"`},
			{`"PrefixRewrite": "/"`, `"PrefixRewrite": "/%[src]"`},
			{`"NumRetries": 3`, `"NumRetries": 4294967295`},
		} {
			if strings.Contains(s, r.old) {
				f.Add([]byte(strings.Replace(s, r.old, r.new, 1)))
			}
		}
	}
	ident := regexp.MustCompile(`^[A-Za-z0-9_.:-]{1,160}$`)
	f.Fuzz(func(t *testing.T, b []byte) {
		var c api.CompiledDiscoveryChain
		if json.Unmarshal(b, &c) != nil {
			return
		}
		got, err := Compile(&c)
		if err != nil {
			if strings.ContainsAny(err.Error(), "\n\r") {
				t.Fatalf("error spans lines: %q", err)
			}
			return
		}
		checkStrings(t, reflect.ValueOf(got), "Chain")
		names := map[string]bool{}
		for _, tg := range got.Targets {
			if !ident.MatchString(tg.Name) {
				t.Fatalf("target name %q", tg.Name)
			}
			names[tg.Name] = true
		}
		if len(got.Routes) == 0 || !got.Routes[len(got.Routes)-1].Match.IsZero() {
			t.Fatalf("no catch-all route: %+v", got.Routes)
		}
		for _, r := range got.Routes {
			sum := 0
			for _, s := range r.Splits {
				if s.Weight < 0 || !names[s.Target] {
					t.Fatalf("split %+v", s)
				}
				sum += s.Weight
			}
			if sum != TotalWeight {
				t.Fatalf("splits %+v sum to %d", r.Splits, sum)
			}
		}
		for _, tg := range got.Targets {
			for _, fo := range tg.Failover {
				if !names[fo] {
					t.Fatalf("failover %q of %s is no target", fo, tg.Name)
				}
			}
		}
	})
}

// checkStrings walks v and fails on any string that is not printable
// ASCII without quotes and backslash, or longer than 1024 bytes (the
// filter expression, sent only to Consul, may hold quotes).
func checkStrings(t *testing.T, v reflect.Value, path string) {
	switch v.Kind() {
	case reflect.String:
		s := v.String()
		if len(s) > 1024 {
			t.Fatalf("%s: %d bytes", path, len(s))
		}
		for i := 0; i < len(s); i++ {
			c := s[i]
			if c < 0x20 || c > 0x7e || c == '\'' || (c == '"' || c == '\\') && !strings.HasSuffix(path, ".Filter") && !strings.HasSuffix(path, ".PathRegex") && !strings.HasSuffix(path, ".Value") {
				t.Fatalf("%s: %q holds byte %#x", path, s, c)
			}
		}
	case reflect.Struct:
		for i := 0; i < v.NumField(); i++ {
			checkStrings(t, v.Field(i), path+"."+v.Type().Field(i).Name)
		}
	case reflect.Slice:
		for i := 0; i < v.Len(); i++ {
			checkStrings(t, v.Index(i), path)
		}
	}
}
