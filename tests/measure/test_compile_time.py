"""What compiling the decode step costs: the row's compile_s column and the benchmark command that
prints compile seconds and step times per design and depth (bench/measure/compile_time.py)."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from bench.config import BenchConfig, resolve
from bench.measure.point import measure


def test_a_compiled_point_records_its_compile_seconds_and_an_eager_one_none():
    base = dict(size="tiny", seq_len=32, new_tokens=3, repeats=1, warmup=0, model="melt", loops=2, scenario="decode")
    compiled = measure(resolve(BenchConfig(**base, compile=True, compile_backend="aot_eager")))
    eager = measure(resolve(BenchConfig(**base)))
    assert compiled["timing_status"] == eager["timing_status"] == "ok"
    assert compiled["compile_s"] > 0 and eager.get("compile_s") is None


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.measure.compile_time", *args], capture_output=True, text=True)


def test_the_benchmark_prints_compile_seconds_step_times_and_graphs(tmp_path):
    """Each (design, depth) in its own process: MELT's two graphs at 3 loops (loop 0, the later
    loops), the standard model's one, whatever --loops says (it runs once)."""
    out = tmp_path / "compile.csv"
    done = _run("--size", "tiny", "--layers", "2", "--loops", "3", "--designs", "standard", "melt",
                "--backend", "aot_eager", "--steps", "2", "--context", "8", "--out", str(out))
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out).set_index("design")
    assert table.loc["standard", "loops"] == 1 and table.loc["melt", "loops"] == 3
    assert table.loc["standard", "graphs"] == 1 and table.loc["melt", "graphs"] == 2
    assert (table["compile_s"] > 0).all() and (table["step_ms"] > 0).all() and (table["eager_ms"] > 0).all()
    assert "| design" in done.stdout and "compile_s" in done.stdout


@pytest.mark.parametrize("design", ["gpt2", "melt:ring", "ouro:nope"])
def test_a_bad_design_is_refused_before_any_work(design):
    done = _run("--designs", "standard", design)
    assert done.returncode != 0 and f"design {design!r}" in done.stderr and "allowed:" in done.stderr
    assert "compile_time: standard" not in done.stderr  # nothing was measured
