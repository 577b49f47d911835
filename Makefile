# Everything a fresh machine needs: `make run` (service on the in-memory engine)
# and `make test` (lint, types, the whole suite). Each makes its own .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint typecheck pytest clean chromium curl bench bench-quick bench-deps kit

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

tests/js/node_modules/.package-lock.json: tests/js/package-lock.json
	npm ci --prefix tests/js --no-audit --no-fund --loglevel=error

# The browser client kit (clients/js): built with esbuild, types checked by tsc, unit
# tests on Node; the Python suite drives the built files (Chromium page, rehearsal).
clients/js/node_modules/.package-lock.json: clients/js/package-lock.json
	npm ci --prefix clients/js --no-audit --no-fund --loglevel=error

kit: clients/js/node_modules/.package-lock.json
	cd clients/js && node build.mjs && node node_modules/typescript/bin/tsc --noEmit -p tsconfig.json && node --test test/*.test.mjs

run: $(VENV)/.run-installed
	$(BIN)/dex-shim serve

lint: $(VENV)/.test-installed
	$(BIN)/ruff check shim legacy adapters tests loadtests
	$(BIN)/ruff format --check shim legacy adapters tests loadtests
	$(BIN)/lint-imports --no-cache
	$(BIN)/vulture
	$(BIN)/deptry .

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy

# The console's browser test drives Debian's Chromium (no browser download).
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# The unidirectional transports' tests read them with plain curl.
curl:
	@command -v curl >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq curl >/dev/null)

pytest: $(VENV)/.test-installed tests/js/node_modules/.package-lock.json chromium curl kit
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

# The fan-out benchmark (docs/benchmarks.md): Debian's Go toolchain, gorilla/websocket
# for the load generator, and the Go Centrifuge library (the anchor) with the
# dependencies its Debian package leaves out; all build offline.
BENCH_APT := golang-go golang-github-gorilla-websocket-dev \
	golang-github-centrifugal-centrifuge-dev golang-github-centrifugal-protocol-dev \
	golang-github-igm-sockjs-go-dev golang-github-mna-redisc-dev \
	golang-github-fzambia-eagle-dev redis-server
bench-deps:
	@dpkg -s $(BENCH_APT) >/dev/null 2>&1 || (apt-get update -qq && \
		apt-get install -y -qq --no-install-recommends $(BENCH_APT) >/dev/null)

$(VENV)/.bench-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $@

bench: bench-deps $(VENV)/.bench-installed
	$(BIN)/python bench/run.py

bench-quick: bench-deps $(VENV)/.bench-installed
	$(BIN)/python bench/run.py --quick

clean:
	rm -rf $(VENV) tests/js/node_modules clients/js/node_modules clients/js/dist clients/js/dist-test .mypy_cache .ruff_cache .pytest_cache
