"""What profile=timeline costs a point's memory pass.

    python -m bench.sweep.profile_cost [overrides...]     # default: MELT, small, 2,048 tokens, loops 4

Wall seconds of the memory pass (nothing timed) without a profile and with profile=timeline, the
median of a few runs each, and their ratio.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

from ..measure.point import measure
from .preflight import compose_point


def cost(overrides: list[str], repeats: int = 3) -> dict:
    """{"none": s, "timeline": s, "ratio": timeline / none} for the point `overrides` name."""
    point = compose_point([*overrides, "repeats=0", "warmup=0"])
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for profile in ("none", "timeline"):
            profiled = dataclasses.replace(point, profile=profile)
            runs = [measure(profiled, timed=False, folder=Path(tmp) / f"{profile}{i}")["wall_s"]
                    for i in range(repeats)]
            seconds[profile] = statistics.median(runs)
    return {**seconds, "ratio": seconds["timeline"] / seconds["none"]}


if __name__ == "__main__":
    args = sys.argv[1:] or ["model=melt", "size=small", "seq_len=2048", "loops=4", "new_tokens=16"]
    result = cost(args)
    print(f"memory pass of {' '.join(args)}: {result['none']:.2f} s without a profile, "
          f"{result['timeline']:.2f} s with profile=timeline: x{result['ratio']:.2f}")
