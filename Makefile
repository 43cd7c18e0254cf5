# `make demo` and `make test` work on a fresh machine: each creates .venv if
# missing, installs torch==2.13.0 first (the local CPU wheel, so no CUDA
# packages are pulled), then cellvec with its extras, then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cellvec-installed

.PHONY: setup demo test test-long lint bench evaluate clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/cellvec demo --out demo_output

# The suite, within 15 minutes on 2 cores. The real-data tests that need the human
# PBMC gene store (~10 minutes to embed) are marked `long` and run by test-long.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra -m "not long"

test-long: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra -m long

# Style, then the import contracts of .importlinter (layers one way, no cycles at any
# depth) and tests/test_imports.py (no cycle between a package and its own modules).
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests/test_imports.py

# Ratio benchmarks (not part of the test suite; ~1 hour on 2 cores, see benchmarks/README.md).
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_gene_store.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_cell_vectors.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_mapping.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_refine.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_ray.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/load_service.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_object_store.py

# The README's results table on every labelled set, with CellTypist (needs ../shared/data).
evaluate: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/evaluate_all.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
