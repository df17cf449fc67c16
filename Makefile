# Quick start: `make demo` and `make test`. Each target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision come first, pinned to the versions the project is tested with.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-quick lint bench install clean

$(STAMP): setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .[dev]
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/varitok demo --workdir demo-run

test: lint
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q tests

# Unit tests only (no multi-process or end-to-end runs): a few minutes.
test-quick: lint
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) demo-run .pytest_cache
