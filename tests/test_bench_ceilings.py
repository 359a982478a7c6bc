"""Memory ceilings (python -m bench.ceilings) on synthetic rows; no model runs here."""

import subprocess
import sys
from pathlib import Path

import pytest

from bench.ceilings import CeilingError, check, load_ceilings, load_results, main
from bench.results import write_row

MIB = 2**20
ROOT = Path(__file__).resolve().parent.parent


def _row(model, loops, seq_len, peak_mib, decode_mib=None, status="ok", **kw):
    row = dict(model=model, size="small", loops=loops, seq_len=seq_len, batch=1, new_tokens=8,
               scenario="generate", dtype="float32", device="cpu", probe="tracked", status=status,
               timestamp="2026-01-01T00:00:00+00:00")
    if status == "ok":
        row.update(peak_bytes=int(peak_mib * MIB),
                   peak_decode_bytes=int((decode_mib or peak_mib / 2) * MIB))
    return {**row, **kw}


def _sweep(tmp_path, *extra):
    """A folder of rows: MELT flat in loops, the LoopLM growing with them; plus `extra` rows."""
    rows = [_row("melt", n, s, 40 + s / 256) for n in (1, 2, 4) for s in (256, 1024)]
    rows += [_row("ouro", n, s, 30 + n * s / 64) for n in (1, 2, 4) for s in (256, 1024)]
    for i, row in enumerate([*rows, *extra]):
        write_row(tmp_path / "sweep" / "points" / str(i), row)
    return tmp_path / "sweep"


