"""Installing meltbench into an environment that already has torch (a cluster's CUDA build) keeps
that torch: pyproject.toml declares a range, and only this project's own installs pin the exact
versions (constraints.txt)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


@pytest.mark.slow  # pip resolves the project's dependencies and builds its metadata: seconds
def test_an_install_into_an_environment_with_torch_leaves_torch_alone(tmp_path):
    report = tmp_path / "plan.json"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                          "-e", str(ROOT)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert "torch" not in planned, f"pip would replace torch {torch.__version__} with {planned.get('torch')}"
    assert set(planned) == {"meltbench"}


def test_the_declared_torch_range_admits_the_gpu_machines_and_the_pinned_version():
    """torch >= 2.11 (the GPU machines') and < 2.14; constraints.txt pins the one tested here."""
    import tomllib

    from packaging.specifiers import SpecifierSet

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [SpecifierSet(d.removeprefix("torch")) for d in deps if d.startswith("torch")]
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert "2.11.0" in spec and "2.13.0" in spec and "2.14.0" not in spec
    assert pins["torch"] in spec and torch.__version__.split("+")[0] == pins["torch"]
