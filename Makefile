# One target per stage; every target that needs the virtualenv builds it first.
# ARGS takes Hydra overrides, e.g. make pipeline ARGS="teacher.path=/models/my-llama schedule.counts=[4,5,6]"

VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch by default; on a GPU machine: make setup TORCH_SPEC="torch==2.11.0"
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

export HF_HUB_OFFLINE ?= 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PYTHONUNBUFFERED = 1

.PHONY: setup test test-gpu bench-kernels clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[orchestration,dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q $(ARGS)

test-gpu: setup
	$(PY) -m pytest -q -m gpu $(ARGS)

bench-kernels: setup
	$(PY) benchmarks/kernel_parity.py --out benchmarks/results/kernel-parity.json

clean:
	rm -rf $(VENV) .pytest_cache
