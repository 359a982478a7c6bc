# Two commands for a fresh machine: `make bench` (default sweep) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: bench test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

bench: install
	$(PY) run_bench.py -m experiment=default

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs multirun
