# The two commands of the README: `make run` (the system) and `make test` (the suite).
# Both create .venv and install the project with its dev tools on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CODE := src tests benchmarks

.PHONY: setup run test lint unit integration schemas bench-bus clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: setup
	$(BIN)/microshop demo

lint: setup
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/mypy
	$(BIN)/microshop schemas check

test: lint
	$(BIN)/pytest

unit: setup
	$(BIN)/pytest tests/unit

integration: setup
	$(BIN)/pytest tests/integration

schemas: setup
	$(BIN)/microshop schemas export

bench-bus: setup
	$(BIN)/python -m benchmarks.bus

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
