package churn

import (
	"context"
	"fmt"
	"math"
	"strconv"
	"strings"

	"github.com/haproxy-connect/haproxy-connect/cmd/meshbench/internal/bench"
)

// agg is one contender's rounds for one plan.
type agg struct {
	p50, p99, max, base99, diff bench.Rounds
	reloadsPer1k                bench.Rounds
	ok, failed                  int64
	firstErr                    error
	load50, load99              bench.Rounds // the steady load's requests, from due to answer
	unseen, changes             int
	pollIntervals, rates        bench.Rounds
	writeP99                    bench.Rounds
	baseUnseen                  int
	share50, share99            bench.Rounds
	proof50, proof99            bench.Rounds
	cpuPer1k                    bench.Rounds // contender CPU seconds per 1000 changes
	pollCost                    bench.Rounds // observer: contender CPU seconds per poll
	p999                        bench.Rounds
	// adds and removes apart: p50, p99, and p99 − Consul's p99 of the
	// same kind in the same pass
	adds, removes kindRounds
}

// kindRounds are one kind of change's figures over the rounds.
type kindRounds struct{ p50, p99, diff bench.Rounds }

func (k *kindRounds) add(lat, base bench.Samples) {
	if len(lat) == 0 {
		return
	}
	k.p50 = append(k.p50, lat.Percentile(50))
	k.p99 = append(k.p99, lat.Percentile(99))
	k.diff = append(k.diff, lat.Percentile(99)-base.Percentile(99))
}

// note is the kind's figures for a note: p50, p99 and, where Consul's
// same-kind p99 was measured alongside, the difference to it.
func (k kindRounds) note(alone bool) string {
	if len(k.p99) == 0 {
		return "none seen"
	}
	s := fmt.Sprintf("p50 %s, p99 %s", k.p50.Format(bench.Dur), k.p99.Format(bench.Dur))
	if !alone {
		s += fmt.Sprintf(" (%s over Consul's)", k.diff.Format(bench.SignedDur))
	}
	return s
}

func (a *agg) add(r result) {
	p99, b99 := r.lat.Percentile(99), r.base.Percentile(99)
	a.p50 = append(a.p50, r.lat.Percentile(50))
	a.p99 = append(a.p99, p99)
	a.max = append(a.max, r.lat.Max())
	a.base99 = append(a.base99, b99)
	a.diff = append(a.diff, p99-b99)
	if r.reloads >= 0 && r.changes > 0 {
		a.reloadsPer1k = append(a.reloadsPer1k, float64(r.reloads)*1000/float64(r.changes))
	}
	a.ok += r.load.OK
	a.failed += r.load.Failed
	if a.firstErr == nil {
		a.firstErr = r.load.FirstErr
	}
	if len(r.load.Lat) > 0 {
		a.load50 = append(a.load50, r.load.Lat.Percentile(50))
		a.load99 = append(a.load99, r.load.Lat.Percentile(99))
	}
	a.unseen += r.unseen
	a.changes += r.changes
	if r.pollInterval > 0 {
		a.pollIntervals = append(a.pollIntervals, r.pollInterval.Seconds())
	}
	if r.rate > 0 {
		a.rates = append(a.rates, r.rate)
	}
	a.writeP99 = append(a.writeP99, r.writeDurations.Percentile(99))
	a.baseUnseen += r.baseUnseen
	if r.cpu >= 0 && r.changes > 0 {
		a.cpuPer1k = append(a.cpuPer1k, r.cpu.Seconds()/float64(r.changes)*1000)
	}
	if r.pollCost > 0 {
		a.pollCost = append(a.pollCost, r.pollCost)
	}
	a.adds.add(r.latAdd, r.baseAdd)
	a.removes.add(r.latRemove, r.baseRemove)
	// p99.9 only where a pass has the samples for it (1000 or more).
	if len(r.lat) >= 1000 {
		a.p999 = append(a.p999, r.lat.Percentile(99.9))
	}
	if !math.IsNaN(r.share99) {
		a.share50 = append(a.share50, r.share50)
		a.share99 = append(a.share99, r.share99)
	}
	if !math.IsNaN(r.proof99) {
		a.proof50 = append(a.proof50, r.proof50)
		a.proof99 = append(a.proof99, r.proof99)
	}
}

