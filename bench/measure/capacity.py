"""The capacity search (experiment `capacity`): at a memory budget, how many sequences of this
length fit, and what decode throughput does that batch give?

For one model, seq_len and loops: run the point (prefill of the whole batch, then decode) at
batch 1, 2, 4, ... until one runs out of memory, then bisect between the last batch that fitted
and the first that did not. Every trial is a row of its own (status ok or oom: an OOM is data),
measured for memory only; the largest batch that fits is then measured again with timing, and that
row carries capacity_max_batch, capacity_first_oom and budget_bytes.

The budget is enforced as mem_limit_mib is: the tracked and fake probes raise past it (CPU), the
CUDA allocator refuses past it (GPU). Default budget: the GPU's free memory when the search starts.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ..config import BenchConfig
from ..rows.files import RESULT_FILE, write_row

log = logging.getLogger("bench")

MAX_BATCH = 4096  # the doubling stops here even if everything fits


def budget_bytes(point: BenchConfig) -> int:
    """budget_gb in bytes (decimal GB), or the GPU's free memory now."""
    if point.budget_gb is not None:
        return int(point.budget_gb * 1e9)
    free, _ = torch.cuda.mem_get_info()
    return int(free)


def search(point: BenchConfig, out_dir: Path, measure) -> dict:
    """Find the largest batch of `point` within its budget; trial rows go to
    out_dir/trials/batch=N/, and the returned row (the timed one at the largest batch, or the
    failing row at batch 1) is for the caller to write. `measure(point, timed)` -> a row."""
    budget = budget_bytes(point)
    limited = dataclasses.replace(point, mem_limit_mib=budget / 2**20)
    rows: dict[int, dict] = {}

    def fits(batch: int) -> bool | None:
        """True / False (an OOM), or None when the trial failed otherwise (the search stops)."""
        row = measure(dataclasses.replace(limited, batch=batch), timed=False)
        rows[batch] = row
        write_row(out_dir / "trials" / f"batch={batch}", row)
        figures = (f"peak {row['peak_bytes'] / 2**20:.1f} MiB" if row["status"] == "ok"
                   else row.get("error") or "")
        log.info("capacity %s loops=%s seq_len=%s, budget %.3f GB: batch %d %s | %s", point.model,
                 point.loops, point.seq_len, budget / 1e9, batch, row["status"], figures)
        return {"ok": True, "oom": False}.get(row["status"])

    lo, hi, batch = 0, None, 1
    while hi is None and batch <= MAX_BATCH:        # doubling: 1, 2, 4, ... until an OOM
        ok = fits(batch)
        if ok is None:
            return _final(rows[batch], budget, None, None)
        lo, hi, batch = (batch, None, batch * 2) if ok else (lo, batch, batch)
    while hi is not None and hi - lo > 1:           # bisection between the last fit and first OOM
        mid = (lo + hi) // 2
        ok = fits(mid)
        if ok is None:
            return _final(rows[mid], budget, None, None)
        lo, hi = (mid, hi) if ok else (lo, mid)
    if lo == 0:                                     # not even one sequence fits: the OOM row
        return _final(rows[1], budget, 0, 1)
    if hi is None:
        log.warning("capacity %s: every batch up to %d fits within %.3f GB; %d is a lower bound",
                    point.model, MAX_BATCH, budget / 1e9, lo)
    # The largest batch again, timed: its row replaces that trial's (same identity). A timing pass
    # that fails (it allocates too) is recorded in the row's timing_status; if the memory pass
    # itself fails this time, the trial's untimed row stays the evidence.
    timed = measure(dataclasses.replace(limited, batch=lo), timed=True)
    if timed["status"] != "ok":
        log.warning("capacity %s: the timed run at batch %d ended %s (%s); keeping the untimed trial",
                    point.model, lo, timed["status"], timed.get("error"))
        return _final(rows[lo], budget, lo, hi)
    if timed["timing_status"] not in (None, "ok"):
        log.warning("capacity %s: batch %d fits, but its timing pass ended %s (%s)", point.model, lo,
                    timed["timing_status"], timed.get("timing_error"))
    (out_dir / "trials" / f"batch={lo}" / RESULT_FILE).unlink()
    return _final(timed, budget, lo, hi)


def _final(row: dict, budget: int, max_batch: int | None, first_oom: int | None) -> dict:
    return {**row, "budget_bytes": budget, "capacity_max_batch": max_batch, "capacity_first_oom": first_oom}
