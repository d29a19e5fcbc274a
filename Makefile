# The two README commands: `make demo` and `make test`. Both start from nothing:
# they create .venv, install the package, and run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine without an NVIDIA GPU, pin torch to the CPU wheel so pip does not
# pull a multi-GB CUDA build; with `nvidia-smi` present, pip resolves the
# CUDA build from PyPI. Override with `make TORCH_SPEC=... install`.
TORCH_CPU_SPEC ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),,$(TORCH_CPU_SPEC))
WORKDIR ?= runs/demo

.PHONY: install demo test lint notebook quickstart strip-notebooks bench-prepare cluster-local clean

$(BIN)/rerank: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then \
	  echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt; \
	  echo "installing with constraint $(TORCH_SPEC) (CPU-only machine)"; \
	  $(BIN)/python -m pip install --quiet -c $(VENV)/torch-constraint.txt -e ".[dev]"; \
	else \
	  $(BIN)/python -m pip install --quiet -e ".[dev]"; \
	fi
	touch $(BIN)/rerank

install: $(BIN)/rerank

demo: install
	$(BIN)/rerank demo --workdir $(WORKDIR)

test: install
	$(BIN)/python -m pytest -q -n 2 --durations=20

# ruff; the layering contract in pyproject.toml (import-linter); copied blocks in
# ray_app/ (pylint's duplicate-code check, nothing else of pylint).
lint: install
	$(BIN)/ruff check ray_app jobs tests
	$(BIN)/ruff format --check ray_app jobs tests
	$(BIN)/lint-imports
	$(BIN)/pylint --disable=all --enable=duplicate-code --score=n ray_app

# A notebook run headless: a copy under runs/notebooks (the committed notebook
# keeps no outputs); open the result in Jupyter or VS Code to see the plots.
# `make notebook NB=evaluation`; parameters come from RERANK_NB_* variables.
NB ?= quickstart
notebook: install
	mkdir -p runs/notebooks
	cp notebooks/$(NB).ipynb runs/notebooks/$(NB).ipynb
	$(BIN)/jupyter execute --inplace --timeout=7200 runs/notebooks/$(NB).ipynb
	@echo "executed notebook with its outputs and plots: runs/notebooks/$(NB).ipynb"

quickstart:
	$(MAKE) notebook NB=quickstart

# Notebooks are committed without outputs (tests/test_notebooks.py checks);
# `$(BIN)/nbstripout --install` makes git strip them on every commit.
strip-notebooks: install
	$(BIN)/nbstripout notebooks/*.ipynb

# Local cluster parity: a Ray head on 127.0.0.1, the pipeline submitted with
# `ray job submit`, the head stopped. ARGS go to cluster/local-cluster.sh:
# `--two-nodes --s3` for a head without CPUs, a worker node and every path on a
# local S3 server; the rest to jobs/pipeline.py.
cluster-local: install
	VENV=$(VENV) bash cluster/local-cluster.sh $(ARGS)

bench-prepare: install
	$(BIN)/python jobs/bench_prepare.py

clean:
	rm -rf $(VENV) runs .pytest_cache
