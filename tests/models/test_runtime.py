"""The runtime (models/runtime.py) and how the benchmark uses it, on CPU: what a GPU run depends on
and can be proven here. Static caches for CUDA graphs, a compiled sweep longer than dynamo's
recompile limit, a failed timing pass keeping its memory columns, Slurm sweeps checked for their
GPU nodes, timers and the spread of speed figures, attention that never repeats K/V, NVML's
handle under MIG, rows labelled by the device they ran on, and the fair prefill schedule."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import models
from bench.measure import machine
from bench.sweep import preflight
from bench.config import BenchConfig, register, resolve
from bench.rows.files import find_measured, write_row
from bench.rows.schema import identity
from bench.measure.point import measure
from conftest import ROOT
from models import build_model
from models.runtime import Engine, Scenario, StepTimer

CONF = str(ROOT / "conf")
register()  # the schema and resolvers run_bench.py registers


def _point(**kw):
    base = dict(size="tiny", seq_len=48, new_tokens=3, repeats=1, warmup=0)
    return resolve(BenchConfig(**{**base, **kw}))


# -- the compiled step: one graph per layer function, the memory pass's cache reused ------------------

def test_a_compiled_point_compiles_each_layer_function_once(monkeypatch):
    """A compiled LoopLM point (2 layers x 2 loops, every timed repeat on the memory pass's cache):
    dynamo makes one graph, the layer application, and it sees one slot's buffers: a slot reaches
    the compiled layer as an input, never as a constant of the graph."""
    graphs: list[list[torch.Tensor]] = []
    caches = []

    def capture(gm, example_inputs):  # a torch.compile backend that records its graphs' inputs
        graphs.append([t for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    original_init, original_new = Engine.__init__, Engine.new_cache
    monkeypatch.setattr(Engine, "__init__", lambda self, model, compile=False, backend="inductor":
                        original_init(self, model, compile, capture if compile else backend))
    monkeypatch.setattr(Engine, "new_cache", lambda self, *a: caches.append(original_new(self, *a)) or caches[-1])
    row = measure(_point(model="ouro", loops=2, scenario="decode", compile=True, repeats=2))
    assert row["status"] == "ok" and row["timing_status"] == "ok", row["error"] or row["timing_error"]
    (cache,) = caches  # one cache: the memory pass's, reused by the timing pass
    (inputs,) = graphs
    buffers = {id(t) for t in cache.buffers()}
    assert sum(id(t) in buffers for t in inputs) == 2  # K and V of the slot of its first call


def test_a_one_process_sweep_compiles_more_points_than_the_recompile_limit():
    """dynamo keys compiled code on decode_step's code object, which every model shares: without a
    reset per point, the point after the recompile limit (8) fails with fullgraph=True. Ten points
    of distinct shapes, compiled in this one process as the basic launcher runs a sweep (backend
    eager: dynamo's capture without kernels)."""
    lengths = [16, 18, 20, 22, 24, 26, 28, 30, 32, 34]
    assert len(lengths) > torch._dynamo.config.recompile_limit
    rows = [measure(_point(model="standard", seq_len=n, scenario="decode", new_tokens=2, compile=True,
                           compile_backend="eager")) for n in lengths]
    assert [(r["status"], r["timing_status"], r["error"], r["timing_error"]) for r in rows] == [("ok", "ok", None, None)] * 10
    assert all(r["compile"] and r["decode_tokens_per_s"] > 0 for r in rows)


# -- a failed timing pass is recorded, and the memory pass's columns stay ---------------------------------

@pytest.mark.parametrize("failure, status", [(RuntimeError("kernel launch failed"), "error"),
                                             (torch.OutOfMemoryError("out of memory in the timing pass"), "oom")])
def test_a_failed_timing_pass_keeps_the_memory_columns(monkeypatch, tmp_path, failure, status):
    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr(Scenario, "time", broken)
    point = _point(model="melt", loops=2)
    row = measure(point)
    assert row["status"] == "ok" and row["timing_status"] == status
    assert row["timing_error"] == f"{type(failure).__name__}: {failure}"
    assert row["peak_prefill_bytes"] > 0 and row["peak_decode_bytes"] > 0 and row["kv_bytes_measured"] > 0
    assert row["decode_tokens_per_s"] is None
    # A re-run measures the point again after a timing error, not after a timing OOM (that is data).
    write_row(tmp_path / "p", row)
    assert (find_measured(tmp_path, identity(point)) is None) == (status == "error")


# -- Slurm sweeps are resolved for the GPU nodes they run on, from a machine without one ----------------

@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_a_slurm_sweep_gets_the_gpu_values_and_passes_its_preflight_on_a_cpu_machine(device):
    points = preflight.expand(["experiment=default", "hydra/launcher=slurm", f"device={device}"], True, CONF, "config")
    assert len(points) == 30
    assert {(p.size, p.device, p.dtype, p.probe) for p in points} == {("ouro-1.4b", "cuda", "bfloat16", "cuda")}
    assert {p.seq_len for p in points} == {4096, 16384}  # the GPU lengths of experiment=default


def test_a_local_sweep_gets_this_machines_values():
    points = preflight.expand(["experiment=default"], True, CONF, "config")
    gpu = torch.cuda.is_available()
    assert {p.seq_len for p in points} == ({4096, 16384} if gpu else {512, 2048})
    assert {p.size for p in points} == {"ouro-1.4b" if gpu else "small"}


# -- timers and the spread of speed figures --------------------------------------------------------------

def test_the_peer_s_steps_exclude_generates_set_up(monkeypatch):
    """Decode steps are timed from the end of the step before: whatever transformers' generate
    does before its first step (here made slow on purpose) is never part of a step's time."""
    model = build_model("hf_llama", "tiny")
    original = model.hf.generate

    def slow_set_up(*args, **kwargs):
        time.sleep(0.5)
        return original(*args, **kwargs)

    monkeypatch.setattr(model.hf, "generate", slow_set_up)
    engine = Engine(model)
    prompt = torch.randint(0, 256, (1, 16))
    with torch.inference_mode():
        cache = engine.new_cache(1, 22)
        timer = StepTimer("cpu")
        tokens = engine.decode(engine.prefill(prompt, cache), cache, 16, 5, timer=timer)
    steps = timer.intervals()
    assert tokens.shape == (1, 5) and len(steps) == 4
    assert max(steps) < 0.25


def test_machine_limits_time_samples_long_enough(monkeypatch):
    """A single large copy on a GPU takes a fraction of a millisecond: each timed sample repeats
    the work until it lasts machine.SAMPLE_S."""
    calls = []

    def one_ms():
        calls.append(1)
        time.sleep(0.001)

    seconds = machine._best_seconds(one_ms, "cpu", samples=3)
    assert 0.001 <= seconds < 0.003
    per_sample = (len(calls) - 2) / 3  # minus the untimed call and the one that sizes the samples
    assert per_sample >= machine.SAMPLE_S / 0.0015


def test_speed_columns_give_their_spread_over_repeats():
    row = measure(_point(model="standard", repeats=3, new_tokens=4))
    for column in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        assert row[f"{column}_min"] <= row[column] <= row[f"{column}_max"], column
    assert row["device_bandwidth_bytes_per_s"] is None  # no GPU: no theoretical bandwidth


def test_the_throughput_plot_draws_the_spread(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from bench.report.plots import plot_throughput
    from bench.report.views import plot_view
    from bench.rows.schema import IDENTITY

    bars = []
    monkeypatch.setattr(Axes, "errorbar", lambda self, *a, **k: bars.append(k["yerr"]))
    rows = pd.DataFrame([dict(model="standard", loops=1, seq_len=s, batch=1, scenario="decode", status="ok",
                              prefill="chunked", decode_tokens_per_s=100.0, decode_tokens_per_s_min=90.0,
                              decode_tokens_per_s_max=120.0) for s in (128, 256)])
    plot_throughput(plot_view(rows.reindex(columns=rows.columns.union(IDENTITY))), tmp_path / "t.png")
    (yerr,) = bars
    assert list(yerr[0]) == [10.0, 10.0] and list(yerr[1]) == [20.0, 20.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_step_timer_times_gpu_work_with_events():
    timer = StepTimer("cuda")
    a = torch.randn(4096, 4096, device="cuda")
    timer.mark()
    for _ in range(10):
        a = a @ a / 64
    timer.mark()
    (seconds,) = timer.intervals()
    assert 0 < seconds < 10 and all(isinstance(m, torch.cuda.Event) for m in timer.marks)


# -- attention: grouped-query attention never repeats K/V ---------------------------------------------

def test_grouped_query_attention_never_repeats_kv(monkeypatch):
    """A masked SDPA call with enable_gqa has no fused GPU kernel and falls back to the math kernel,
    which repeats K/V per query head. With a mask (chunks after the first, every decode step) the
    query heads are folded along the query axis instead: K/V go in as the cache holds them."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), attn_mask is not None, enable_gqa))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = build_model("ouro", "tiny", loops=2)  # 4 query heads over 2 KV heads
    assert model.config.num_attention_heads == 2 * model.config.num_key_value_heads
    engine = Engine(model)
    with torch.inference_mode():
        cache = engine.new_cache(1, 40)
        engine.decode(engine.prefill(torch.randint(0, 256, (1, 36)), cache, chunk_size=16), cache, 36, 3)
    masked = [c for c in calls if c[2]]
    assert masked and all(not gqa and q[1] == k[1] == 2 for q, k, _, gqa in masked)
    assert all(c[3] for c in calls if not c[2])  # the causal first chunk: SDPA's own grouped kernel


def test_grouped_attention_matches_the_repeated_reference():
    from models.layers import attend

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    mask = torch.rand(5, 12) > 0.3
    mask[:, 0] = True
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask)
    torch.testing.assert_close(attend(q, k, v, mask), expected)
    torch.testing.assert_close(attend(q[:, :, :1], k, v, mask[:1]), expected[:, :, :1])


@pytest.mark.parametrize("size, seq_len, probe", [("tiny", 600, "tracked"), ("tiny", 600, "fake"),
                                                   ("small", 4096, "tracked")])
def test_attention_peaks_are_the_memory_model_s(size, seq_len, probe):
    """The peaks of a GQA model (tiny: 4 query heads over 2 KV heads) and of a long context, where
    the attention of a masked chunk (its float mask) outgrows the MLP, equal the analytic memory
    model to the byte: nothing it does not account for (a repeated K/V, a mask copy)."""
    row = measure(_point(model="standard", size=size, seq_len=seq_len, chunk_size=128, new_tokens=4, repeats=0,
                         probe=probe))
    assert row["status"] == "ok", row["error"]
    assert row["peak_prefill_bytes"] == row["predicted_prefill_bytes"]
    assert row["peak_decode_bytes"] == row["predicted_decode_bytes"]


# -- NVML and the environment columns ---------------------------------------------------------------

def test_nvml_finds_a_mig_slice_by_its_uuid(monkeypatch):
    """torch gives the UUID bare; NVML names a MIG slice 'MIG-<uuid>' and a whole GPU 'GPU-<uuid>'."""
    def by_uuid(name):
        if name != "MIG-1234":
            raise RuntimeError(f"NVML: no device {name}")
        return "mig handle"

    fake = SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetHandleByUUID=by_uuid)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid="1234"))
    machine._nvml_handle.cache_clear()
    try:
        assert machine._nvml_handle() == "mig handle"
    finally:
        machine._nvml_handle.cache_clear()


def test_rows_name_the_device_they_ran_on(monkeypatch):
    """A CPU point on a machine with a GPU is labelled with the CPU, not the GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    machine._static.cache_clear()
    try:
        assert machine.info("cpu")["gpu_name"].startswith("CPU: ")
        assert machine.info("cuda")["gpu_name"] == "Some GPU"
    finally:
        machine._static.cache_clear()


# -- the prefill schedule -------------------------------------------------------------------------

@pytest.mark.parametrize("name, options", [("standard", {}), ("ouro", {}), ("ouro", {"kv_sharing": "last_loop"})])
def test_chunked_prefill_is_the_one_pass_prefill(name, options):
    """Every loop of a chunk before the next chunk: exact for the standard model and the LoopLM
    (last-loop sharing keeps every loop's slot until the whole prompt is in)."""
    torch.manual_seed(0)
    model = build_model(name, "tiny", loops=3, **options)
    ids = torch.randint(0, 256, (2, 40))
    with torch.inference_mode():
        one, chunked = model.new_cache(2, 44), model.new_cache(2, 44)
        expected = model(ids, cache=one)
        torch.testing.assert_close(model(ids, cache=chunked, chunk_size=[16, 1, 9, 14]), expected,
                                   atol=2e-5, rtol=1e-4)
        step = torch.randint(0, 256, (2, 1))
        torch.testing.assert_close(model(step, cache=chunked, start_pos=40), model(step, cache=one, start_pos=40),
                                   atol=2e-5, rtol=1e-4)
    assert one.num_slots == chunked.num_slots


@pytest.mark.parametrize("seq_len", [100, 300])
def test_at_one_loop_and_equal_chunking_melt_is_the_standard_model_plus_its_gates(seq_len):
    """The fair comparison: same prefill chunks, one loop. MELT then holds exactly what the
    standard model holds, plus its gate weights (tracked probe, exact bytes)."""
    common = dict(size="small", loops=1, seq_len=seq_len, chunk_size=128, new_tokens=4, repeats=0)
    standard, melt = measure(_point(model="standard", **common)), measure(_point(model="melt", **common))
    gates = melt["weights_bytes"] - standard["weights_bytes"]
    assert gates == models.build_model("melt", "small", device="meta").weights_bytes() - \
        models.build_model("standard", "small", device="meta").weights_bytes() > 0
    for column in ("peak_prefill_bytes", "peak_decode_bytes", "peak_bytes"):
        assert melt[column] - standard[column] == gates, column


def test_one_pass_is_one_setting_away():
    chunked, one_pass = (measure(_point(model=m, size="small", loops=4, seq_len=300, chunk_size=128,
                                        prefill=prefill, repeats=0))
                         for m, prefill in (("ouro", "chunked"), ("ouro", "one_pass")))
    assert (chunked["prefill"], one_pass["prefill"]) == ("chunked", "one_pass")
    assert one_pass["peak_prefill_bytes"] > chunked["peak_prefill_bytes"]  # one pass: larger activations
    assert one_pass["kv_bytes_measured"] == chunked["kv_bytes_measured"]
