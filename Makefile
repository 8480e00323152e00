# haproxy-connect. `make test` is what CI runs; it installs what it needs.
SHELL := /bin/bash
GO    ?= go
# A built consul is kept outside the work tree too, keyed by the hash of its
# module, so a fresh clone on a warm machine does not rebuild it.
CONSUL_CACHE ?= $(HOME)/.cache/haproxy-connect
CONSUL_KEY    = $(shell cat testenv/consulbin/go.mod testenv/consulbin/go.sum testenv/consulbin/main.go | sha256sum | cut -c1-16)
# A count, not a duration: with a duration, Go 1.26's fuzz coordinator can
# report its own stop as "context deadline exceeded" (golang/go#75804, fixed
# in 1.27), which failed CI once with no failing input. Per target: -fuzz
# takes one. The seeds (zones, newlines, ';', quotes, non-ASCII) also run
# in every plain go test.
FUZZTIME     ?= 20000x
CONSUL_TEMPLATE_VERSION ?= v0.41.3
ROUNDS       ?= 3

.PHONY: all build deps packages consul consul-template bench-deps test test-slow lint bench demo clean

all: build

build:
	$(GO) build -o bin/haproxy-connect ./cmd/haproxy-connect
	$(GO) build -o bin/demo ./cmd/demo

# A local mesh: consul, two apps, two haproxy-connect sidecars. Ctrl-C stops it.
demo: deps build
	bin/demo -consul-bin bin/consul -sidecar-bin bin/haproxy-connect

deps: packages consul

# haproxy and socat from Debian when missing (we are root on CI machines).
packages:
	@missing=""; \
	command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	command -v socat   >/dev/null 2>&1 || missing="$$missing socat"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@$$(command -v haproxy || echo /usr/sbin/haproxy) -v | head -1

# bin/consul from the github.com/hashicorp/consul module (not in Debian).
# About 10 minutes cold on 2 cores, then seconds.
consul:
	@mkdir -p bin $(CONSUL_CACHE); \
	cached=$(CONSUL_CACHE)/consul-$(CONSUL_KEY); \
	if [ -x bin/consul ] && cmp -s bin/consul $$cached; then exit 0; fi; \
	if [ ! -x $$cached ]; then \
		echo "building consul (first time: about 10 minutes)"; \
		(cd testenv/consulbin && $(GO) build -trimpath -ldflags='-s -w' -o $$cached.tmp .) && mv $$cached.tmp $$cached || exit 1; \
	fi; \
	cp $$cached bin/consul; bin/consul version | head -1

# consul-template for the benchmark's consul-template + reload contender.
consul-template:
	@mkdir -p bin $(CONSUL_CACHE); \
	cached=$(CONSUL_CACHE)/consul-template-$(CONSUL_TEMPLATE_VERSION); \
	if [ ! -x $$cached ]; then \
		echo "building consul-template $(CONSUL_TEMPLATE_VERSION)"; \
		GOBIN=$(CONSUL_CACHE)/ct.tmp $(GO) install -trimpath -ldflags='-s -w' github.com/hashicorp/consul-template@$(CONSUL_TEMPLATE_VERSION) \
			&& mv $(CONSUL_CACHE)/ct.tmp/consul-template $$cached || exit 1; \
	fi; \
	cmp -s $$cached bin/consul-template || cp $$cached bin/consul-template

bench-deps: deps consul-template
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }

# Benchmarks side by side (cmd/meshbench); writes BENCHMARKS.md.
bench: bench-deps build
	$(GO) build -o bin/meshbench ./cmd/meshbench
	bin/meshbench -rounds $(ROUNDS) -md BENCHMARKS.md

test: deps
	$(GO) vet ./...
	$(GO) test -count=1 ./...
	$(GO) test -count=1 -race ./runtime/... ./controller/... ./spoa/... ./watch/... ./authzgen/... ./tcpdeny/...
	$(GO) test ./input -run '^$$' -fuzz '^FuzzAddr$$' -fuzztime $(FUZZTIME)
	$(GO) test ./input -run '^$$' -fuzz '^FuzzDNSName$$' -fuzztime $(FUZZTIME)
	$(GO) test ./runtime -run '^$$' -fuzz '^FuzzCommands$$' -fuzztime $(FUZZTIME)
	$(GO) test ./runtime -run '^$$' -fuzz '^FuzzSocatLine$$' -fuzztime $(FUZZTIME)
	$(GO) test ./runtime -run '^$$' -fuzz '^FuzzParseReplies$$' -fuzztime $(FUZZTIME)
	$(GO) test ./runtime -run '^$$' -fuzz '^FuzzParseSessions$$' -fuzztime $(FUZZTIME)
	$(GO) test ./controller -run '^$$' -fuzz '^FuzzParseRegistration$$' -fuzztime $(FUZZTIME)
	$(GO) test ./controller -run '^$$' -fuzz '^FuzzRegistrationPaths$$' -fuzztime $(FUZZTIME)
	$(GO) test ./controller -run '^$$' -fuzz '^FuzzHealthParse$$' -fuzztime $(FUZZTIME)
	$(GO) test ./bootstrap -run '^$$' -fuzz '^FuzzRender$$' -fuzztime $(FUZZTIME)
	$(GO) test ./bootstrap -run '^$$' -fuzz '^FuzzToken$$' -fuzztime $(FUZZTIME)
	$(GO) test ./chain -run '^$$' -fuzz '^FuzzCompile$$' -fuzztime $(FUZZTIME)
	$(GO) test ./spoa -run '^$$' -fuzz '^FuzzSPOPDecode$$' -fuzztime $(FUZZTIME)
	$(GO) test ./spoa -run '^$$' -fuzz '^FuzzParseLeaf$$' -fuzztime $(FUZZTIME)
	$(GO) test ./l7 -run '^$$' -fuzz '^FuzzParseDecide$$' -fuzztime $(FUZZTIME)
	$(GO) test ./l7 -run '^$$' -fuzz '^FuzzCompile$$' -fuzztime $(FUZZTIME)
	$(GO) test ./slots -run '^$$' -fuzz '^FuzzPlan$$' -fuzztime $(FUZZTIME)

# Tests too slow for every run: a leaf renewal with a realistic TTL
# (about 10 minutes).
test-slow: deps
	HC_SLOW_TESTS=1 $(GO) test -count=1 -timeout 30m -run 'TestLeafRenewal' -v ./cmd/haproxy-connect/

lint:
	$(GO) vet ./...
	$(GO) mod tidy -diff
	$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...

clean:
	rm -rf bin
