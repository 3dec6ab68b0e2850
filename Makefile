# The README's commands. `make run` and `make test` each install everything they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU installs pin torch (a plain `torch` pulls a multi-GB CUDA build); GPU images override TORCH.
TORCH ?= torch==2.13.0
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: install install-test run serve generate test lint format bench bench-serve tiny-model clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(PIP) "$(TORCH)"
	$(PIP) -e .

install-test: $(BIN)/python
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[test]"

## The main job: the online service (Serve graph, tiny model, CPU) on http://127.0.0.1:8000.
run: serve

serve: install
	$(BIN)/serve run deployments/configs/local.yaml

## One image in-process with the CLI, written to out/cat.png.
generate: install
	$(BIN)/fluxray generate --prompt "a photo of a cat sitting on a red chair" --output out/cat.png --seed 42

## Lint, then the whole test suite (CPU, tiny model).
test: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python benchmarks/engine.py

bench-serve: install-test
	$(BIN)/python benchmarks/serve_load.py

tiny-model: install
	$(BIN)/python scripts/make_tiny_model.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache *.egg-info