// failedOf is a "failed / requests" cell.
func failedOf(failed, requests int64) string {
	return fmt.Sprintf("%d / %d", failed, requests)
}

// report adds the section of one plan; the first one carries the method.
func (cb *workload) report(p plan, first bool, contenders []*contender, res map[string]*agg) {
	b := cb.b
	s := b.Report.Add("Churn propagation, "+p.name,
		"Contender", "p50", "p99", "p99.9", "max", "Consul p99 (same pass)", "p99 ÷ Consul p99", "p99 − Consul p99",
		"p99 ÷ haproxy-connect p99", "reloads / 1000 changes", "CPU s / 1000 changes", "failed / requests", "never in effect")
	hc := res[nameHC]
	var polls, rates, errs, kinds, loads []string
	for _, c := range contenders {
		a := res[c.name]
		if a == nil {
			continue
		}
		vsHC := "—"
		if hc != nil && c.name != nameHC {
			vsHC = bench.PerRound(a.p99, hc.p99).Format(bench.X)
		}
		reloads := "—"
		if len(a.reloadsPer1k) > 0 {
			reloads = a.reloadsPer1k.Format(bench.Num)
		}
		name := c.name
		base99, vsBase, diff, failed := a.base99.Format(bench.Dur), bench.PerRound(a.p99, a.base99).Format(bench.X), a.diff.Format(bench.SignedDur), failedOf(a.failed, a.ok+a.failed)
		p999, cpu := "—", "—"
		if len(a.p999) > 0 {
			p999 = a.p999.Format(bench.Dur)
		}
		if len(a.cpuPer1k) > 0 {
			cpu = a.cpuPer1k.Format(func(v float64) string { return fmt.Sprintf("%.2f", v) })
		}
		switch {
		case c.alone:
			name += " (health/connect/api, no contender running)"
			base99, vsBase, diff, failed = "—", "—", "—", "—"
		}
		s.Row(name, a.p50.Format(bench.Dur), a.p99.Format(bench.Dur), p999, a.max.Format(bench.Dur), base99, vsBase, diff, vsHC, reloads,
			cpu, failed, fmt.Sprintf("%d / %d", a.unseen, a.changes))
		kinds = append(kinds, fmt.Sprintf("%s: adds %s; removes %s", c.name, a.adds.note(c.alone), a.removes.note(c.alone)))
		if len(a.pollIntervals) > 0 {
			poll := fmt.Sprintf("%s: one poll per %s", c.name, a.pollIntervals.Format(bench.Dur))
			if len(a.pollCost) > 0 && a.pollIntervals.Median() > 0 {
				poll += fmt.Sprintf(", a poll costing it %s of CPU, so the observer takes about %.0f %% of one CPU from it",
					a.pollCost.Format(bench.Dur), 100*a.pollCost.Median()/a.pollIntervals.Median())
			}
			polls = append(polls, poll)
		}
		if len(a.rates) > 0 {
			rates = append(rates, fmt.Sprintf("%s %s (write p99 %s)", c.name, a.rates.Format(bench.Num), a.writeP99.Format(bench.Dur)))
		}
		if len(a.load99) > 0 {
			loads = append(loads, fmt.Sprintf("%s: p50 %s, p99 %s", c.name, a.load50.Format(bench.Dur), a.load99.Format(bench.Dur)))
		}
		if a.firstErr != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", c.name, a.firstErr))
		}
		if a.baseUnseen > 0 {
			errs = append(errs, fmt.Sprintf("%s pass: %d changes never seen by the Consul watch", c.name, a.baseUnseen))
		}
	}
	if hc, alone := res[nameHC], res[nameAlone]; hc != nil && alone != nil && len(hc.p99) == len(alone.p99) {
		var d bench.Rounds
		for i := range hc.p99 {
			d = append(d, hc.p99[i]-alone.p99[i])
		}
		s.Note("haproxy-connect p99 − Consul-alone p99 (each round's two passes): %s. The in-pass Consul p99 is the limit under the same load (haproxy-connect's own watch and work share the two CPUs with it); Consul alone is its notification with nothing else running.", d.Format(bench.SignedDur))
	}
	if p.rate > 0 {
		s.Note("What: %d changes at %g changes/s, adds and removes alternating, with %d churn endpoints live besides the base instance (each lives %d changes). Median of %d round(s), (min–max); ratios are paired within each round.",
			p.changes, p.rate, p.window, 2*p.window, b.Rounds)
		if p.flip {
			s.Note("Check flips: the %d churn endpoints of the ring stay registered through the pass, each with its check critical until its add, which registers it again with the check passing; a remove turns the check critical again. That is how a new instance enters (registered with its checks critical until the first run, which Consul staggers over the check's interval) and how a failing one leaves; between flips every contender's source lists it as not passing. The other churn sections register and deregister instead. The ring is listed before the starting state; the measured changes start once the contender has made no identity proof for 500 ms (haproxy-connect proves instances ahead while their checks fail).", 2*p.window+1)
		}
	} else {
		s.Note("What: %d endpoints registered at once (%d concurrent writers), in effect, then all deregistered at once: %d changes. Median of %d round(s), (min–max); ratios are paired within each round.",
			p.changes, writers, 2*p.changes, b.Rounds)
	}
	s.Note("Observer (resolution and own cost, see below): %s.", strings.Join(polls, "; "))
	cb.targets(s, p, res)
	s.Note("Adds and removes apart, median (min–max) over rounds, each p99 also against Consul's own p99 of the same kind in the same pass: %s.", strings.Join(kinds, "; "))
	if len(loads) > 0 {
		s.Note("The steady load's requests (see Failed / requests), from when each was due to its answer, median (min–max) over rounds: %s.", strings.Join(loads, "; "))
	}
	var shares []string
	for _, c := range contenders {
		if a := res[c.name]; a != nil && len(a.share99) > 0 {
			share := fmt.Sprintf("%s: p50 ≤ %s (%s), p99 ≤ %s (%s)", c.name,
				bench.Dur(a.share50.Median()), a.share50.Format(bench.Dur), bench.Dur(a.share99.Median()), a.share99.Format(bench.Dur))
			if len(a.proof99) > 0 {
				share += fmt.Sprintf(", of which identity proofs p50 ≤ %s (%s), p99 ≤ %s (%s)",
					bench.Dur(a.proof50.Median()), a.proof50.Format(bench.Dur), bench.Dur(a.proof99.Median()), a.proof99.Format(bench.Dur))
			}
			shares = append(shares, share)
		}
	}
	if len(shares) > 0 {
		s.Note("Own share of propagation, from the sidecar's own histogram (haproxy_connect_endpoint_propagation_seconds: one sample per endpoint that joined or left the upstream: from the headers of the Consul answer that changed it arriving to HAProxy confirming the runtime batch that put it in or out of service), as the upper bound of the bucket holding the quantile (buckets 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 50 ms, ...), median (min–max) over rounds: %s. Identity proofs: haproxy_connect_upstream_verification_seconds, the sidecar's own connect and mTLS handshake to each new endpoint before it takes traffic (same buckets), one sample per proof; an added endpoint's share holds its proof; a removal waits for a new endpoint's proof only when no other endpoint of the upstream is proven (up to 1 s), which these passes, with the base instance always listed, never have. The rest of its latency is Consul's notification and the observation's resolution.", strings.Join(shares, "; "))
	}
	s.Note("Achieved write rate, changes/s (first to last acknowledgement): %s.", strings.Join(rates, "; "))
	if len(errs) > 0 {
		s.Note("First failures: %s.", strings.Join(errs, "; "))
	}
	switch {
	case p.rate == 0:
		s.Note("%s", dnsPayloadNote)
	case !first:
		s.Note("Method and setups: see the %s section.", "10 changes/s")
	}
	if !first {
		return
	}
	s.Note("Latency: first observation of a change in the contender's data plane minus the return of Consul's register/deregister call (the write acknowledgement). \"Consul p99\" is Consul's own notification: a blocking query on the health endpoint the contender reads (health/connect/api or health/service/api-plain, passing only), run during the same pass and timestamped the same way; \"p99 − Consul p99\" is the per-round difference (the target for haproxy-connect, at 100 changes/s, is within 2 ms). Each notification carries the whole instance list (about 3 KB per connect instance, 300 KB at 100 live), so every blocking watcher costs Consul CPU: the baseline watch is one more watcher in every pass (kept light: no gzip, which Consul otherwise applies to every answer Go's client asks for, and only address and port decoded), and a contender's own unthrottled watch (haproxy-connect's) doubles what Consul serves in its pass; consul-template paces its queries, HAProxy DNS asks the DNS interface instead.")
	s.Note("Resolution and observer: HAProxy contenders are observed by polling `show servers state <backend>` on a worker-level stats socket added for the benchmark (`stats socket ... level user`; for haproxy-connect through a wrapper of its -haproxy-bin that adds a configuration fragment with that line, its own configuration unchanged), one poll every %s, or, when a poll takes longer than half of that, a pause as long as the poll; the master socket, which haproxy-connect steers HAProxy with, is not used during the measured changes (only `show proc` before and after them, for the reload count). An endpoint is in effect when a server not in maintenance has its address and port, and each observation is timestamped when its reply has been read: a latency is an upper bound, by up to one poll interval; while a reload replaces the worker, polls fail and are retried, which lengthens consul-template's intervals. The observer's own cost is calibrated in every pass, once the starting state is in effect and before the measured changes: %d polls back to back, divided into the contender's CPU time over them (its whole process trees, as for CPU s / 1000 changes, which includes the observer's polls).", bench.PollPeriod, calibrationPolls)
	s.Note("CPU s / 1000 changes: user + system CPU seconds of the contender's whole process trees (haproxy-connect: controller, HAProxy master and workers; consul-template: consul-template, its reload scripts, and HAProxy; DNS SRV: HAProxy), from /proc/<pid>/stat, between the first measured write and the end state, per 1000 changes; this includes serving the steady load and answering the observer. p99.9 is shown where a pass has 1000 samples or more. Ratios are paired within each round (each round runs every contender's pass of a plan back to back), then the median (min–max) over rounds is shown.")
	s.Note("Writes: in a rate pass, each write is issued at its scheduled time without waiting for the previous one (up to %d in flight; writes to one endpoint stay in order), as independent instances would; in a burst, %d writers back to back. Endpoints are written with the catalog API, each on a node of its own, as instances on other hosts (which a client's agent never holds): the acknowledgement is the catalog commit. On the one local agent instead, each connect-proxy registration started the agent's per-proxy machinery (proxycfg): 51 against 201 plain registrations/s here, a cost only the mTLS contenders would have paid.", writers, writers)
	s.Note("Failed / requests: a steady load of %d GET/s, each on a new connection (no keep-alive), through the contender's upstream port during each whole measured pass (all rounds summed). The schedule is open: each request is sent when due, whether or not the ones before it were answered (a request that takes 5 s fails), and its time counts from when it was due, so a stall shows in the load's latencies (noted under each table) instead of thinning the requests (no coordinated omission). Deregistered endpoints keep serving (as an instance that deregisters before it stops), so a failure means the data plane sent a request nowhere. \"Never in effect\": changes not observed before the same endpoint's next change of the same kind or before the pass ended (all rounds summed); they are left out of the latencies.", loadRate)
	s.Note("Consul's built-in proxy is not in this comparison: it resolves the upstream with a health query on every new connection and picks a passing instance at random, so it has no moment at which a change is in effect beyond Consul's own answer, and the earlier figure (the first connection that happened to land on a new endpoint) was mostly the wait for such a landing. Its per-connection cost shows in the data path workload instead (new conn rows).")
	s.Note("Consul: two agents, as deployed. The churn endpoints (instances on other hosts) are written to a server (a dev agent); every contender, the baseline watch, the DNS queries and the local registrations (the api server and its sidecar, and each client with its sidecar) use a client agent joined to it, the host's own agent. A client's registration exists only during its contender's passes: for each connect-proxy registration with an upstream, the agent runs a proxy-config watch of that upstream whether or not any proxy consumes it, and Consul's cost for it lands in every pass it is registered in (two of them took the baseline p99 at 100 changes/s from about 25 ms to 85 ms when checked by hand). A dev agent alone would also indent every JSON answer (twice the bytes) and run those watches against its own state store, hashing every result on each change: 42 %% of its CPU in a profile at 100 changes/s.")
	s.Note("Fairness: haproxy-connect serves \"api\" over mTLS: its endpoints are connect-proxy registrations, each a relay to the real api server sidecar. consul-template and DNS SRV have no mTLS, so they serve \"api-plain\": plain registrations, each a relay to the plain HTTP app. Same number of endpoints, same schedule, same check passing from the start; only the data plane differs. Every endpoint has its own loopback address (127.1.x.y or 127.2.x.y), as instances on separate hosts would: HAProxy 2.6 left the third of three SRV records sharing one target name (Consul names the target after the address) in maintenance without an address.")
	var cfgs []string
	for _, c := range contenders {
		cfgs = append(cfgs, fmt.Sprintf("%s: %s", c.name, c.config))
	}
	s.Note("Setups: %s. Consul: two agents for the whole workload (a dev server and a client agent joined to it, see above), the client's DNS interface on a loopback port with the default dns_config (allow_stale, no TTLs, no cache). Contenders run one at a time, each started fresh for every pass; within a round the passes of one plan run back to back, in an order rotated every round and mirrored from one plan to the next.", strings.Join(cfgs, "; "))
}

