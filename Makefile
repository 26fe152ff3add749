# Kiln developer entry points (DESIGN.md §1c). Every target installs what it
# needs first, so each works on a fresh Debian machine.
SHELL := /bin/bash
CARGO ?= cargo
CARGO_TARGET_DIR ?= $(CURDIR)/target
export CARGO_TARGET_DIR
GUEST_DIR := $(CARGO_TARGET_DIR)/guest

.PHONY: deps build guest run test bench clean

deps:
	./scripts/setup-host.sh

build: deps
	$(CARGO) build --release -p kilnd

guest: deps
	./guest/build-image.sh "$(GUEST_DIR)"

run: build guest
	./scripts/run-dev.sh

test: deps guest
	./scripts/test.sh

# QUICK=1 for a short run.
bench: build guest
	python3 -m pip install --quiet --disable-pip-version-check jeepney
	python3 tests/bench/run.py

clean:
	$(CARGO) clean
