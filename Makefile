# The two commands of the README: `make demo` and `make test`. Both set up .venv when it is missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.igpo-installed

.PHONY: setup demo test test-fast lint bench clean

$(STAMP): setup.cfg pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m igpo.demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/rollout.py

clean:
	rm -rf .artifacts outputs multirun .pytest_cache
