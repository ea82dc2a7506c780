# The doors: make test, make demo, make bench. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench lint clean families gpu-check gpu-wheels

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull the multi-GB CUDA build.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q --durations=10

# A long-context LoRA fine-tune with SP=2 on 2 CPU processes (see hf_seqpar/demo/__main__.py); output in demo_output/.
demo: $(STAMP)
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q -e ".[bench]"  # the demo's PNG
	$(PY) -m hf_seqpar.demo

bench: $(STAMP)
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q matplotlib  # the benchmarks' PNG plots
	$(PY) benchmarks/run_all.py

# On a machine with a CUDA GPU, one command (< 10 min on one H100): the GPU tests, then the GPU attention benchmark,
# with that machine's own torch (none of .venv). pytest comes from .whl/ (`make gpu-wheels` here) when it lacks it.
GPU_PYTHON ?= python3
GPU_SEQS ?= 16384,65536,131072
gpu-check:
	$(GPU_PYTHON) -c "import pytest" 2>/dev/null || $(GPU_PYTHON) -m pip install -q --no-index --find-links .whl pytest
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m pytest -q -m gpu tests/gpu
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) benchmarks/attention_efficiency.py --device cuda --seqs $(GPU_SEQS) --iters 2

gpu-wheels:
	$(PYTHON) -m pip download -q --only-binary :all: --dest .whl pytest

# Every causal-LM family under SP vs plain (~15 min on 2 cores): rewrites tests/family_support.json and README's table.
families: $(STAMP)
	$(PY) tests/scripts/family_sweep.py --check

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV)
