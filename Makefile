# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv with a Python 3.12
# found on this machine and install the package (and its dev extra) into it first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# `make test` runs the test files on this many pytest-xdist workers (one file per worker at a time, so a
# module's fixtures are built once), one torch thread each; 1 runs them in this process, in order.
TEST_WORKERS ?= 2
DEMO_ARGS ?=

.PHONY: install test test-gpu test-real-model demo env clean

$(VENV)/.installed: setup.py
	@py312=$$(bash tools/find_python312.sh) || exit 1; \
	  [ -x $(PY) ] || { echo "creating $(VENV) with $$py312"; $$py312 -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

test: install
ifeq ($(TEST_WORKERS),1)
	$(PY) -m pytest $(PYTEST_ARGS)
else
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)
endif

test-gpu: install
	$(PY) -m pytest -m gpu --run-gpu $(PYTEST_ARGS)

test-real-model: install
	$(PY) -m pytest -m real_model --real-model $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/solopo demo $(DEMO_ARGS)

env: install
	$(VENV)/bin/solopo env

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
