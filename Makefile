# Tianshu for Python. `make demo` and `make test` need only Python 3.11+: no Docker, no Postgres
# (an embedded one is started when none is configured), no uv (pip fetches the one uv.lock names).
# See `make help`.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
# uv.lock pins every package, uv included: `make venv` bootstraps that uv with the venv's pip, then
# `uv sync --locked` installs exactly the lock (and fails when pyproject.toml and the lock disagree).
UV_VERSION := $(shell sed -n '/^name = "uv"$$/{n;s/^version = "\(.*\)"$$/\1/p;}' uv.lock)
# Touched after a successful install; reinstall when pyproject.toml or uv.lock is newer.
STAMP := $(VENV)/.tianshu-dev-installed

.PHONY: help venv lock test lint lock-check typecheck pytest demo dev bench bench-compare bench-big fuzz chaos clean

help:
	@echo "make demo           run the approval demo (embedded Postgres unless TIANSHU_DATABASE_URL is set)"
	@echo "make dev            the service stack here (NATS, Postgres, scheduler, tool runner) until Ctrl-C"
	@echo "make test           lint, type-check and run the test suite"
	@echo "make lint           ruff check, and uv.lock agrees with pyproject.toml"
	@echo "make typecheck      mypy (strict; configured in pyproject.toml)"
	@echo "make bench          run the benchmarks (bench/run bench)"
	@echo "make bench-compare  compare against the stored baseline (bench/run compare)"
	@echo "make bench-big      B1 and B2 beside a million ended cases, against empty tables (bench/run big)"
	@echo "make fuzz           fuzz the bus: FUZZ_EXAMPLES bad messages (500), FUZZ_SEED to replay a run"
	@echo "make chaos          kill and restart everything while CHAOS_CASES cases (300) run for CHAOS_DURATION_S (180)"
	@echo "make venv           create $(VENV) and install the project with its dev extras from uv.lock"
	@echo "make lock           update uv.lock after changing pyproject.toml (uv lock)"
	@echo "make lock-check     fail when pyproject.toml and uv.lock disagree (part of make lint)"
	@echo "make clean          remove caches and build output (keeps $(VENV))"

venv: $(STAMP)

$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --extra dev --quiet
	@touch $@

# The venv and the uv that the lock names, from PyPI through pip: all that needs no uv yet.
$(UV):
	@test -x $(BIN)/python || { \
		$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ needed: make PYTHON=python3.11")' \
		&& $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check 'uv==$(UV_VERSION)'

# After a change to pyproject.toml: resolve again, keeping the locked versions that still fit
# (`$(UV) lock --upgrade-package NAME` moves one on).
lock: | $(UV)
	$(UV) lock

lint: venv lock-check
	$(BIN)/ruff check .

lock-check: | $(UV)
	$(UV) lock --check

typecheck: venv
	$(BIN)/mypy

# pytest exits 5 when it collects nothing; that is a failure here, not a quiet success.
pytest: venv
	@status=0; $(BIN)/python -m pytest || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make: pytest collected no tests" >&2; fi; \
	exit $$status

# --keep-going: one run reports lint, type and test failures together; any failure fails `test`.
test: venv
	@time $(MAKE) --no-print-directory --keep-going lint typecheck pytest

demo: venv
	$(BIN)/python examples/approval_demo.py

# The service stack here: NATS and Postgres (embedded unless TIANSHU_NATS_URL/TIANSHU_DATABASE_URL
# are set), a scheduler and a tool runner; Ctrl-C stops it.
dev: venv
	$(BIN)/tianshu dev

# The venv goes first on PATH so that bench/run finds its `python`.
bench: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bench/run bench

bench-compare: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bench/run compare

# B7's table-size part loads a million cases first (a few minutes), so it has a target of its own.
bench-big: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bench/run big

# tests/fuzz_bus.py: bad messages on every subject the services consume must be refused on their
# first delivery, and good cases among them must finish. It prints the seed; FUZZ_SEED replays it.
FUZZ_EXAMPLES ?= 500
FUZZ_SEED ?=
fuzz: venv
	$(BIN)/python -m tests.fuzz_bus --examples $(FUZZ_EXAMPLES) $(if $(FUZZ_SEED),--seed $(FUZZ_SEED))

# tests/chaos.py: scheduler replicas and tool runners SIGKILLed, NATS restarted, Postgres backends
# terminated and Postgres stopped and started, at random, while cases run; it fails on a lost case
# or a completed step run again. It prints the seed; CHAOS_SEED replays the same plan.
CHAOS_CASES ?= 300
CHAOS_DURATION_S ?= 180
CHAOS_SEED ?=
chaos: venv
	$(BIN)/python -m tests.chaos --cases $(CHAOS_CASES) --duration-s $(CHAOS_DURATION_S) \
		$(if $(CHAOS_SEED),--seed $(CHAOS_SEED))

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -type d -print0 \
		| xargs -0 rm -rf
