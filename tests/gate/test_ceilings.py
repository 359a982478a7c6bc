"""Memory ceilings (python -m bench.gate) on synthetic rows; no model runs here."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.gate.ceilings import CeilingError, check, load_ceilings, load_results
from bench.gate.cli import main
from bench.rows.files import write_row

ROOT = Path(__file__).resolve().parents[2]
KV = 1_000_000  # the standard model's KV bytes in these rows


GATES = 10_000_000  # MELT's extra weights in these rows


def _row(model, loops, seq_len, peak, decode=None, status="ok", **kw):
    row = dict(model=model, size="small", loops=loops, seq_len=seq_len, batch=1, new_tokens=8,
               scenario="generate", dtype="float32", device="cpu", probe="tracked", prefill="chunked",
               chunk_size=500, status=status, timestamp="2026-01-01T00:00:00+00:00")
    if status == "ok":
        slots = loops if model == "ouro" else 1
        row.update(peak_bytes=peak, peak_decode_bytes=decode or peak - 20_000_000,
                   kv_bytes_measured=slots * KV * seq_len // 256,
                   weights_bytes=5_000_000 + (GATES if model == "melt" else 0))
    return {**row, **kw}


def _rows():
    """MELT flat in loops (from 2 on; at one loop the standard model plus its gates), the LoopLM's
    KV growing with them, a standard model at each length."""
    rows = [_row("melt", n, s, 40_000_000 + s) for n in (1, 2, 4) for s in (256, 1024)]
    rows += [_row("ouro", n, s, 30_000_000 + n * s * 1000) for n in (1, 4) for s in (256, 1024)]
    rows += [_row("standard", 1, s, 30_000_000 + s) for s in (256, 1024)]
    return rows


def _folder(tmp_path, rows):
    for i, row in enumerate(rows):
        write_row(tmp_path / "sweep" / "points" / str(i), row)
    return tmp_path / "sweep"


def _update(tmp_path, folder, headroom="0.05"):
    path = tmp_path / "ceilings.yaml"
    assert main(["check", str(folder), "--ceilings", str(path), "--update", "--headroom", headroom]) == 0
    return path


def test_update_then_check_passes_and_limits_are_measured_plus_headroom(tmp_path, capsys):
    folder = _folder(tmp_path, _rows())
    path = _update(tmp_path, folder)
    ceilings = load_ceilings(path)
    assert ceilings["headroom"] == 0.05 and len(ceilings["ceilings"]) == len(_rows())
    melt = next(e for e in ceilings["ceilings"] if e["policy"] == "melt" and e["seq_len"] == 1024
                and e["loops"] == 4)
    assert melt["peak_bytes"] == -(-(40_000_000 + 1024) * 105 // 100)  # ceil(measured x 1.05)
    assert main(["check", str(folder), "--ceilings", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ceilings: 24 of 24 pass" in out and "0 FAIL" in out
    assert "MELT peak flat in loops: 4 of 4 pass" in out and "MELT at one loop = standard + its gates: 4 of 4 pass" in out
    assert "LoopLM KV = loops x standard: 4 of 4 pass" in out and "MELT KV = standard: 6 of 6 pass" in out


def test_a_regression_is_reported_with_point_bytes_ceiling_and_excess(tmp_path, capsys):
    path = _update(tmp_path, _folder(tmp_path / "before", _rows()), headroom="0")
    rows = _rows()
    rows[5]["peak_bytes"] = int(rows[5]["peak_bytes"] * 1.10)  # melt loops=4 seq_len=1024: +10 %
    findings = check(load_results(_folder(tmp_path / "after", rows)), load_ceilings(path))
    failed = [f for f in findings if not f.ok]
    assert [(f.check, f.point) for f in failed] == [
        ("ceiling", "policy=melt size=small loops=4 seq_len=1024 batch=1 scenario=generate dtype=float32 "
                    "probe=tracked prefill=chunked"),
        ("melt_flat_in_loops", "policy=melt size=small loops=4 seq_len=1024 batch=1 scenario=generate "
                               "dtype=float32 probe=tracked prefill=chunked")]
    assert "44,001,126 B, ceiling 40,001,024 B (+10.00 %)" in failed[0].detail
    assert main(["check", str(tmp_path / "after" / "sweep"), "--ceilings", str(path)]) == 1
    assert "FAIL policy=melt" in capsys.readouterr().out


def test_kv_guards_catch_a_cache_that_grows_with_loops(tmp_path):
    path = _update(tmp_path, _folder(tmp_path / "before", _rows()))
    rows = _rows()
    rows[4]["kv_bytes_measured"] *= 4  # melt loops=4 seq_len=256 keeps one slot per loop
    failed = [f for f in check(load_results(_folder(tmp_path / "after", rows)), load_ceilings(path))
              if not f.ok]
    assert [f.check for f in failed] == ["melt_kv_is_standard"]
    assert "loops=4 seq_len=256" in failed[0].point


def test_missing_points_and_failed_rows_fail(tmp_path):
    path = _update(tmp_path, _folder(tmp_path / "before", _rows()))
    rows = _rows()
    rows[0] = _row("melt", 1, 256, 0, status="oom", error="OutOfMemoryError: simulated")
    del rows[1]
    failed = [f for f in check(load_results(_folder(tmp_path / "after", rows)), load_ceilings(path))
              if not f.ok]
    assert ("status oom: OutOfMemoryError: simulated" in failed[0].detail and "loops=1" in failed[0].point)
    assert any("not in the results" in f.detail and "loops=1 seq_len=1024" in f.point for f in failed)


def test_update_refuses_results_that_break_a_guard(tmp_path):
    rows = _rows()
    rows[5]["peak_bytes"] *= 2  # MELT no longer flat in loops
    path = tmp_path / "ceilings.yaml"
    assert main(["check", str(_folder(tmp_path, rows)), "--ceilings", str(path), "--update"]) == 1
    assert not path.exists()


@pytest.mark.parametrize("text, message", [
    ("- a\n", "expected a mapping with a 'ceilings' list"),
    ("ceilings: []\nlimits: 1\n", "unknown key 'limits'"),
    ("ceilings: []\nguards: {melt_flat: 0.02}\n", "unknown guard 'melt_flat'"),
    ("ceilings: []\nguards: {melt_flat_in_loops: -1}\n", "melt_flat_in_loops: got -1"),
    ("ceilings:\n- {policy: melt}\n", "ceilings #1: missing size, loops"),
    ("ceilings:\n- {policy: melt, size: small, loops: 1, seq_len: 1, batch: 1, scenario: generate,"
     " dtype: float32, probe: tracked, prefill: chunked}\n", "no limit"),
    ("ceilings:\n- {policy: melt, size: small, loops: 1, seq_len: 1, batch: 1, scenario: generate,"
     " dtype: float32, probe: tracked, prefill: chunked, peak_bytes: 1.5}\n", "peak_bytes: got 1.5"),
    ("ceilings:\n- {policy: melt, size: small, loops: 1, seq_len: 1, batch: 1, scenario: generate,"
     " dtype: float32, probe: tracked, prefill: chunked, peak_mib: 3}\n", "unknown key 'peak_mib'"),
    ("ceilings: [\n", "bad YAML"),
])
def test_bad_ceilings_file_is_one_clear_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(CeilingError, match=message.replace("(", r"\(")):
        load_ceilings(path)


def test_two_rows_for_one_point_are_refused(tmp_path):
    rows = _rows() + [_row("melt", 1, 256, 1, chunk_size=64)]
    rows[0]["chunk_size"] = 500
    with pytest.raises(CeilingError, match="differ in chunk_size"):
        load_results(_folder(tmp_path, rows))


def test_command_line_exit_codes(tmp_path, capsys):
    folder = _folder(tmp_path, _rows())
    path = _update(tmp_path, folder)
    capsys.readouterr()
    assert main(["check", str(folder), "--ceilings", str(path)]) == 0
    assert main(["check", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file or folder" in err
    with pytest.raises(SystemExit) as usage:
        main(["check", str(folder), "--headroom", "0.1"])
    assert usage.value.code == 2 and "--headroom goes with --update" in capsys.readouterr().err


def test_the_command_reads_results_without_torch(tmp_path):
    """python -m bench.gate as CI runs it: its exit status, and no torch import to read YAML."""
    code = ("import runpy, sys; sys.argv = ['bench.gate', 'check', sys.argv[1]]\n"
            "try:\n    runpy.run_module('bench.gate', run_name='__main__')\n"
            "except SystemExit as e:\n    print('torch' in sys.modules, e.code)")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nowhere")], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.stdout.split() == ["False", "2"] and "no such file or folder" in run.stderr


def test_committed_ceilings_files_load():
    """Each committed file holds ceilings and the guards its sweep can exercise."""
    core = {"melt_flat_in_loops", "melt_one_loop_is_standard", "ouro_kv_is_loops_x_standard", "melt_kv_is_standard",
            "policy_kv_is_formula"}
    want = {"ci.yaml": core, "cpu_small.yaml": core, "ci_policies.yaml": core | {"policy_flat_in_loops"}}
    paths = sorted((ROOT / "conf" / "ceilings").glob("*.yaml"))
    assert {p.name for p in paths} == set(want)
    for path in paths:
        ceilings = load_ceilings(path)
        assert ceilings["ceilings"] and set(ceilings["guards"]) == want[path.name], path.name
        assert yaml.safe_load(path.read_text())["headroom"] > 0


def test_a_guard_with_nothing_to_compare_fails_and_update_leaves_it_out(tmp_path):
    rows = [r for r in _rows() if r["model"] != "standard"]
    folder = _folder(tmp_path, rows)
    path = _update(tmp_path, folder)
    assert set(load_ceilings(path)["guards"]) == {"melt_flat_in_loops"}  # no standard rows here
    ceilings = {**load_ceilings(path), "guards": {"melt_kv_is_standard": True}}
    failed = [f for f in check(load_results(folder), ceilings) if not f.ok]
    assert [(f.check, f.point) for f in failed] == [("melt_kv_is_standard", "-")]
    assert "nothing to compare" in failed[0].detail
