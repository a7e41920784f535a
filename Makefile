# Two commands on a fresh machine: `make serve` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# The CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
DEBIAN_TEST_PACKAGES := dataset-fashion-mnist prometheus haproxy python3.11 python3.11-venv wrk
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# checkov pins dozens of packages of its own: it lives in its own virtual environment, away from the tests' pins.
CHECKOV_VENV := .venv-checkov
CHECKOV := checkov==3.3.30
# tests/triton_server starts the tritonserver (2.51.0) that nvidia-pytriton's wheel ships on model_repo/; its own
# venv, made with Debian's /usr/bin/python3.11 (the backend stub links the system libpython).
PYTRITON_VENV := .venv-pytriton

.PHONY: serve test lint format train export bench bench-peers bench-peers-quick bench-peers-venvs gpu-check clean \
	debian-packages

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Serving needs no torch: the base install only.
$(VENV)/.serve: pyproject.toml | $(BIN)/python
	$(PIP) -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(PIP) $(TORCH)
	$(PIP) -e '.[test]'
	touch $@

$(CHECKOV_VENV)/bin/checkov:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(CHECKOV)

$(PYTRITON_VENV): scripts/pytriton-venv.sh | debian-packages
	bash scripts/pytriton-venv.sh $@
	touch $@

debian-packages:
	@missing=$$(for p in $(DEBIAN_TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

serve: $(VENV)/.serve
	$(BIN)/srvit serve --repo model_repo --host 127.0.0.1 --port 8000

test: $(VENV)/.test $(CHECKOV_VENV)/bin/checkov $(PYTRITON_VENV) debian-packages lint
	ONLY_GPU_SKIPS=1 $(BIN)/python -m pytest -q

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The embedded default model: train (about 80 minutes on 2 cores), then export every depth.
train: $(VENV)/.test debian-packages
	$(BIN)/srvit train --model srvit_fashion --out runs/srvit_fashion

export: $(VENV)/.test debian-packages
	$(BIN)/srvit export srvit/checkpoints/srvit_fashion.safetensors --name srvit_fashion --repo model_repo

bench: $(VENV)/.test debian-packages
	$(BIN)/srvit bench matrix --repo model_repo

# srvit against Triton (PyTriton), Ray Serve, BentoML, LitServe and a naive server, each in its own venv under
# .venv-peers/ (never in .venv or the tests' install). The full run takes about an hour; the quick one a few minutes.
PEERS := naive pytriton ray bentoml litserve

bench-peers-venvs: debian-packages
	for peer in $(PEERS); do bash scripts/peers-venv.sh $$peer || exit 1; done

bench-peers: $(VENV)/.test bench-peers-venvs
	$(BIN)/srvit bench peers

bench-peers-quick: $(VENV)/.test bench-peers-venvs
	$(BIN)/srvit bench peers --quick

# On a machine with an NVIDIA GPU, its driver and PyPI: installs .venv-gpu, runs pytest -m gpu, exports with TensorRT
# fp16, serves and benchmarks every depth on TensorRT, prints one summary (runs/gpu-check/summary.md). ~8 minutes.
gpu-check:
	bash scripts/gpu-check.sh

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(PYTRITON_VENV) .venv-peers .venv-gpu .pytest_cache .ruff_cache
