# Kiln developer entry points (DESIGN.md §1c). Every target installs what it
# needs first, so each works on a fresh Debian machine.
SHELL := /bin/bash
CARGO ?= cargo
CARGO_TARGET_DIR ?= $(CURDIR)/target
export CARGO_TARGET_DIR
GUEST_DIR := $(CARGO_TARGET_DIR)/guest

.PHONY: deps build guest run test stress bench packages system-test clean

deps:
	./scripts/setup-host.sh

build: deps
	$(CARGO) build --release -p kilnd -p kiln-shim

guest: deps
	./guest/build-image.sh "$(GUEST_DIR)"

run: build guest
	./scripts/run-dev.sh

test: deps guest
	./scripts/test.sh

# The reliability tests of docs/reliability.md, longer and harder than in
# `make test`: 100 kills of kilnd and of QEMUs, 100,000 mutated requests,
# 1,000 varlink + 200 D-Bus readers for two minutes, 10,000 cases per
# decoder property. Each size can be overridden on the command line.
KILN_STORM_KILLS ?= 100
KILN_FUZZ_CASES ?= 100000
KILN_LOAD_VARLINK ?= 1000
KILN_LOAD_DBUS ?= 200
KILN_LOAD_SECS ?= 120
PROPTEST_CASES ?= 10000
stress: deps guest
	KILN_STORM_KILLS=$(KILN_STORM_KILLS) KILN_FUZZ_CASES=$(KILN_FUZZ_CASES) \
	KILN_LOAD_VARLINK=$(KILN_LOAD_VARLINK) KILN_LOAD_DBUS=$(KILN_LOAD_DBUS) \
	KILN_LOAD_SECS=$(KILN_LOAD_SECS) PROPTEST_CASES=$(PROPTEST_CASES) \
	$(CARGO) nextest run --no-fail-fast --no-capture -p kilnd -p kiln-engine \
		-p kiln-dbus -E 'binary(crash_storm) | binary(load) | binary(fuzz_live) | binary(decoders) | (package(kiln-dbus) & test(/spec/))'

# deb, rpm and sysext image into $(CARGO_TARGET_DIR)/packages/ (docs/packaging.md).
packages: build guest
	./packaging/build.sh

# The packages under a real systemd in containers (tests/system/run.py);
# ONLY=deb,rpm,sysext picks flows. `make test` runs it too.
system-test: packages
	python3 tests/system/run.py $(if $(ONLY),--only $(ONLY))

# Benchmarks into $(CARGO_TARGET_DIR)/bench/: report.md, report.json and SVG
# plots, compared with tests/bench/baseline.json (warnings only); see
# docs/benchmarks.md. QUICK=1 for a short run (no libvirt peer);
# BENCH_SKIP_LIBVIRT=1 skips the libvirt peer of a full run.
bench: build guest
	python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore jeepney
	python3 tests/bench/run.py

clean:
	$(CARGO) clean
