package spoa

import (
	"context"
	"fmt"
)

// The decision cache. Keys are (SPIFFE ID, serial): a renewed leaf is a new
// key. Allow and deny answers are both cached until Invalidate, which the
// intention watch calls on every change; errors are never cached, so the
// next connection asks again.
//
// Per-key single flight: the first miss starts one Decider call and later
// misses for the same key wait for it, so a burst of new connections from a
// new source costs one Consul call.
//
// Invalidate bumps a generation: a call that started before it still
// answers the connections that were waiting for it (they arrived under the
// old intentions) but its answer is not stored, and connections arriving
// after it start a new call instead of joining the old one. Without this, a
// call racing an intention change could store the old answer forever.
//
// Bound: at most cacheSize entries; inserting into a full cache evicts one
// arbitrary entry (Go's randomized map iteration). That costs one Consul
// call for the evicted key later and never a burst of them, which dropping
// the whole cache would.

// cacheKey is a client certificate: its URI SAN and serial (what Consul
// decides on) and its SHA-256 (so that a hit is for this very certificate).
type cacheKey struct {
	uri, serial string
	sum         [32]byte
}

type verdict struct {
	allowed bool
	reason  string
	// refused is the index in refusals of the reason the agent refused
	// the certificate itself, without asking Consul; -1 otherwise.
	refused int
	// l7: the intention that decided is L7 (a local decision; a Decider
	// answers allow or deny only). Kept with the verdict, so that the
	// connection is made L7 from the very intentions that decided it.
	l7 bool
	// l7Key names that intention's entries in HAProxy's L7 map (empty
	// when it has none).
	l7Key string
}

// origin says how a decision was reached.
type origin int

const (
	originCall      origin = iota // this connection's own Decider call
	originCache                   // a cached decision
	originCoalesced               // another connection's call in flight
)

type flight struct {
	gen  uint64        // the generation the call started under
	done chan struct{} // closed when v and err are set
	v    verdict
	err  error
}

// lookup returns the decision for r's certificate from the cache, from a
// call in flight, or from a new call, with the generation it was made
// under. A new call checks the certificate first (checkOnce): a refusal
// (see refusals) is the decision, cached without asking the Decider;
// another error leaves it undecided.
func (a *Authorizer) lookup(r rememberedCert) (verdict, origin, uint64, error) {
	k := cacheKey(r.id)
	a.mu.Lock()
	if v, ok := a.cache[k]; ok {
		gen := a.gen
		a.mu.Unlock()
		a.stats.cacheHits.Add(1)
		return v, originCache, gen, nil
	}
	how := originCoalesced
	f, ok := a.inflight[k]
	if !ok {
		how = originCall
		f = &flight{gen: a.gen, done: make(chan struct{})}
		a.inflight[k] = f
		gen := a.gen
		a.mu.Unlock()
		if a.decider == nil {
			// Local decisions take no call to time out: made on this
			// goroutine, without a hand-over to another one and back,
			// whose scheduling is most of a decision's tail latency.
			a.fly(k, f, gen, r)
		} else {
			go a.fly(k, f, gen, r)
		}
		<-f.done
		return f.v, how, f.gen, f.err
	}
	a.mu.Unlock()
	if how == originCoalesced {
		a.stats.coalesced.Add(1)
	}
	<-f.done
	return f.v, how, f.gen, f.err
}

type answer struct {
	v   verdict
	err error
}

// fly decides k under generation gen and completes f: checkOnce's refusal, or
// the Decider's answer or timeout, whichever comes first. The Decider may
// ignore ctx (api.Agent.ConnectAuthorize takes none): the call then runs on
// in its goroutine, and a late answer still fills the cache.
func (a *Authorizer) fly(k cacheKey, f *flight, gen uint64, r rememberedCert) {
	var ans answer
	if err := a.checkOnce(r); err != nil {
		ans.err = err
		if i := refusal(err); i >= 0 {
			ans = answer{v: verdict{reason: err.Error(), refused: i}}
			a.store(k, ans.v, gen)
		}
	} else if a.decider == nil {
		// Local: no call to wait for, no timeout to bound it.
		ans = a.decideLocal(r.svc)
		if ans.err == nil {
			a.store(k, ans.v, gen)
		}
	} else {
		ans = a.ask(k, gen)
	}
	if ans.err != nil {
		ans.v = verdict{refused: -1}
	}
	f.v, f.err = ans.v, ans.err
	a.mu.Lock()
	if a.inflight[k] == f {
		delete(a.inflight, k)
	}
	a.mu.Unlock()
	close(f.done)
}

