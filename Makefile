# The doors: make test, make demo, make bench. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench lint clean families gpu-check gpu-wheels test-latest test-oldest

# The tested set: every package at its constraints.txt version (pyproject.toml keeps the ranges).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull the multi-GB CUDA build.
	$(PY) -m pip install -q -c constraints.txt "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q --durations=10

# A long-context LoRA fine-tune with SP=2 on 2 CPU processes (see hf_seqpar/demo/__main__.py); output in demo_output/.
demo: $(STAMP)
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q -c constraints.txt -e ".[bench]"  # the demo's PNG
	$(PY) -m hf_seqpar.demo

bench: $(STAMP)
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q -c constraints.txt matplotlib  # the benchmarks' PNG plots
	$(PY) benchmarks/run_all.py

# On a machine with a CUDA GPU, one command, no network, about 6 minutes on one H100 / H200 with the set-up, run with
# that machine's own python and torch (none of .venv): benchmarks/gpu_check.py installs every wheel of .whl/ with
# `pip install --no-index --no-deps --target <tmp>/hf_seqpar_site` and puts that dir first on PYTHONPATH, then runs
# tests/gpu, the efficiency, memory, backend-table and training-step benchmarks, each within its share of GPU_BUDGET_S,
# and prints ONE summary
# table; results in benchmarks/results/*_cuda.json. Without CUDA the same command runs the plan through the CPU
# stand-in of the CUDA ops at tiny sizes (results in out/gpu_check/*_cpu_standin.json) and exits 0 when it passes.
# .whl/ (git-ignored) comes from `make gpu-wheels` here: Python 3.12 wheels (the GPU image's python) for this
# machine's platform (x86_64 Linux) of what the image lacks or has at older versions: transformers, accelerate, peft,
# their newer deps (huggingface_hub, kernels, httpx2, httpcore2, truststore, click, hf-xet, tomlkit) and pytest
# (pluggy, iniconfig), each at .venv's version (`gpu_check.py --pins`); --no-deps, so no torch comes along (~23 MB).
GPU_PYTHON ?= python3
GPU_BUDGET_S ?= 340
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --wheels .whl --budget-s $(GPU_BUDGET_S)

gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary :all: --python-version 3.12 --dest .whl \
		$$($(PY) benchmarks/gpu_check.py --pins)

# Every causal-LM family under SP vs plain (~15 min on 2 cores): rewrites tests/family_support.json and README's table.
families: $(STAMP)
	$(PY) tests/scripts/family_sweep.py --check

# The two ends of pyproject's ranges, each in its own venv (TESTS= narrows the suite, e.g. TESTS=tests/test_config.py).
# test-latest: the newest releases (torch stays TORCH_SPEC); prints what drifted from constraints.txt, then pytest's result.
# test-oldest: every dependency at pyproject's lower bound (==); torch stays OLDEST_TORCH, by default TORCH_SPEC, the
# one CPU build a plain PyPI index serves without CUDA (torch's own lower bound needs its CPU index: OLDEST_TORCH=torch==2.6.0).
LATEST ?= .venv-latest
OLDEST ?= .venv-oldest
OLDEST_TORCH ?= $(TORCH_SPEC)
TESTS ?=

test-latest:
	$(PYTHON) -m venv --clear $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]" "$(TORCH_SPEC)"
	$(LATEST)/bin/python tests/scripts/pins.py drift $(LATEST)/bin/python
	$(LATEST)/bin/python -m pytest -q $(TESTS)

$(OLDEST)/.installed: pyproject.toml
	$(PYTHON) -m venv --clear $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q --upgrade pip
	$(OLDEST)/bin/python tests/scripts/pins.py oldest --except torch > $(OLDEST)/oldest.txt
	$(OLDEST)/bin/python -m pip install -q "$(OLDEST_TORCH)"
	$(OLDEST)/bin/python -m pip install -q -c $(OLDEST)/oldest.txt "$(OLDEST_TORCH)" -e ".[dev]"
	touch $@

test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python tests/scripts/pins.py drift $(OLDEST)/bin/python
	$(OLDEST)/bin/python -m pytest -q $(TESTS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) $(LATEST) $(OLDEST)
