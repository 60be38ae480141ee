# kvmckpt: build, set-up and tests. `make demo` and `make test` each do all
# the set-up they need on a fresh Debian bookworm machine (as root).

GO        ?= go
BUILD     := build
# Kernel flavours the test bed boots: FLAVOUR=DEBIAN-PACKAGE (see scripts/deps.sh).
KERNELS   ?= amd64=linux-image-6.1.0-47-amd64-unsigned cloud-amd64=linux-image-6.1.0-47-cloud-amd64-unsigned \
             6.12-amd64=linux-image-6.12.118+deb12-amd64-unsigned 6.12-cloud-amd64=linux-image-6.12.118+deb12-cloud-amd64-unsigned
# Go test flags; `make test TESTFLAGS=-short` skips everything that boots a guest.
TESTFLAGS ?=
FUZZTIME  ?= 5s

# kvmckpt's cache (kernels, emulators, profiles), for the scripts as for the
# Go code (internal/cachedir): $KVMCKPT_CACHE, else $XDG_CACHE_HOME/kvmckpt,
# else ~/.cache/kvmckpt.
KVMCKPT_CACHE ?= $(or $(filter /%,$(XDG_CACHE_HOME)),$(HOME)/.cache)/kvmckpt
export KVMCKPT_CACHE := $(abspath $(KVMCKPT_CACHE))
export KVMCKPT_INITRAMFS := $(abspath $(BUILD)/initramfs.cpio.gz)

.PHONY: all deps build initramfs test vet fuzz demo bench bench-live bench-squeeze bench-incremental bench-limit bench-s3 bench-sweep clean matrix

all: build

# Host packages, the guest kernels and the guest initramfs.
deps:
	@scripts/deps.sh $(KERNELS)
	@$(MAKE) --no-print-directory initramfs

build:
	$(GO) build -o $(BUILD)/kvmckpt ./cmd/kvmckpt

$(BUILD)/workload: $(shell find internal/workload -name '*.go') go.mod
	CGO_ENABLED=0 $(GO) build -trimpath -o $@ ./internal/workload

# The guest process the core tests read (C, static, with debug info for
# gdb on the host).
$(BUILD)/coretarget: internal/coretarget/coretarget.c
	@mkdir -p $(BUILD)
	gcc -static -pthread -g -O0 -fno-omit-frame-pointer -Wall -o $@ $<

$(BUILD)/initramfs.cpio.gz: $(BUILD)/workload $(BUILD)/coretarget internal/workload/initramfs/init scripts/initramfs.sh
	scripts/initramfs.sh $(BUILD)/workload $@ $(BUILD)/coretarget

initramfs: $(BUILD)/initramfs.cpio.gz

vet:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed: $$out"; exit 1; fi
	$(GO) vet ./...

test: deps initramfs vet
	@FUZZTIME=$(FUZZTIME) GO=$(GO) scripts/fuzz.sh
	@rm -f $(BUILD)/test-matrix.jsonl
	$(GO) test -count=1 -timeout 45m $(TESTFLAGS) ./...
	@scripts/leftovers.sh
	@$(GO) run ./internal/matrix 2>/dev/null || true

# The README's table of tested QEMU and kernel versions, from the last
# `make test`.
matrix:
	$(GO) run ./internal/matrix -readme README.md

fuzz:
	@FUZZTIME=$(FUZZTIME) GO=$(GO) scripts/fuzz.sh

demo: deps initramfs build
	$(GO) run ./internal/demo

# Go benchmarks (no VM), then kvmckpt against QEMU's own save on a real
# guest, then live saves (bench-live). BENCHFLAGS go to the second, e.g.
# BENCHFLAGS="-mem 4096 -reps 5".
BENCHFLAGS ?=
bench: deps build
	$(GO) test -run '^$$' -bench . -benchmem ./pagemap ./pagehash ./writer ./introspect ./profiles ./checkpoint
	$(GO) run ./internal/bench -kvmckpt $(BUILD)/kvmckpt -png bench-results/bench.png $(BENCHFLAGS)
	$(GO) run ./internal/bench -live -kvmckpt $(BUILD)/kvmckpt $(LIVEFLAGS)
	$(GO) run ./internal/bench -squeeze -kvmckpt $(BUILD)/kvmckpt $(SQUEEZEFLAGS)
	$(GO) run ./internal/bench -incremental -kvmckpt $(BUILD)/kvmckpt $(INCRFLAGS)

# Live saves only (guests writing memory at 0, 10, 50, 200 MiB/s);
# LIVEFLAGS go to internal/bench, e.g. LIVEFLAGS="-reps 3".
LIVEFLAGS ?=
bench-live: deps build
	$(GO) run ./internal/bench -live -kvmckpt $(BUILD)/kvmckpt $(LIVEFLAGS)

# A guest with a page cache saved with and without --squeeze, and by
# QEMU's own save; SQUEEZEFLAGS go to internal/bench.
bench-squeeze: deps build
	$(GO) run ./internal/bench -squeeze -kvmckpt $(BUILD)/kvmckpt $(SQUEEZEFLAGS)

# Incremental saves (--parent) against whole ones, 1, 10 and 50% of the
# pages in use rewritten; INCRFLAGS go to internal/bench.
bench-incremental: deps build
	$(GO) run ./internal/bench -incremental -kvmckpt $(BUILD)/kvmckpt $(INCRFLAGS)

# Stop-and-copy saves of the default guest against the disk's and
# memory's limits, alternated with a kvmckpt built from OLD (a git
# revision: the last one before the pipeline work); LIMITFLAGS go to
# internal/bench.
OLD ?= b9e5213
LIMITFLAGS ?=
bench-limit: deps build
	rm -rf $(BUILD)/old-src && mkdir -p $(BUILD)/old-src
	git archive $(OLD) | tar -x -C $(BUILD)/old-src
	cd $(BUILD)/old-src && $(GO) build -o ../kvmckpt-old ./cmd/kvmckpt
	$(GO) run ./internal/bench -limit -old $(BUILD)/kvmckpt-old -kvmckpt $(BUILD)/kvmckpt $(LIMITFLAGS)

# Saves to a local file and to a local S3 store (SeaweedFS), alternated,
# each restored from where it went.
S3FLAGS ?=
bench-s3: deps build
	$(GO) run ./internal/bench -s3 -kvmckpt $(BUILD)/kvmckpt $(S3FLAGS)

bench-sweep: deps build
	$(GO) run ./internal/bench -sweep -kvmckpt $(BUILD)/kvmckpt $(BENCHFLAGS)

clean:
	rm -rf $(BUILD)