// ask runs one Decider call for k and caches its answer under gen.
func (a *Authorizer) ask(k cacheKey, gen uint64) answer {
	// Closed: no new call. (The select below would otherwise pick at
	// random between a fast answer and the cancelled context.)
	if err := a.ctx.Err(); err != nil {
		return answer{err: fmt.Errorf("authorize %s: %w", k.uri, err)}
	}
	a.stats.consulCalls.Add(1)
	ctx, cancel := context.WithTimeout(a.ctx, a.timeout)
	defer cancel()
	ch := make(chan answer, 1)
	go func() {
		var ans answer
		defer func() {
			if r := recover(); r != nil {
				ans = answer{err: fmt.Errorf("authorize %s: decider panicked: %v", k.uri, r)}
			}
			ch <- ans
		}()
		allowed, reason, err := a.decider.Authorize(ctx, a.target, k.uri, k.serial)
		ans = answer{v: verdict{allowed: allowed, reason: reason, refused: -1}, err: err}
		if err == nil {
			a.store(k, ans.v, gen)
		}
	}()
	select {
	case ans := <-ch:
		return ans
	case <-ctx.Done():
		return answer{err: fmt.Errorf("authorize %s: %w", k.uri, ctx.Err())}
	}
}

// store caches v for k unless the cache was invalidated since gen.
func (a *Authorizer) store(k cacheKey, v verdict, gen uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if gen != a.gen {
		return
	}
	if _, ok := a.cache[k]; !ok && len(a.cache) >= a.cacheSize {
		for old := range a.cache {
			delete(a.cache, old)
			break
		}
	}
	a.cache[k] = v
}

// Invalidate drops every cached decision: the next connection from each
// source asks the Decider again. Calls in flight are not stored. The new
// generation goes to the hook given WithInvalidateHook, so that HAProxy
// re-checks connections authorized under an older one.
func (a *Authorizer) Invalidate() { a.invalidate(nil) }

// invalidate is Invalidate, running swap (if not nil) at the switch: after
// HAProxy has the new generation, under the lock that moves the agent to
// it. What swap publishes (new intentions) is then what every decision
// under the new generation reads, and no decision under the old one is
// made from it.
func (a *Authorizer) invalidate(swap func()) {
	a.invalidating.Lock() // one switch at a time: generations stay in order
	defer a.invalidating.Unlock()
	a.mu.Lock()
	gen := a.gen + 1
	a.mu.Unlock()
	// HAProxy learns the new generation first (every verdict under the
	// old one then counts as stale), and only then are decisions made
	// under it.
	if a.onInvalidate != nil {
		a.onInvalidate(gen)
	}
	a.mu.Lock()
	if swap != nil {
		swap()
	}
	a.gen = gen
	clear(a.cache)
	clear(a.inflight)
	a.mu.Unlock()
	a.stats.invalidations.Add(1)
	if a.onSwitch != nil {
		a.onSwitch(gen)
	}
}

// RaiseGeneration invalidates into a generation above floor, if the
// current one is not above it already. A sidecar that adopts a running
// HAProxy calls it with the generation HAProxy holds: every verdict made
// by the previous agent, under intentions this one never saw, then counts
// as stale, and no generation this agent publishes goes backwards.
func (a *Authorizer) RaiseGeneration(floor uint64) {
	a.invalidating.Lock()
	a.mu.Lock()
	raise := a.gen <= floor
	if raise {
		a.gen = floor // Invalidate moves it to floor+1
	}
	a.mu.Unlock()
	a.invalidating.Unlock()
	if raise {
		a.Invalidate()
	}
}

// Generation is the current intentions generation: 0 at start, plus one
// per Invalidate, or above the floor of a RaiseGeneration.
func (a *Authorizer) Generation() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.gen
}
