import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_bench():
    """Run `python run_bench.py ARGS...` from the repository root; returns the CompletedProcess.
    Tests point hydra.run.dir / hydra.sweep.dir at a temporary folder."""

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "run_bench.py"), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    return run
