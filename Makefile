# The two set-up commands of the README:
#   make demo   -- the CPU quickstart (creates .venv on first use)
#   make test   -- the test suite
# On a cluster, `pip install .` into your own environment and use `neutral-residues ...`
# (or `python -m trainer ...`) from any directory.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo demo-quick test test-fast env

env: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -r requirements.txt
	touch $@

demo: env
	$(PY) -m trainer demo

demo-quick: env
	$(PY) -m trainer demo --quick

test: env
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: env
	$(PY) -m pytest -m "not slow and not slurm" $(PYTEST_ARGS)
