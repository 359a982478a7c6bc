"""Every structural guard (bench/gate/guards.py), and every check inside one, against the
regression it exists to catch: synthetic rows that pass every guard, then one value changed the
way the bug would change it, and that guard fails, at that point only. No model runs here."""

from __future__ import annotations

import pytest

from bench.gate.ceilings import load_results
from bench.gate.guards import GUARDS, check_guards
from bench.rows.files import write_row

KV = 1_000_000          # the standard model's KV bytes at 256 tokens
GATES = 10_000_000      # MELT's extra weights
ON = {name: (0.0 if name in ("melt_flat_in_loops", "policy_flat_in_loops") else True) for name in GUARDS}


def _row(model: str, loops: int, peak: int, decode: int, kv_slots: float, **kw) -> dict:
    return dict(model=model, size="small", loops=loops, seq_len=256, batch=1, new_tokens=8, scenario="generate",
                dtype="float32", device="cpu", probe="tracked", prefill="chunked", chunk_size=500, status="ok",
                timestamp="2026-01-01T00:00:00+00:00", peak_bytes=peak, peak_decode_bytes=decode,
                kv_bytes_measured=int(kv_slots * KV), weights_bytes=5_000_000 + (GATES if model == "melt" else 0), **kw)


def _rows() -> dict[str, dict]:
    """Rows that every guard passes, by name: the standard model; MELT at 1, 2 and 4 loops (one
    loop: standard + gates); the per-loop LoopLM at 1 and 4 (its cache loops x standard, its decode
    cache too); last-loop sharing at 2 and 4 (4 slots per layer group while the prompt goes in,
    one after: its decode peak flat); a ring of 2 at 2 and 4 (its cache flat: both peaks flat);
    LoopCoder with a window of 64 at 3 loops (standard + 2 windows of 64 of 264 rows)."""
    standard = 30_000_000
    return {
        "standard": _row("standard", 1, standard, standard - 9_000_000, 1),
        "melt1": _row("melt", 1, standard + GATES, standard - 9_000_000 + GATES, 1),
        "melt2": _row("melt", 2, 41_000_000, 31_000_000, 1),
        "melt4": _row("melt", 4, 41_000_000, 31_000_000, 1),
        "ouro1": _row("ouro", 1, 31_000_000, 21_000_000, 1, kv_decode_bytes_analytic=KV),
        "ouro4": _row("ouro", 4, 34_000_000, 24_000_000, 4, kv_decode_bytes_analytic=4 * KV),
        "last2": _row("ouro", 2, 32_000_000, 21_000_000, 2, kv_sharing="last_loop", kv_bytes_analytic=2 * KV,
                      kv_decode_bytes_analytic=KV),
        "last4": _row("ouro", 4, 34_000_000, 21_000_000, 4, kv_sharing="last_loop", kv_bytes_analytic=4 * KV,
                      kv_decode_bytes_analytic=KV),
        "ring2": _row("ouro", 2, 32_000_000, 22_000_000, 2, kv_sharing="ring", kv_ring=2, kv_bytes_analytic=2 * KV,
                      kv_decode_bytes_analytic=2 * KV),
        "ring4": _row("ouro", 4, 32_000_000, 22_000_000, 2, kv_sharing="ring", kv_ring=2, kv_bytes_analytic=2 * KV,
                      kv_decode_bytes_analytic=2 * KV),
        "coder": _row("loopcoder", 3, 33_000_000, 23_000_000, 1 + 2 * 64 / 264, kv_window=64),
    }


def _failures(tmp_path, rows: dict[str, dict]) -> list:
    for name, row in rows.items():
        write_row(tmp_path / "points" / name, row)
    return [f for f in check_guards(load_results(tmp_path), ON) if not f.ok]


def test_the_rows_pass_every_guard(tmp_path):
    assert _failures(tmp_path, _rows()) == []


# (guard, the row it breaks, the column, the value the regression gives it), each from the bug it
# stands for: MELT's peak growing with depth (prefill, or decode only), MELT at one loop holding more
# than the standard model and its gates, a LoopLM cache not loops x standard, MELT keeping a slot per
# loop, a cache policy's cache (as allocated, or after the prefill) not its formula, LoopCoder's
# windows not min(W, L) rows, a policy's peak growing with depth at the same cache size.
REGRESSIONS = [
    ("melt_flat_in_loops", "melt4", "peak_bytes", 41_000_001),
    ("melt_flat_in_loops", "melt4", "peak_decode_bytes", 31_000_001),
    ("melt_one_loop_is_standard", "melt1", "peak_bytes", 30_000_000 + GATES + 1),
    ("melt_one_loop_is_standard", "melt1", "peak_decode_bytes", 21_000_000 + GATES - 1),
    ("ouro_kv_is_loops_x_standard", "ouro4", "kv_bytes_measured", 3 * KV),
    ("melt_kv_is_standard", "melt2", "kv_bytes_measured", 2 * KV),
    ("policy_kv_is_formula", "ring4", "kv_bytes_measured", 4 * KV),
    ("policy_kv_is_formula", "last4", "kv_decode_bytes_analytic", 4 * KV),
    ("policy_kv_is_formula", "coder", "kv_bytes_measured", 3 * KV),
    ("policy_flat_in_loops", "ring4", "peak_bytes", 32_000_001),
    ("policy_flat_in_loops", "last4", "peak_decode_bytes", 21_000_001),
]


@pytest.mark.parametrize("guard, name, column, value", REGRESSIONS,
                         ids=[f"{g}-{n}-{c}" for g, n, c, _ in REGRESSIONS])
def test_each_guard_catches_its_regression_at_its_point(tmp_path, guard, name, column, value):
    rows = _rows()
    rows[name][column] = value
    failed = _failures(tmp_path, rows)
    # the guard fails (another may too: a per-loop LoopLM's cache is also a policy's formula)
    assert guard in {f.check for f in failed}, [(f.check, f.point, f.detail) for f in failed]
    model, loops = rows[name]["model"], rows[name]["loops"]
    assert all(f"loops={loops}" in f.point and (model in f.point or rows[name].get("kv_sharing", "") in f.point)
               for f in failed), [f.point for f in failed]


def test_every_guard_has_a_regression_test():
    assert {guard for guard, *_ in REGRESSIONS} == set(GUARDS)
