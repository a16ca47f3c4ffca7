# Set-up and checks. `make test` and `make run` work on a fresh machine: they build .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# A CPU-only host takes the local CPU build of torch and the CPU-capable UCX wheel; a GPU host
# takes the CUDA build with cupy and the matching UCX.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_GPU),yes)
  TORCH  ?= torch
  EXTRAS ?= dev,cu13
else
  TORCH  ?= torch==2.13.0
  EXTRAS ?= dev,ucx,interpret
endif

.PHONY: setup run test test-gpu lint bench-ring bench-kernels bench-transfer bench-overlap \
	bench-campaign fuzz clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

# The whole path on the embedded default: prefill TP2 -> decode TP1, a few completions, a burst of
# concurrent requests, a summary, clean shutdown.
run: $(STAMP)
	$(BIN)/kvferry demo --config deploy/local.yaml

test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

bench-ring: $(STAMP)
	$(BIN)/python bench/ring.py

bench-kernels: $(STAMP)
	$(BIN)/python bench/copy_kernels.py

bench-transfer: $(STAMP)
	$(BIN)/python bench/transfer.py

bench-overlap: $(STAMP)
	$(BIN)/python bench/overlap.py

bench-campaign: $(STAMP)
	$(BIN)/python bench/campaign.py

# 20,000 hostile frames at each of the default deployment's sockets (120,000 in all), then the
# checks: every process alive, /health ok, the same completion, fds/threads/RSS bounded.
fuzz: $(STAMP)
	$(BIN)/kvferry fuzz --config deploy/local.yaml --frames 20000 --json fuzz.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
