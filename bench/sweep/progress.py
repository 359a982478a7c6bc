"""The progress line each point logs: where the sweep is, how long it has run, what the point gave.

    point 3 of 22 | elapsed 00:01:12 | MELT loops=4 seq_len=2048 batch=1: ok | peak 47.2 MiB
"""

from __future__ import annotations

import logging
import os
import time

from ..rows.labels import design_label

log = logging.getLogger("bench")

# Set by the preflight for the progress lines (the launcher does not tell a job how many there are).
POINTS_ENV, START_ENV = "MELTBENCH_POINTS", "MELTBENCH_START"


def announce(points: int) -> None:
    """Tell this process's points (and the jobs it launches) how many there are, from now."""
    os.environ[POINTS_ENV] = str(points)
    os.environ[START_ENV] = str(time.time())


def progress(job_num: int, row: dict, what: str) -> None:
    """Log one point's line: its number, the sweep's elapsed time, its design and `what` happened."""
    total = os.environ.get(POINTS_ENV, "?")
    start = float(os.environ.get(START_ENV, time.time()))
    elapsed = time.strftime("%H:%M:%S", time.gmtime(time.time() - start))
    figures = ""
    if row.get("status") == "ok":
        figures = f"peak {row['peak_bytes'] / 2**20:.1f} MiB"
        if row.get("decode_tokens_per_s"):
            figures += f", decode {row['decode_tokens_per_s']:.1f} tok/s"
    elif row.get("error"):
        figures = row["error"]
    design = design_label(row) if row.get("policy") else row["model"]  # 'LoopLM ring (K=2)', 'MELT', ...
    log.info("point %d of %s | elapsed %s | %s loops=%s seq_len=%s batch=%s: %s%s",
             job_num + 1, total, elapsed, design, row["loops"], row["seq_len"], row["batch"],
             what, f" | {figures}" if figures else "")
