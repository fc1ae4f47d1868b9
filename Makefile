# Every target does its own set-up: the virtualenv (and buf, for lint) are
# created on first use and refreshed when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
BUF := node_modules/.bin/buf
PYTEST_ARGS ?=

.PHONY: help venv test test-fast proto proto-check lint fmt demo bench up clean

help:
	@echo "make demo      - run the whole stack and generate an image end to end"
	@echo "make up        - run the whole stack until Ctrl-C; prints how to reach it"
	@echo "make test      - run the full test suite (real PostgreSQL, real gRPC servers)"
	@echo "make test-fast - the test suite without the slow fault-injection tests"
	@echo "make lint      - buf lint, ruff, mypy, stale generated code check"
	@echo "make fmt       - fix what ruff can and format the code"
	@echo "make proto     - regenerate Python code and typed stubs from protos/"
	@echo "make bench     - benchmarks (QUICK=1 for a short run)"
	@echo "make clean     - remove the virtualenv, caches and .lockn/ (demo state)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

venv: $(STAMP)

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

proto: $(STAMP)
	$(PY) scripts/generate_protos.py

# Regenerate and fail when the checked-in code differs from protos/.
proto-check: proto
	@git add -N services/generated
	@git diff --exit-code --stat -- services/generated \
		|| (echo "generated code is stale: run 'make proto' and commit" && exit 1)

lint: $(STAMP) $(BUF) proto-check
	$(BUF) lint
	@# Contracts may only grow: compare with the previous commit when there is one.
	@if git rev-parse -q --verify HEAD~1 >/dev/null; then \
		$(BUF) breaking --against '.git#ref=HEAD~1'; fi
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy services gateway tests bench

fmt: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

demo: $(STAMP)
	$(PY) -m services.demo

bench: $(STAMP)
	$(PY) -m bench $(if $(QUICK),--quick,)

up: $(STAMP)
	$(PY) -m services.demo --serve

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache .lockn
