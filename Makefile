# Two commands for a fresh machine: `make bench` (default sweep) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: bench test ceilings install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

bench: install
	$(PY) run_bench.py -m experiment=default

# After `make bench`: fail if the default sweep broke a memory ceiling (CPU, size small).
ceilings: install
	$(PY) -m bench.gate check results/default --ceilings conf/ceilings/cpu_small.yaml

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs multirun