// dnsPayloadNote explains what Consul's DNS answer can carry.
const dnsPayloadNote = "DNS SRV: one UDP answer is all HAProxy reads (2.6 has no TCP fallback here). Consul answers the SRV query for `_api-plain._tcp.service.consul` with one SRV and one A record per instance and trims the answer to the requester's EDNS size without setting TC; at accepted_payload_size 65535 that was 996 instances when checked by hand (at the default 512: 3), so in a burst of 1000 some endpoints may never be in effect for DNS (the \"never in effect\" column says how many were in this run)."

// endurance is the haproxy-connect check: enduranceChanges changes at
// enduranceRate per second with zero reloads and zero failed requests. One
// run, not rounds: 20 s if Consul keeps up.
func (cb *workload) endurance(ctx context.Context) error {
	c := cb.haproxyConnect()
	changes := enduranceChanges
	if cb.b.Quick {
		changes /= 10 // a smoke run of the same pass
	}
	cb.b.Logf("churn: endurance, %d changes at %d/s through %s", changes, enduranceRate, c.name)
	if err := c.Start(ctx); err != nil {
		return err
	}
	defer c.Stop()
	p := plan{name: "endurance", rate: enduranceRate, changes: changes, window: enduranceWindow}
	r, err := cb.pass(ctx, c, p)
	if err != nil {
		return fmt.Errorf("endurance: %w", err)
	}
	s := cb.b.Report.Add(fmt.Sprintf("Churn endurance: haproxy-connect, %d changes at %d changes/s", changes, enduranceRate),
		"p50", "p99", "p99.9", "max", "Consul p99 (same pass)", "p99 − Consul p99", "reloads", "CPU s / 1000 changes", "failed / requests", "request p99 (from due)", "never in effect")
	cpu := "—"
	if r.cpu >= 0 && r.changes > 0 {
		cpu = fmt.Sprintf("%.2f", r.cpu.Seconds()/float64(r.changes)*1000)
	}
	s.Row(bench.Dur(r.lat.Percentile(50)), bench.Dur(r.lat.Percentile(99)), bench.Dur(r.lat.Percentile(99.9)), bench.Dur(r.lat.Max()), bench.Dur(r.base.Percentile(99)),
		bench.SignedDur(r.lat.Percentile(99)-r.base.Percentile(99)), strconv.Itoa(r.reloads), cpu, failedOf(r.load.Failed, r.load.OK+r.load.Failed),
		bench.Dur(r.load.Lat.Percentile(99)), fmt.Sprintf("%d / %d", r.unseen, r.changes))
	verdict := "met"
	if r.reloads != 0 || r.load.Failed != 0 {
		verdict = fmt.Sprintf("missed: %d reloads, %d failed requests", r.reloads, r.load.Failed)
	}
	if r.rate < 0.95*enduranceRate {
		// What was sustained is what Consul took, not the schedule.
		verdict += fmt.Sprintf(" at the %s changes/s Consul took, not %d", bench.Num(r.rate), enduranceRate)
	}
	s.Note("One run, not rounds: the rate pass above at %d changes/s (the issue's sustained 1 000 changes/s) and %d changes long (%d churn endpoints live, adds and removes alternating), with a fresh client sidecar and the same steady load (%d GET/s, a new connection each). Achieved write rate %s changes/s (below the schedule when Consul cannot take the writes that fast); mean poll interval %s. Target: zero reloads and zero failed requests: %s.",
		enduranceRate, changes, p.window, loadRate, bench.Num(r.rate), bench.Dur(r.pollInterval.Seconds()), verdict)
	var add, remove kindRounds
	add.add(r.latAdd, r.baseAdd)
	remove.add(r.latRemove, r.baseRemove)
	s.Note("Adds and removes apart, each p99 also against Consul's own p99 of the same kind in the same pass: adds %s; removes %s.", add.note(false), remove.note(false))
	if len(r.load.Lat) > 0 {
		s.Note("The steady load's requests, from when each was due to its answer: p50 %s, p99 %s, max %s.", bench.Dur(r.load.Lat.Percentile(50)), bench.Dur(r.load.Lat.Percentile(99)), bench.Dur(r.load.Lat.Max()))
	}
	if r.load.FirstErr != nil {
		s.Note("First failed request: %v.", r.load.FirstErr)
	}
	if r.baseUnseen > 0 {
		s.Note("%d changes were never seen by the Consul watch.", r.baseUnseen)
	}
	return nil
}

