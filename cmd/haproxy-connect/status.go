package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/haproxy-connect/haproxy-connect/bootstrap"
	"github.com/haproxy-connect/haproxy-connect/controller"
	"github.com/haproxy-connect/haproxy-connect/runtime"
)

// "haproxy-connect status -state-dir <dir>" prints what HAProxy serves,
// read from the master socket alone, so it answers the same whether the
// controller runs or not: per upstream each slot with the Consul instance
// it serves (the instance map), its state, weight, check and sessions; the
// leaf and the roots HAProxy holds; the master, its workers and reloads,
// and the last reload's reason (the state map). It takes no lock and
// changes nothing: every command it sends is a "show".

// statusReport is what status prints; -json prints it as is.
type statusReport struct {
	StateDir   string           `json:"state_dir"`
	Master     processStatus    `json:"master"`
	Workers    []processStatus  `json:"workers"`
	LastReload string           `json:"last_reload_reason"`
	ConfigID   string           `json:"config_id,omitempty"`
	Leaf       *certStatus      `json:"leaf,omitempty"`
	Roots      []certStatus     `json:"roots,omitempty"`
	Upstreams  []upstreamStatus `json:"upstreams"`
	// Errors lists what could not be read or was not understood; the
	// rest of the report stands.
	Errors []string `json:"errors,omitempty"`
}

type processStatus struct {
	PID     int    `json:"pid"`
	Reloads int    `json:"reloads"` // master: reloads so far; worker: reloads it has lived through (0: current)
	Failed  int    `json:"failed_reloads,omitempty"`
	Version string `json:"version"`
}

type certStatus struct {
	Serial   string `json:"serial"`
	NotAfter string `json:"not_after"`
	Subject  string `json:"subject,omitempty"`
	SAN      string `json:"san,omitempty"`
}

type upstreamStatus struct {
	Backend string       `json:"backend"`
	Used    int          `json:"used"`
	Free    int          `json:"free"`
	Slots   []slotStatus `json:"slots"`
}

type slotStatus struct {
	Slot     string `json:"slot"`
	Instance string `json:"instance,omitempty"` // Consul instance ID, "?" for one not shown to HAProxy
	Address  string `json:"address,omitempty"`  // the instance's address:port
	State    string `json:"state"`              // ready, drain or maint (free)
	Weight   int    `json:"weight"`
	Check    string `json:"check"` // show stat's status: UP, DOWN, MAINT, "no check", ...
	Sessions uint64 `json:"sessions"`
}

// statusFiles are the files of the state directory status asks HAProxy
// about, by the names the controller gives them.
type statusFiles struct{ leaf, roots, instances, state string }

func filesIn(dir string) statusFiles {
	return statusFiles{
		leaf:      filepath.Join(dir, "leaf.pem"),
		roots:     filepath.Join(dir, "roots.pem"),
		instances: filepath.Join(dir, controller.InstanceMapFile),
		state:     filepath.Join(dir, controller.StateMapFile),
	}
}

// statusCommands is the one batch status sends: the master's process
// list, and the worker's servers, statistics, maps and certificates.
func statusCommands(f statusFiles) ([]runtime.Command, error) {
	servers, err := runtime.ShowServersState("")
	if err != nil {
		return nil, err
	}
	cmds := []runtime.Command{runtime.ShowProc(), servers, runtime.ShowServerStats()}
	for _, build := range []func() (runtime.Command, error){
		func() (runtime.Command, error) { return runtime.ShowMap(f.instances) },
		func() (runtime.Command, error) { return runtime.ShowMap(f.state) },
		func() (runtime.Command, error) { return runtime.ShowSSLCert(f.leaf) },
		func() (runtime.Command, error) { return runtime.ShowSSLCAFile(f.roots) },
	} {
		c, err := build()
		if err != nil {
			return nil, err
		}
		cmds = append(cmds, c)
	}
	return cmds, nil
}