def _ceilings(tmp_path, text, name="ceilings.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


RULES = """
- name: melt
  where: "model == 'melt'"
  peak_bytes: 50
  peak_decode_bytes: 25
- where: "model == 'melt'"
  flat_in: loops
  tolerance: 0.02
  columns: [peak_bytes, peak_decode_bytes]
- where: "model == 'ouro' and seq_len == 1024 and loops == 4"
  peak_bytes: 100
"""


def _run(tmp_path, results, text=RULES):
    df = load_results(results)
    return check(df, load_ceilings(_ceilings(tmp_path, text)))


def test_all_pass(tmp_path, capsys):
    checks = _run(tmp_path, _sweep(tmp_path))
    assert [c.check for c in checks] == ["peak_bytes", "peak_decode_bytes",
                                         "peak_bytes flat in loops",
                                         "peak_decode_bytes flat in loops", "peak_bytes"]
    assert all(c.ok for c in checks) and checks[0].rows == 6 and checks[2].value == "1.0000 max/min"
    assert main([str(_sweep(tmp_path)), str(tmp_path / "ceilings.yaml")]) == 0
    out = capsys.readouterr().out
    assert "melt (ceilings.yaml#1)" in out and "5 checks: 5 pass, 0 FAIL" in out


def test_absolute_ceiling_fails_and_names_the_row(tmp_path, capsys):
    results = _sweep(tmp_path)
    checks = _run(tmp_path, results, RULES.replace("peak_bytes: 100", "peak_bytes: 90"))
    failed = [c for c in checks if not c.ok]
    assert len(failed) == 1 and failed[0].value == "94.00 MiB" and failed[0].limit == "<= 90 MiB"
    assert failed[0].details == ["model=ouro loops=4 seq_len=1024: peak_bytes 94.00 MiB > 90 MiB"]
    assert main([str(results), str(tmp_path / "ceilings.yaml")]) == 1
    assert "FAIL model=ouro loops=4 seq_len=1024" in capsys.readouterr().out


def test_flat_in_fails_when_the_peak_grows_with_depth(tmp_path):
    grown = _row("melt", 8, 1024, 44 * 1.03)  # 3 % above the other depths at 1024
    checks = _run(tmp_path, _sweep(tmp_path, grown))
    flat = [c for c in checks if c.check == "peak_bytes flat in loops"][0]
    assert not flat.ok and flat.value == "1.0300 max/min" and flat.limit == "<= 1.02"
    assert flat.details == ["model=melt loops=8 seq_len=1024: peak_bytes 45.32 MiB is 1.0300x "
                            "that at loops=1 (44.00 MiB)"]
    # each length is its own group: 256 still passes, and a wider tolerance lets 1024 pass
    assert all(c.ok for c in _run(tmp_path, _sweep(tmp_path, grown),
                                  RULES.replace("tolerance: 0.02", "tolerance: 0.05")))


@pytest.mark.parametrize("status", ["oom", "error"])
def test_oom_or_error_row_fails_the_rule(tmp_path, status):
    bad = _row("melt", 8, 4096, None, status=status, error="OutOfMemoryError: out of memory")
    checks = _run(tmp_path, _sweep(tmp_path, bad))
    failed = [c for c in checks if not c.ok]
    # both MELT rules match the row, and both fail on it; the rows measured still pass
    assert [(c.rule, c.check) for c in failed] == [("melt (ceilings.yaml#1)", "status"),
                                                   ("ceilings.yaml#2", "status")]
    assert failed[0].value == f"1 {status}" and failed[0].limit == "ok"
    assert failed[0].details == [f"model=melt loops=8 seq_len=4096: status {status} "
                                 "(OutOfMemoryError: out of memory)"]


def test_rule_matching_no_row_is_an_error(tmp_path):
    match = r"ceilings.yaml#1: where \"model == 'mlet'\" matches no row"
    with pytest.raises(CeilingError, match=match):
        _run(tmp_path, _sweep(tmp_path), "- where: \"model == 'mlet'\"\n  peak_bytes: 50\n")


@pytest.mark.parametrize("text, message", [
    ("- where: \"modle == 'melt'\"\n  peak_bytes: 50\n", "bad where .*name 'modle' is not defined"),
    ("- where: \"model == \"\n  peak_bytes: 50\n", "bad where"),
    ("- where: \"seq_len\"\n  peak_bytes: 50\n", "is not a condition"),
    ("- where: \"model == 'melt'\"\n  peak_byte: 50\n", "unknown key 'peak_byte'"),
    ("- where: \"model == 'melt'\"\n  decode_tokens_per_s: 50\n", "unknown key"),
    ("- where: \"model == 'melt'\"\n  peak_bytes: -1\n", "a number > 0"),
    ("- where: \"model == 'melt'\"\n", "no check"),
    ("- where: \"model == 'melt'\"\n  flat_in: loop\n  columns: [peak_bytes]\n",
     "flat_in: unknown column 'loop'"),
    ("- where: \"model == 'melt'\"\n  flat_in: loops\n", "flat_in needs 'columns'"),
    ("- where: \"model == 'melt' and loops == 1\"\n  flat_in: loops\n  columns: [peak_bytes]\n",
     "no group of matching ok rows has two values of loops"),
    ("- peak_bytes: 50\n", "'where' is required"),
    ("where: x\n", "expected a YAML list of rules"),
    ("- where: [unclosed\n", r"bad YAML: .*\(line \d+, column \d+\)"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, text, message):
    results = _sweep(tmp_path)
    with pytest.raises(CeilingError, match=message):
        _run(tmp_path, results, text)
    assert main([str(results), str(tmp_path / "ceilings.yaml")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1


def test_reads_a_table_file_and_several_ceilings_files(tmp_path):
    table = tmp_path / "table.csv"
    load_results(_sweep(tmp_path)).to_csv(table, index=False)
    more = _ceilings(tmp_path, "- where: \"model == 'ouro'\"\n  peak_decode_bytes: 60\n", "b.yaml")
    assert main([str(table), str(_ceilings(tmp_path, RULES)), str(more)]) == 0
    with pytest.raises(CeilingError, match="no such file or folder"):
        load_results(tmp_path / "missing")


def test_exit_codes_from_the_command_line(tmp_path):
    results, ceilings = _sweep(tmp_path), _ceilings(tmp_path, RULES)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "bench.ceilings", *map(str, args)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    ok = run(results, ceilings)
    assert ok.returncode == 0, ok.stderr
    failed = run(results, _ceilings(tmp_path, RULES.replace("peak_bytes: 50", "peak_bytes: 41"),
                                    "tight.yaml"))
    assert failed.returncode == 1 and "FAIL" in failed.stdout
    typo = _ceilings(tmp_path, "- where: \"model == 'x'\"\n  peak_bytes: 1\n", "x.yaml")
    bad = run(results, typo)
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1


def test_shipped_cpu_ceilings_pass_on_the_reference_run():
    assert main([str(ROOT / "results/reference/cpu"),
                 str(ROOT / "conf/ceilings/cpu_small.yaml")]) == 0