// targets adds the targets that this plan measures, each met or
// missed by how much, from per-round pairs of this run.
func (cb *workload) targets(s *bench.Section, p plan, res map[string]*agg) {
	hc := res[nameHC]
	if hc == nil {
		return
	}
	var out []string
	switch {
	case p.rate == 100:
		out = append(out, "haproxy-connect p99 − Consul p99 (same pass): "+bench.Target(hc.diff.Median(), 0.001, bench.SignedDur))
		if alone := res[nameAlone]; alone != nil {
			d := bench.DiffRounds(hc.p99, alone.p99)
			out = append(out, "against Consul alone: "+bench.Target(d.Median(), 0.001, bench.SignedDur))
		}
	case p.rate == 0:
		out = append(out, "haproxy-connect p99 ÷ Consul p99 (same pass) "+bench.TargetRatio(bench.PerRound(hc.p99, hc.base99).Median(), 1.5))
		if dns := res[nameDNSTuned]; dns != nil {
			out = append(out, "haproxy-connect p99 ÷ DNS SRV (tuned timers) p99 "+bench.TargetRatio(bench.PerRound(hc.p99, dns.p99).Median(), 1))
		}
	}
	if len(out) > 0 {
		s.Note("Targets (medians of per-round figures of this run): %s.", strings.Join(out, "; "))
	}
}