// buildStatus assembles the report from the batch's results, in
// statusCommands' order. Every reply is parsed by its runtime parser; one
// that fails is an entry of Errors, and the report goes on without it.
func buildStatus(dir string, rs runtime.Results) statusReport {
	r := statusReport{StateDir: dir, Workers: []processStatus{}, Upstreams: []upstreamStatus{}}
	fail := func(what string, err error) { r.Errors = append(r.Errors, fmt.Sprintf("%s: %v", what, err)) }
	reply := func(i int, what string) (string, bool) {
		if i >= len(rs) {
			fail(what, runtime.ErrNotExecuted)
			return "", false
		}
		if rs[i].Err != nil {
			fail(what, rs[i].Err)
			return "", false
		}
		return rs[i].Reply, true
	}

	if text, ok := reply(0, "show proc"); ok {
		if pl, err := runtime.ParseProcList(text); err != nil {
			fail("show proc", err)
		} else {
			r.Master = processStatus{PID: pl.Master.PID, Reloads: pl.Master.Reloads, Failed: pl.Master.Failed, Version: pl.Master.Version}
			for _, w := range pl.Workers {
				r.Workers = append(r.Workers, processStatus{PID: w.PID, Reloads: w.Reloads, Version: w.Version})
			}
		}
	}

	// Instances by "<backend>/<slot>".
	instances := map[string]string{}
	if text, ok := reply(3, "instance map"); ok {
		if entries, err := runtime.ParseMap(text); err != nil {
			fail("instance map", err)
		} else {
			for _, e := range entries {
				instances[e.Key] = e.Value
			}
		}
	}
	if text, ok := reply(4, "state map"); ok {
		if entries, err := runtime.ParseMap(text); err != nil {
			fail("state map", err)
		} else {
			for _, e := range entries {
				switch e.Key {
				case bootstrap.StateReasonKey:
					reason, err := bootstrap.DecodeToken(e.Value)
					if err != nil {
						fail("state map", err)
					}
					r.LastReload = reason
				case bootstrap.StateConfigIDKey:
					r.ConfigID = e.Value
				}
			}
		}
	}
	if text, ok := reply(5, "leaf certificate"); ok {
		if ci, err := runtime.ParseCertInfo(text); err != nil {
			fail("leaf certificate", err)
		} else {
			r.Leaf = &certStatus{Serial: ci.Serial, NotAfter: ci.NotAfter, Subject: ci.Subject, SAN: ci.SAN}
		}
	}
	if text, ok := reply(6, "CA roots"); ok {
		if ca, err := runtime.ParseCAFile(text); err != nil {
			fail("CA roots", err)
		} else {
			for _, c := range ca.Certs {
				r.Roots = append(r.Roots, certStatus{Serial: c.Serial, NotAfter: c.NotAfter, Subject: c.Subject, SAN: c.SAN})
			}
		}
	}

	type key struct{ backend, server string }
	stats := map[key]runtime.ServerStat{}
	if text, ok := reply(2, "show stat"); ok {
		if ss, err := runtime.ParseServerStats(text); err != nil {
			fail("show stat", err)
		} else {
			for _, s := range ss {
				stats[key{s.Backend, s.Server}] = s
			}
		}
	}
	text, ok := reply(1, "show servers state")
	if !ok {
		return r
	}
	servers, err := runtime.ParseServersState(text)
	if err != nil {
		fail("show servers state", err)
		return r
	}
	byBackend := map[string]int{} // index in r.Upstreams
	for _, s := range servers {
		if s.Backend == bootstrap.LocalBackend || s.Backend == bootstrap.SPOEBackend {
			continue
		}
		i, seen := byBackend[s.Backend]
		if !seen {
			i = len(r.Upstreams)
			byBackend[s.Backend] = i
			r.Upstreams = append(r.Upstreams, upstreamStatus{Backend: s.Backend})
		}
		u := &r.Upstreams[i]
		st := stats[key{s.Backend, s.Name}]
		sl := slotStatus{Slot: s.Name, State: "ready", Weight: s.Weight, Check: st.Status, Sessions: st.Sessions}
		switch {
		case s.Maint():
			sl.State = "maint"
			u.Free++
		case s.Drain():
			sl.State = "drain"
			u.Used++
		default:
			u.Used++
		}
		if v, ok := instances[bootstrap.InstanceKey(s.Backend, s.Name)]; ok {
			id, addr, free, err := bootstrap.ParseInstanceValue(v)
			switch {
			case err != nil:
				fail("instance map entry "+bootstrap.InstanceKey(s.Backend, s.Name), err)
			case !free:
				sl.Instance, sl.Address = id, addr.String()
			}
		} else if len(instances) > 0 {
			fail("instance map", fmt.Errorf("no entry for %s", bootstrap.InstanceKey(s.Backend, s.Name)))
		}
		u.Slots = append(u.Slots, sl)
	}
	return r
}

