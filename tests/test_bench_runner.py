"""One point measured in-process on the tiny models: ok, oom and error rows."""

import models
import pytest

from bench.config import BenchConfig, resolve
from bench.results import COLUMNS
from bench.runner import measure


def _point(**kw):
    base = dict(size="tiny", seq_len=48, new_tokens=3, repeats=1, warmup=0)
    return resolve(BenchConfig(**{**base, **kw}))


@pytest.mark.parametrize("scenario", ["prefill", "decode", "generate"])
def test_measure_fills_the_row(scenario):
    row = measure(_point(model="ouro", loops=2, scenario=scenario))
    assert row["status"] == "ok", row["error"]
    assert list(row) == COLUMNS
    assert row["kv_bytes_measured"] == row["kv_bytes_analytic"]  # the probe agrees with the model
    assert row["baseline_bytes"] == row["weights_bytes"]  # nothing but weights after load
    assert row["peak_bytes"] > row["weights_bytes"] + row["kv_bytes_measured"]
    assert row["prefill_tokens_per_s"] > 0
    decodes = scenario != "prefill"
    assert (row["decode_tokens_per_s"] is not None) == decodes
    if decodes:
        assert row["token_latency_ms_p90"] >= row["token_latency_ms_p50"] > 0
    assert row["peak_bytes"] == max(v for k, v in row.items()
                                    if k in ("peak_prefill_bytes", "peak_decode_bytes") and v
                                    and (scenario == "generate" or k.startswith(f"peak_{scenario}")))


def test_memory_limit_gives_an_oom_row():
    row = measure(_point(model="ouro", loops=4, mem_limit_mib=0.2))
    assert row["status"] == "oom" and "out of memory" in row["error"]
    assert row["peak_bytes"] is None


def test_other_failures_give_an_error_row(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("broken on purpose")

    monkeypatch.setattr(models, "build_model", broken)
    row = measure(_point(model="melt"))
    assert row["status"] == "error" and row["error"] == "ValueError: broken on purpose"


@pytest.mark.parametrize("model", ["standard", "ouro", "melt"])
def test_fake_probe_estimates_what_tracked_measures(model):
    tracked = measure(_point(model=model, loops=2, probe="tracked"))
    fake = measure(_point(model=model, loops=2, probe="fake"))
    assert fake["status"] == "ok", fake["error"]
    for column in ("peak_bytes", "peak_prefill_bytes", "peak_decode_bytes", "kv_bytes_measured",
                   "baseline_bytes"):
        assert abs(fake[column] - tracked[column]) <= 0.01 * tracked[column], column
    assert fake["decode_tokens_per_s"] is None  # nothing ran, nothing is timed


def test_a_runtime_error_saying_out_of_memory_is_an_oom(monkeypatch):
    def cublas_failure(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory\nmore lines")

    monkeypatch.setattr(models, "build_model", cublas_failure)
    row = measure(_point(model="ouro"))
    assert row["status"] == "oom" and row["error"] == "RuntimeError: CUDA error: out of memory"
