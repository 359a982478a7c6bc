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


def save_random_looplm(folder: Path, config) -> Path:
    """A LoopLM of `config` with a larger random init (so that loops and gates change the logits
    visibly), saved in the Hugging Face layout to `folder`."""
    import torch

    from models import build_from_config

    torch.manual_seed(0)
    teacher = build_from_config(config)
    with torch.no_grad():
        teacher.init_weights(std=0.2)
    teacher.save_pretrained(folder)
    return folder