// writeStatusText prints the report for a person, columns aligned.
func writeStatusText(w io.Writer, r statusReport) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	dash := func(s string) string {
		if s == "" {
			return "-"
		}
		return s
	}
	fmt.Fprintf(tw, "state dir\t%s\n", r.StateDir)
	if r.Master.PID != 0 {
		fmt.Fprintf(tw, "master\tpid %d, haproxy %s, reloads %d (failed %d)\n", r.Master.PID, r.Master.Version, r.Master.Reloads, r.Master.Failed)
		var ws []string
		for _, p := range r.Workers {
			if p.Reloads == 0 {
				ws = append(ws, fmt.Sprintf("%d (current)", p.PID))
			} else {
				ws = append(ws, fmt.Sprintf("%d (old, reloads since: %d)", p.PID, p.Reloads))
			}
		}
		fmt.Fprintf(tw, "workers\t%s\n", dash(strings.Join(ws, ", ")))
	}
	fmt.Fprintf(tw, "last reload\t%s\n", dash(r.LastReload))
	if r.ConfigID != "" {
		fmt.Fprintf(tw, "config id\t%s\n", r.ConfigID)
	}
	if r.Leaf != nil {
		fmt.Fprintf(tw, "leaf\tserial %s, expires %s\n", r.Leaf.Serial, r.Leaf.NotAfter)
	}
	for i, c := range r.Roots {
		label := ""
		if i == 0 {
			label = "roots"
		}
		fmt.Fprintf(tw, "%s\tserial %s, %s, expires %s\n", label, c.Serial, dash(c.Subject), c.NotAfter)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, u := range r.Upstreams {
		fmt.Fprintf(w, "\nupstream %s: %d used, %d free of %d slots\n", u.Backend, u.Used, u.Free, len(u.Slots))
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "  SLOT\tINSTANCE\tADDRESS\tSTATE\tWEIGHT\tCHECK\tSESSIONS")
		for _, s := range u.Slots {
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%d\t%s\t%d\n", s.Slot, dash(s.Instance), dash(s.Address), s.State, s.Weight, dash(s.Check), s.Sessions)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	for _, e := range r.Errors {
		if _, err := fmt.Fprintf(w, "\nerror: %s", e); err != nil {
			return err
		}
	}
	if len(r.Errors) > 0 {
		fmt.Fprintln(w)
	}
	return nil
}

// statusMain runs "status" with args (after the word "status") and returns
// the exit code: 0, 1 when HAProxy cannot be asked or part of the report
// could not be read (what could is printed, with the errors), 2 for bad
// usage.
func statusMain(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("haproxy-connect status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("state-dir", "", "the sidecar's state directory (its master socket is <state-dir>/master.sock)")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	timeout := fs.Duration("timeout", 5*time.Second, "how long to wait for HAProxy")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *dir == "" || fs.NArg() > 0 {
		fmt.Fprintln(stderr, "usage: haproxy-connect status -state-dir <dir> [-json]")
		return 2
	}
	abs, err := filepath.Abs(*dir)
	if err != nil {
		fmt.Fprintln(stderr, "haproxy-connect status:", err)
		return 2
	}
	sock := filepath.Join(abs, "master.sock")
	if _, err := os.Stat(sock); err != nil {
		fmt.Fprintf(stderr, "haproxy-connect status: no master socket at %s: no HAProxy runs on this state dir (%v)\n", sock, err)
		return 1
	}
	cmds, err := statusCommands(filesIn(abs))
	if err != nil {
		// A path outside what HAProxy may be sent (input.Path).
		fmt.Fprintln(stderr, "haproxy-connect status: state dir:", err)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	rt := runtime.New(sock, nil, runtime.WithTimeout(*timeout))
	defer rt.Close()
	rs, err := rt.Exec(ctx, cmds...)
	if err != nil {
		if errors.Is(err, runtime.ErrMasterUnreachable) {
			fmt.Fprintf(stderr, "haproxy-connect status: HAProxy's master does not answer on %s: %v\n", sock, err)
		} else {
			fmt.Fprintln(stderr, "haproxy-connect status:", err)
		}
		return 1
	}
	r := buildStatus(abs, rs)
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		err = enc.Encode(r)
	} else {
		err = writeStatusText(stdout, r)
	}
	if err != nil {
		fmt.Fprintln(stderr, "haproxy-connect status:", err)
		return 1
	}
	if len(r.Errors) > 0 {
		return 1
	}
	return 0
}
