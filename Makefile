# Set-up and checks. Everything runs inside .venv so a clean clone needs only python3 >= 3.10.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel by default; GPU users: `make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"`
# or install their torch into .venv first (an existing torch is kept).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test lint format bench clean

install:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev,sweeps]"

test:
	WANDB_MODE=offline $(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

lint:
	$(PY) -m ruff check src tests experiments
	$(PY) -m ruff format --check src tests experiments

format:
	$(PY) -m ruff check --fix src tests experiments
	$(PY) -m ruff format src tests experiments

# Benchmarks (not tests): each writes experiments/benchmarks/results/<name>.md. The defaults
# suit a CPU (smaller 3D training size, no torch.compile rows); on a GPU machine run
# `make bench BENCH_TRAINING_ARGS= BENCH_THREADS=8` (sizes, bf16 and compile default on for CUDA).
BENCH_THREADS ?= 1
BENCH_TRAINING_ARGS ?= --no-compile
BENCH_GENERATION_ARGS ?=
bench:
	OMP_NUM_THREADS=$(BENCH_THREADS) $(PY) experiments/benchmarks/deformation.py --threads $(BENCH_THREADS)
	OMP_NUM_THREADS=$(BENCH_THREADS) $(PY) experiments/benchmarks/training.py --threads $(BENCH_THREADS) $(BENCH_TRAINING_ARGS)
	OMP_NUM_THREADS=$(BENCH_THREADS) $(PY) experiments/benchmarks/generation.py --threads $(BENCH_THREADS) $(BENCH_GENERATION_ARGS)

clean:
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info outputs multirun
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find logs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
