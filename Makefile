# Kiln developer entry points (DESIGN.md §1c). Every target installs what it
# needs first, so each works on a fresh Debian machine.
SHELL := /bin/bash
CARGO ?= cargo
CARGO_TARGET_DIR ?= $(CURDIR)/target
export CARGO_TARGET_DIR
GUEST_DIR := $(CARGO_TARGET_DIR)/guest

.PHONY: deps build guest run test bench packages system-test clean

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
