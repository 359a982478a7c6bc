"""A check's outcome, and how a point is named: what the ceilings and the guards both report."""

from __future__ import annotations

import math
from dataclasses import dataclass

# What names a point in a ceilings file; rows that agree on these must agree on everything else.
# (policy: the cache design, models.cache_policies.policy_name: the LoopLM's kv_sharing, else the model)
KEY = ["policy", "size", "loops", "seq_len", "batch", "scenario", "dtype", "probe", "prefill"]
LIMITED = ["peak_bytes", "peak_decode_bytes"]  # the columns a ceiling limits


@dataclass
class Finding:
    check: str       # "ceiling" or a guard's name
    point: str       # key=value ... of the point (or the pair of points)
    ok: bool
    detail: str      # the measured bytes, the limit, the excess


def point_name(row) -> str:
    """'policy=melt size=small loops=4 ...': a row's KEY values."""
    return " ".join(f"{k}={row[k]}" for k in KEY)


def norm(value):
    """Key values as plain Python (1 == 1.0 == numpy 1), so YAML and table entries match."""
    if isinstance(value, float) and math.isnan(value):
        return None  # a missing value, as pandas reads it
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value.item() if hasattr(value, "item") else value
