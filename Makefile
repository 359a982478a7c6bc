# Two commands for a fresh machine: `make bench` (default sweep) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: bench test test-slow test-all ceilings install clean

install: $(VENV)/.installed

# constraints.txt: the exact versions tested (torch 2.13.0: the CPU wheel on this machine's disk).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

bench: install
	$(PY) run_bench.py -m experiment=default

# After `make bench`: fail if the default sweep broke a memory ceiling (CPU, size small).
ceilings: install
	$(PY) -m bench.gate check results/default --ceilings conf/ceilings/cpu_small.yaml

# The default tier, a worker per core (pytest-xdist; each file on one worker, longest first).
test: install
	$(PY) -m pytest -q -n auto --dist loadfile

# The long end-to-end tier (GPU check smoke mode, isolated launcher, inductor compile, installs) and
# the Slurm tier (skipped without sbatch; scripts/slurm_cluster.sh up starts a local cluster).
test-slow: install
	$(PY) -m pytest -q -n auto --dist loadfile -m "slow or slurm"

# Every tier.
test-all: install
	$(PY) -m pytest -q -n auto --dist loadfile -m "slow or not slow"

clean:
	rm -rf $(VENV) outputs multirun
