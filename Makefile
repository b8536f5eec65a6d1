# dpwatch: the two commands a fresh Debian 12 machine needs (as root) are `make run` and
# `make test`. Both set up first (deploy/setup.sh is idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
LISTEN ?= 0.0.0.0:9400
PYTEST_ARGS ?=

.PHONY: setup setup-test setup-bench run check test test-unit test-kernel test-e2e test-incidents test-kernels bench clean

setup:
	bash deploy/setup.sh

setup-test:
	bash deploy/setup.sh --test

run: setup
	$(VENV)/bin/dpwatch run --listen $(LISTEN)

check: setup
	$(VENV)/bin/dpwatch check

# The whole suite: unit, kernel (real BPF), end-to-end (the real daemon, real traffic) and the
# incident library (reproduced node incidents: the right top finding, in time).
test: setup-test
	$(PYTEST) -v -rs --durations=15 $(PYTEST_ARGS) tests/unit tests/kernel tests/e2e tests/incidents

test-incidents: setup-test
	$(PYTEST) -v -rs $(PYTEST_ARGS) tests/incidents

test-unit: setup-test
	$(PYTEST) -v $(PYTEST_ARGS) tests/unit

test-kernel: setup-test
	$(PYTEST) -v -rs $(PYTEST_ARGS) tests/kernel

test-e2e: setup-test
	$(PYTEST) -v -rs $(PYTEST_ARGS) tests/e2e

# The kernel and e2e tiers again, inside Debian's own 6.1 kernel (kprobes on) under qemu, with
# the incidents marked `guest` (a full conntrack table: the kprobe mode there; the veth peer
# read and listen drops on 6.1 are covered by tests/e2e; each daemon start compiles for ~35 s
# under emulation, so not all incidents):
# tests/vm/run_guest.py installs qemu and the guest kernel, builds its initrd, boots, runs
# pytest against this checkout, streams the output and returns pytest's exit status.
GUEST_KERNEL ?= auto
GUEST_TIMEOUT ?= 4200
test-kernels: setup-test
	/usr/bin/python3 tests/vm/run_guest.py --kernel-version $(GUEST_KERNEL) --timeout $(GUEST_TIMEOUT) \
	  --env DPWATCH_EXPECT_KPROBES=1 --env DPWATCH_INCIDENT_TIME_FACTOR=4 --env PYTEST_ADDOPTS="--timeout=1500 -p no:cacheprovider" \
	  -- $(PYTEST) -v -rs --durations=10 $(PYTEST_ARGS) tests/kernel tests/e2e tests/incidents \
	     -m "not host_only and (not incident or guest)" \
	     --ignore=tests/e2e/test_bench_smoke.py  # speed under emulation means nothing

# The overhead benchmark (about 6 minutes; bench/README.md). BENCH_ARGS=--smoke for the
# under-a-minute check the test suite also runs. A full run's report goes to
# bench/results/latest.md; BENCHMARKS.md holds the committed one.
BENCH_ARGS ?=
setup-bench:
	bash deploy/setup.sh --bench

bench: setup-bench
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
