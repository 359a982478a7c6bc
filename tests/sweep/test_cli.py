"""run_bench.py end to end on CPU (tiny models): a sweep, its re-run, an OOM, and bad input."""

import json

import pandas as pd
import pytest
import torch

from bench.report.views import PLOTS

FAST = ["size=tiny", "new_tokens=4", "repeats=1", "warmup=0"]
SMALL_INPUT = [*FAST, "seq_len=64"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A tiny three-model sweep over loop depth, run once for the tests below."""
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path_factory.mktemp("sweep")
    args = ["-m", "model=standard,ouro,melt", "loops=1,2,4,8", "seq_len=256", *FAST,
            f"hydra.sweep.dir={out}"]
    run = subprocess.run([sys.executable, str(ROOT / "run_bench.py"), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return out, args, run


def test_sweep_writes_table_report_and_plots(sweep):
    out, _, run = sweep
    for name in ("table.csv", "table.parquet", "report.md", *PLOTS):
        assert (out / name).stat().st_size > 0, name
    assert "point 12 of 12" in run.stdout + run.stderr  # progress lines
    table = pd.read_csv(out / "table.csv")
    # The standard model runs once whatever `loops` says: its 4 points are one row.
    assert sorted(table.groupby("model").size().items()) == [("melt", 4), ("ouro", 4), ("standard", 1)]
    assert (table.status == "ok").all()
    assert "MELT / LoopLM peak memory" in (out / "report.md").read_text()


def test_sweep_numbers_are_consistent(sweep):
    table = pd.read_csv(sweep[0] / "table.csv")
    standard = table[table.model == "standard"].iloc[0]
    ouro = table[table.model == "ouro"].set_index("loops")
    melt = table[table.model == "melt"].set_index("loops")
    # The LoopLM's KV grows linearly with loops; MELT's stays that of the standard model.
    assert (ouro.kv_bytes_measured == ouro.index * standard.kv_bytes_measured).all()
    assert (melt.kv_bytes_measured == standard.kv_bytes_measured).all()
    assert (ouro.kv_bytes_measured == ouro.kv_bytes_analytic).all()
    # MELT's peak is flat in loops from 2 on (with one loop h = u: no gate, no latents kept);
    # the LoopLM's grows by at least its extra KV.
    looped = melt.peak_bytes.loc[[2, 4, 8]]
    assert looped.max() - looped.min() <= 0.01 * looped.max()
    assert ouro.peak_bytes[8] - ouro.peak_bytes[1] >= 7 * standard.kv_bytes_measured
    assert melt.peak_bytes[8] < ouro.peak_bytes[8]


def test_rerun_skips_measured_points(sweep, run_bench):
    out, args, _ = sweep
    before = {p: p.read_text() for p in out.rglob("result.json")}
    run = run_bench(*args)
    assert run.returncode == 0, run.stderr
    assert (run.stdout + run.stderr).count("already measured, skipped") == 12
    assert {p: p.read_text() for p in out.rglob("result.json")} == before


def test_oom_is_a_result_and_the_sweep_goes_on(tmp_path, run_bench):
    # 1 MiB of simulated device memory: 512 tokens of the LoopLM's cache do not fit, 64 do.
    run = run_bench("-m", "model=ouro", "loops=4", "seq_len=32,512,64", "mem_limit_mib=1", *FAST,
                    f"hydra.sweep.dir={tmp_path}")
    assert run.returncode == 0, run.stderr
    rows = {r["seq_len"]: r for r in map(json.loads, map(lambda p: p.read_text(),
                                                         tmp_path.rglob("result.json")))}
    assert {k: r["status"] for k, r in rows.items()} == {32: "ok", 512: "oom", 64: "ok"}
    assert "out of memory" in rows[512]["error"]
    report = (tmp_path / "report.md").read_text()
    assert "OOM frontier" in report


BAD = [
    (["loops=0"], "loops"),
    (["loops=abc"], "loops"),
    (["seq_len=5000"], "seq_len"),
    (["model=gpt"], "model"),
    (["size=huge"], "size"),
    (["scenario=train"], "scenario"),
    (["probe=magic"], "probe"),
    (["dtype=int8"], "dtype"),
    (["cache_update=median"], "cache_update"),
    (["colour=red"], "colour"),
    (["+colour=red"], "colour"),
    (["loops=1,2"], "Ambiguous value"),  # a sweep without -m
    (["experiment=nope"], "experiment"),
    (["-m", "loops=1,0"], "loops"),  # one bad point stops the whole sweep before it starts
]
if not torch.cuda.is_available():
    BAD += [(["device=cuda"], "device"), (["probe=cuda"], "probe")]


@pytest.mark.parametrize("args, field", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line(capsys, args, field):
    """run_bench.py's check of every point before Hydra starts (in this process: the command-line
    path itself is the next test's)."""
    from bench import config
    from bench.sweep import preflight

    from conftest import ROOT

    config.register()
    with pytest.raises(SystemExit) as stop:
        preflight.preflight([*args, *[a for a in SMALL_INPUT if not a.startswith(field)]], str(ROOT / "conf"), "config")
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"run_bench.py: error: {field}") and "allowed: " in lines[0]


@pytest.mark.parametrize("args", [["loops=0"], ["-m", "loops=1,0"]], ids=["point", "sweep"])
def test_bad_input_on_the_command_line_exits_2_and_writes_nothing(tmp_path, run_bench, args):
    run = run_bench(*args, *SMALL_INPUT, f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["run_bench.py: error: loops: got 0; allowed: an integer >= 1"]
    assert "Traceback" not in run.stdout + run.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a process per point: a torch import each
def test_isolated_launcher_runs_each_point_in_its_own_process(tmp_path, run_bench):
    run = run_bench("-m", "hydra/launcher=isolated", "model=ouro,melt", "loops=2", "seq_len=32",
                    *FAST, f"hydra.sweep.dir={tmp_path}")
    assert run.returncode == 0, run.stderr
    rows = [json.loads(p.read_text()) for p in tmp_path.rglob("result.json")]
    assert sorted(r["model"] for r in rows if r["status"] == "ok") == ["melt", "ouro"]
    assert len(list(tmp_path.glob(".submitit/*"))) >= 2  # one submitit job per point
    assert (tmp_path / "table.csv").exists()
