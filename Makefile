# The two commands of the README. Everything installs into .venv; nothing else is needed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint

$(BIN)/movierec: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

## Prepare the embedded synthetic dataset, train SSE-PT on it, evaluate and print results.
run: $(BIN)/movierec
	$(BIN)/movierec quickstart --out runs/quickstart

## Install and run the whole test suite (what CI runs).
test: $(BIN)/movierec
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q

lint: $(BIN)/movierec
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
