# `make run` and `make test` work on a fresh machine with Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "ssehub needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/ssehub serve

lint: $(VENV)/.test-installed
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest

# Run by hand on a quiet machine; each script prints ssehub beside its peers.
bench: $(VENV)/.test-installed
	$(BIN)/python bench/decoder.py
	$(BIN)/python bench/fanout.py
	$(BIN)/python bench/relay.py
	$(BIN)/python bench/redis_fanout.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
