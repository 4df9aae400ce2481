# The two commands of the README: `make demo` and `make test`. Both set up .venv when it is missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.igpo-installed
# test processes for `make test` (pytest-xdist; each test file stays on one worker, so its module-scoped
# engines are built once). 2 fits a 2-core machine: the suite took 796 s there against 1,032 s serially.
TEST_WORKERS ?= 2

.PHONY: setup demo test test-fast lint bench clean

$(STAMP): setup.cfg pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m igpo.demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/rollout.py

clean:
	rm -rf .artifacts outputs multirun .pytest_cache
