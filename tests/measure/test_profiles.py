"""Where the memory goes (bench/measure/probes.py, bench/measure/profiles.py): each phase's peak by owner, the
timeline of a memory pass, the process's peak RSS, and CUDA snapshots (recorded on CUDA only, and
never while anything is timed)."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
import torch

from bench.measure import point, profiles
from bench.rows import files
from bench.config import BenchConfig, resolve
from bench.measure.point import measure


def _point(**kw):
    return resolve(BenchConfig(**{**dict(size="tiny", seq_len=300, chunk_size=128, new_tokens=4, repeats=0,
                                         warmup=0), **kw}))


@pytest.mark.parametrize("probe", ["tracked", "fake"])
@pytest.mark.parametrize("model", ["standard", "ouro", "melt", "loopcoder"])
def test_weights_kv_and_activations_sum_to_the_peak(model, probe):
    row = measure(_point(model=model, loops=3, probe=probe))
    for phase in ("prefill", "decode"):
        parts = [row[f"{phase}_{c}_bytes"] for c in ("weights", "kv", "activations")]
        assert sum(parts) == row[f"peak_{phase}_bytes"], phase
    assert row["prefill_weights_bytes"] == row["weights_bytes"] == row["predicted_weights_bytes"]
    assert row["prefill_kv_bytes"] == row["kv_bytes_measured"] == row["predicted_kv_bytes"]
    assert row["decode_kv_bytes"] == row["kv_decode_bytes_analytic"] == row["predicted_kv_decode_bytes"]
    if model != "loopcoder":
        assert row["prefill_activations_bytes"] == row["predicted_prefill_activations_bytes"]
        assert row["decode_activations_bytes"] == row["predicted_decode_activations_bytes"]
    assert row["prefill_allocator_bytes"] is None  # CUDA only
    assert row["process_peak_rss_bytes"] > row["peak_bytes"]


def test_a_merging_policy_holds_less_kv_in_decode_than_in_prefill():
    row = measure(_point(model="ouro", loops=4, kv_sharing="last_loop"))
    assert row["prefill_kv_bytes"] == 4 * row["decode_kv_bytes"]


def test_the_peer_s_growing_cache_counts_as_activations_while_it_grows():
    """transformers' DynamicCache makes a new tensor each time it grows, inside the model: those
    are activations until a phase ends (then the probe labels what the cache holds as KV)."""
    row = measure(_point(model="hf_llama"))
    for phase in ("prefill", "decode"):
        parts = sum(row[f"{phase}_{c}_bytes"] for c in ("weights", "kv", "activations"))
        assert parts == row[f"peak_{phase}_bytes"] and row[f"{phase}_kv_bytes"] == 0


def test_a_timeline_records_every_category_and_marks_chunks_and_loops(tmp_path):
    row = measure(_point(model="ouro", loops=3, profile="timeline"), folder=tmp_path)
    samples = pd.read_parquet(tmp_path / files.TIMELINE_FILE)
    marks = pd.read_parquet(tmp_path / files.MARKS_FILE)
    assert samples.op.is_monotonic_increasing
    total = samples[["weights", "kv", "activations"]].sum(axis=1)
    assert total.max() == row["peak_bytes"]
    assert list(marks[marks.kind == "phase"].label) == ["prefill", "decode"]
    chunks, loops = (marks.kind == "chunk").sum(), (marks.kind == "loop").sum()
    assert chunks == 3 + 4 and loops == 3 * chunks   # 3 prefill chunks of <= 128, then 4 decode steps
    # the written part of the LoopLM's cache grows loop by loop to all of its prompt rows
    written = samples.kv_written
    assert written.is_monotonic_increasing and written.iloc[-1] == row["kv_bytes_measured"] * 300 // 304


def test_without_a_profile_nothing_is_recorded(tmp_path):
    measure(_point(model="melt"), folder=tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_snapshot_on_cpu_is_skipped_with_one_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="bench"):
        row = measure(_point(model="melt", profile="snapshot"), folder=tmp_path)
    assert row["status"] == "ok" and not list(tmp_path.iterdir())
    assert "no CUDA device for this point" in caplog.text


def test_a_snapshot_records_the_memory_pass_only(tmp_path, monkeypatch):
    """The recorder of torch.cuda.memory, stood in for on CPU: started before the model is built,
    dumped and stopped before the timing pass."""
    events = []
    monkeypatch.setattr(profiles, "snapshot_possible", lambda p: True)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history",
                        lambda enabled="all", **kw: events.append("stop" if enabled is None else "start"))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", lambda path: events.append(("dump", path)))
    timing = point.Scenario.time
    monkeypatch.setattr(point.Scenario, "time", lambda *a, **k: events.append("timing") or timing(*a, **k))
    build = point.Engine.__init__
    monkeypatch.setattr(point.Engine, "__init__", lambda self, *a, **k: events.append("build") or build(self, *a, **k))
    row = measure(_point(model="melt", profile="snapshot", repeats=1), folder=tmp_path)
    assert row["status"] == "ok" and row["timing_status"] == "ok"
    assert events == ["start", "build", ("dump", str(tmp_path / files.SNAPSHOT_FILE)), "stop", "timing"]


def test_profile_is_part_of_a_point_s_identity():
    from bench.rows.schema import IDENTITY

    assert "profile" in IDENTITY
    with pytest.raises(Exception, match="^profile: unknown value 'everything'"):
        _point(profile="everything")
