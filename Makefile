# orthonet: `make demo` installs and runs the whole pipeline on a synthetic knee dataset;
# `make test` installs and runs the test suite. Both create ./.venv on first use.
# `make benchmarks` runs every benchmarks/bench_*.py (hours; updates docs/benchmarks.md),
# `make benchmarks-quick` a smoke run of each (minutes). BENCH_ARGS="--only bench_preprocess" picks some.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.orthonet-installed

.PHONY: install test demo clean-demo benchmarks benchmarks-quick

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m orthonet.demo

clean-demo:
	rm -rf demo_output

BENCH_ARGS ?=

benchmarks: install
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

benchmarks-quick: install
	$(PY) benchmarks/run_all.py --quick $(BENCH_ARGS)
