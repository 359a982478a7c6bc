"""The memory model (bench/measure/memory_model.py) equals the tracked probe to the byte for every
model option and its values, both prefill schedules and batch > 1, not only the CI grid."""

from __future__ import annotations

import pytest

from bench.config import BenchConfig, resolve
from bench.measure.point import measure

OPTIONS = [
    ("standard", {}), ("standard", {"prefill": "one_pass"}), ("standard", {"batch": 2}),
    ("ouro", {}), ("ouro", {"prefill": "one_pass"}), ("ouro", {"batch": 2}),
    *[("ouro", {"kv_sharing": p}) for p in ("last_loop", "first_loop", "mean_loops", "first_writes")],
    ("ouro", {"kv_sharing": "last_loop", "prefill": "one_pass"}),
    ("ouro", {"kv_sharing": "ring", "kv_ring": 1}), ("ouro", {"kv_sharing": "ring", "kv_ring": 2}),
    ("ouro", {"kv_sharing": "anchor", "kv_anchor": 1, "kv_ring": 2}),
    ("ouro", {"exit_policy": "threshold", "exit_threshold": 0.5}), ("ouro", {"exit_policy": "fixed", "exit_step": 2}),
    ("ouro", {"exit_policy": "threshold", "exit_threshold": 0.5, "batch": 2}),
    ("melt", {}), ("melt", {"batch": 2}), ("melt", {"chunk_size": 7}), ("melt", {"init_latent": "zero"}),
    *[("melt", {"cache_update": u}) for u in ("last", "mean", "ema", "scalar")],
    ("loopcoder", {}), ("loopcoder", {"kv_window": 8}), ("loopcoder", {"kv_window": 8, "batch": 2}),
]


@pytest.mark.parametrize("scenario", ["generate", "prefill", "decode"])
@pytest.mark.parametrize("model, options", OPTIONS, ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items())}"
                                                          for m, o in OPTIONS])
def test_predicted_peaks_equal_the_tracked_probe(model, options, scenario):
    point = {"size": "tiny", "seq_len": 40, "new_tokens": 3, "loops": 3, "repeats": 0, "warmup": 0,
             "chunk_size": 16, "scenario": scenario, **options}
    row = measure(resolve(BenchConfig(model=model, **point)))
    assert row["status"] == "ok", row["error"]
    for phase in ("prefill", "decode"):
        assert row[f"predicted_{phase}_bytes"] == row[f"peak_{phase}_bytes"], phase
        assert row[f"predicted_{phase}_activations_bytes"] == row[f"{phase}_activations_bytes"], phase
    assert row["predicted_kv_bytes"] == row["kv_bytes_measured"]
