"""Rows on disk -> table, report and plots, from synthetic rows (no model runs here)."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.report.build import build
from bench.report.build import main as report_main
from bench.report.memory import oom_frontier, ratio_table
from bench.report.views import PLOTS, plot_view
from bench.rows.files import RESULT_FILE, load_rows, write_row
from bench.rows.schema import COLUMNS, IDENTITY

MIB = 2**20
ROOT = Path(__file__).resolve().parents[2]


def _row(model, loops, seq_len, status="ok", **kw):
    kv = (loops if model == "ouro" else 1) * seq_len * 1000
    row = dict(model=model, size="small", loops=loops, seq_len=seq_len, batch=1, new_tokens=8,
               scenario="generate", dtype="float32", device="cpu", probe="tracked", status=status,
               gpu_name="CPU: test", torch_version="2.13.0", git_sha="abc",
               timestamp="2026-01-01T00:00:00+00:00")
    if status == "ok":
        row.update(peak_bytes=10 * MIB + kv, kv_bytes_analytic=kv, weights_bytes=10 * MIB,
                   peak_decode_bytes=5 * MIB + kv, decode_tokens_per_s=100.0 / loops)
    return {**row, **kw}


def _write_sweep(folder: Path):
    rows = [_row("standard", 1, s) for s in (256, 1024)]
    rows += [_row(m, n, s) for m in ("ouro", "melt") for n in (1, 2, 4) for s in (256, 1024)]
    rows += [_row("ouro", 4, 4096, status="oom", error="OutOfMemoryError: out of memory")]
    for i, row in enumerate(rows):
        write_row(folder / "points" / str(i), row)
    return rows


def test_write_row_is_atomic_and_complete(tmp_path):
    path = write_row(tmp_path / "p", _row("melt", 4, 256))
    assert path.name == RESULT_FILE and [p.name for p in path.parent.iterdir()] == [RESULT_FILE]
    assert list(json.loads(path.read_text())) == COLUMNS  # every column, missing ones as null


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_result_json_is_readable_by_others(tmp_path, umask_022):
    """mkstemp makes 0600 files; a row must be readable by other users (shared or Slurm setups)."""
    path = write_row(tmp_path / "p", _row("melt", 4, 256))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_previous_row(tmp_path, monkeypatch):
    path = write_row(tmp_path / "p", _row("melt", 4, 256, peak_bytes=1))
    before = path.read_text()

    def dump_half(obj, f, **kwargs):
        f.write('{"model": "melt", ')
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", dump_half)
    with pytest.raises(OSError, match="disk full"):
        write_row(tmp_path / "p", _row("melt", 4, 256, peak_bytes=2))
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir()] == [RESULT_FILE]  # no temporary file left


def test_load_rows_keeps_the_newest_row_per_identity(tmp_path):
    write_row(tmp_path / "a", _row("melt", 4, 256, peak_bytes=1))
    write_row(tmp_path / "b", _row("melt", 4, 256, peak_bytes=2, timestamp="2026-02-01T00:00:00+00:00"))
    df = load_rows(tmp_path)
    assert len(df) == 1 and df.peak_bytes.iloc[0] == 2
    assert not df.duplicated(IDENTITY).any()


def test_build_writes_table_report_and_plots(tmp_path):
    rows = _write_sweep(tmp_path)
    df = build(tmp_path)
    assert len(df) == len(rows)
    for name in ("table.csv", "table.parquet", "report.md", *PLOTS):
        assert (tmp_path / name).stat().st_size > 0, name
    assert pd.read_parquet(tmp_path / "table.parquet").shape == pd.read_csv(tmp_path / "table.csv").shape
    report = (tmp_path / "report.md").read_text()
    assert "MELT / LoopLM peak memory" in report and "OOM frontier" in report
    assert "MELT / LoopLM decode peak" in report
    assert all(f"]({p})" in report for p in PLOTS)


def test_report_files_are_replaced_atomically(tmp_path, monkeypatch, umask_022):
    _write_sweep(tmp_path)
    build(tmp_path)
    outputs = ("table.csv", "table.parquet", "report.md", *PLOTS)
    assert all(stat.S_IMODE((tmp_path / n).stat().st_mode) == 0o644 for n in outputs)
    before = {n: (tmp_path / n).read_bytes() for n in outputs}
    write_row(tmp_path / "points" / "new", _row("melt", 8, 256))

    def write_half(self, path, **kwargs):
        Path(path).write_bytes(b"PAR1 half a table")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", write_half)
    with pytest.raises(OSError, match="disk full"):
        build(tmp_path)
    assert (tmp_path / "table.parquet").read_bytes() == before["table.parquet"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    monkeypatch.undo()
    build(tmp_path)
    assert len(pd.read_parquet(tmp_path / "table.parquet")) == len(pd.read_csv(tmp_path / "table.csv"))


def test_summaries():
    rows = [_row(m, n, 1024) for m in ("ouro", "melt") for n in (1, 4)]
    rows += [_row("ouro", 4, 2048, status="oom"), _row("ouro", 4, 512)]
    view = plot_view(pd.DataFrame(rows, columns=COLUMNS))
    kv = ratio_table(view, "kv_bytes_analytic")
    assert kv.loc[1024, 1] == 1.0 and kv.loc[1024, 4] == 0.25
    decode = ratio_table(view, "peak_decode_bytes")
    kv_1024 = 1024 * 1000
    assert decode.loc[1024, 4] == (5 * MIB + kv_1024) / (5 * MIB + 4 * kv_1024)
    frontier = oom_frontier(view)
    assert frontier.loc[("LoopLM (Ouro)", 4)].tolist() == [1024, 2048]


def test_report_command_rebuilds_elsewhere(tmp_path):
    _write_sweep(tmp_path / "src")
    out = subprocess.run([sys.executable, "-m", "bench.report", str(tmp_path / "src"), "--out",
                          str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "report.md").exists() and (tmp_path / "out" / PLOTS[0]).exists()


def test_settings_that_vary_within_a_model_split_its_line():
    rows = [_row("melt", 4, 1024, cache_update=u) for u in ("gated", "mean")]
    rows += [_row("ouro", 4, 1024, dtype=d) for d in ("float32", "bfloat16")]
    view = plot_view(pd.DataFrame(rows, columns=COLUMNS))
    assert sorted(view.series) == ["LoopLM (Ouro) dtype=bfloat16", "LoopLM (Ouro) dtype=float32",
                                   "MELT cache_update=gated", "MELT cache_update=mean"]


def test_rebuild_from_a_gathered_table_keeps_it(tmp_path):
    """A committed reference folder holds table.parquet but no result.json files: a rebuild reads
    the table instead of overwriting it with an empty one."""
    _write_sweep(tmp_path / "sweep")
    first = build(tmp_path / "sweep", tmp_path / "reference")
    again = build(tmp_path / "reference")
    pd.testing.assert_frame_equal(again, first)


def test_report_of_an_empty_folder_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        report_main([str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"python -m bench.report: error: no result rows under {tmp_path}: no result.json and no table.parquet"]
    assert list(tmp_path.iterdir()) == []
