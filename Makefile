# Quick start (fresh machine with python3 and make):
#   make demo   -> sets up .venv and runs the main job on the CPU-sized `mini3` preset
#   make test   -> sets up .venv and runs the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-quick test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch (test-only) is pinned to 2.13.0, whose CPU build lies on this machine's disk; elsewhere add
	# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu, or an unpinned torch pulls GBs of CUDA wheels.
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/apr-jax demo --preset mini3 --out runs/demo

demo-quick: $(STAMP)
	$(VENV)/bin/apr-jax demo --preset mini3 --quick --out runs/demo_quick

test: $(STAMP)
	$(PY) -m pytest tests -q -n 2

bench: $(STAMP)
	$(PY) experiments/bench_train.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
