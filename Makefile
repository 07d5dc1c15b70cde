# pg-neon: two commands do all set-up (see README.md).
#   make demo   set up, then create a local PostgreSQL node, write data, show `neon pg list`
#   make test   set up, then lint, type-check and run the tests (two workers, one per core;
#               a test file's tests stay on one worker, so module fixtures are shared)
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q -x -n 2 --dist loadfile --durations=15 -p no:cacheprovider $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
