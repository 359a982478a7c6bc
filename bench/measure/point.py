"""One resolved point measured: build the model, open the probe, run the scenario, return the row.

    row = measure(point)          # memory pass (the probe's peaks), then timing pass (speed)

The scenario itself (prefill, decode steps, scoring, their timers) runs in models/runtime.py; here
the point is set up around it: the model and cache under the probe's owners, each phase under its
own peak, the timings turned into the speed columns, and every failure turned into a row.
"""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path

import numpy as np
import torch

from models import MODEL_CLASSES, MODEL_NAMES, build_model
from models.cache_policies import policy_name
from models.runtime import Engine, Scenario, Timings

from ..config import BenchConfig
from ..rows.files import DRIFT_FILE, atomic_file
from ..rows.schema import BREAKDOWN_CATEGORIES, COLUMNS, identity
from . import machine, profiles
from .drift import kv_drift
from .memory_model import predict_point
from .probes import Phase, make_probe
from .roofline import speed_columns
from .scored_text import encode


def measure(point: BenchConfig, timed: bool = True, folder: Path | None = None) -> dict:
    """Measure a resolved point. An out-of-memory error is a result (status=oom); any other failure
    is status=error with its message: a sweep always gets its row and goes on. A failed timing pass
    keeps the memory pass's columns and says why in timing_status / timing_error. timed=False:
    memory only (the capacity search's trials). `folder`: where a profile (profile=timeline or
    snapshot) writes its file; none without it."""
    start = time.perf_counter()
    row = blank_row(point)
    # What lives before the point is not the point's garbage: frozen, the collection below scans
    # only what the point made (a full collection of a sweep's heap took ~0.2 s a point).
    gc.freeze()
    try:
        row.update(_measure(point, timed, folder))
    except Exception as e:  # noqa: BLE001 - every failure becomes a row
        row.update(status=failure_status(e), error=failure_message(e))
    # The exception (and the frames holding model and cache) is gone here: give the memory back
    # before the next point, which may run in this same process.
    gc.collect()
    gc.unfreeze()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row["wall_s"] = round(time.perf_counter() - start, 3)
    return row


def blank_row(point: BenchConfig) -> dict:
    """A point's row before it is measured: its identity, design, environment and the memory the
    model predicts for it (which stands even when the point runs out of memory or never runs)."""
    row = {**dict.fromkeys(COLUMNS), **identity(point), **machine.info(point.device), "status": "ok",
           "policy": policy_name(point.model, point.kv_sharing)}
    if point.model in MODEL_NAMES:
        row.update(predict_point(point).columns(point.scenario))
    return row


def failure_status(e: BaseException) -> str:
    """oom for an out-of-memory error (torch's, or a library's RuntimeError saying so), else error."""
    oom = isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))
    return "oom" if oom else "error"


def failure_message(e: BaseException) -> str:
    """'<ExceptionType>: <its message's first line>', for a row's error column."""
    message = str(e).strip()
    return f"{type(e).__name__}: {message.splitlines()[0] if message else ''}"


def _measure(p: BenchConfig, timed: bool = True, folder: Path | None = None) -> dict:
    probe = make_probe(p.probe, None if p.mem_limit_mib is None else int(p.mem_limit_mib * 2**20))
    timed = timed and probe.timed and p.repeats > 0 and p.scenario != "score"  # repeats=0: memory only
    # The machine's limits, measured once per process and before any model is built (their
    # buffers are gone when the point's memory is measured).
    limits = machine.limits(p.device, p.dtype) if timed else {}
    torch.manual_seed(p.seed)
    # The memory pass runs under no_grad, not inference_mode: in inference mode a composite op
    # (scaled_dot_product_attention) reaches the probes whole and makes its temporaries (the float
    # copy of a bool mask) below them, unseen; under no_grad the probes see each op it is made of.
    with torch.no_grad():
        scenario, row = _memory_pass(p, probe, folder)
    if timed:  # outside the probe: the tracked probe's bookkeeping would slow it down
        row["timing_status"] = "ok"
        try:
            with torch.inference_mode():
                timings = scenario.time(p.repeats)
            row.update(limits, **_speed(p, scenario.engine.model, timings, limits))
        except Exception as e:  # noqa: BLE001 - the memory columns stand; say why there is no speed
            row.update(timing_status=failure_status(e), timing_error=failure_message(e))
    return row


def _build(p: BenchConfig):
    """The point's model: random weights at its size preset, or its checkpoint's (loops and model
    options apply on top)."""
    dtype = getattr(torch, p.dtype)
    if p.checkpoint is None:
        return build_model(p.model, size=p.size, loops=p.loops, dtype=dtype, device=p.device, **p.model_options())
    return MODEL_CLASSES[p.model].from_pretrained(p.checkpoint, dtype=dtype, device=p.device, loops=p.loops,
                                                  **p.model_options())


def _memory_pass(p: BenchConfig, probe, folder: Path | None = None) -> tuple[Scenario, dict]:
    """Build the model, warm up (first calls allocate library workspaces), then one prefill and
    one decode, each under its own peak, eager. -> (the scenario, for timing; the memory columns)."""
    decodes = p.scenario != "prefill"
    with profiles.snapshot(p, folder), probe.session():
        with probe.owner("weights"):
            model = _build(p)
        baseline = probe.current_bytes()
        max_len = p.seq_len + p.new_tokens
        continuation = None
        if p.scenario == "score":  # the text's tokens: the prompt, then the ones scored
            ids = encode(p.checkpoint, p.text, max_len).to(p.device)
            prompt, continuation = ids[:, :p.seq_len], ids[:, p.seq_len:]
        else:
            prompt = torch.randint(model.config.vocab_size, (p.batch, p.seq_len), device=p.device)
        engine = Engine(model, compile=p.compile, backend=p.compile_backend)
        chunk_size = p.chunk_size if p.prefill == "chunked" else None  # None: the model's own

        def scenario_on(cache) -> Scenario:
            return Scenario(engine, cache, prompt, chunk_size, p.new_tokens, continuation)

        for _ in range(p.warmup if probe.timed else 0):
            with probe.owner("kv"):
                cache = engine.new_cache(p.batch, max_len)
            scenario_on(cache).run()
            cache = None
        before = probe.current_bytes()
        with probe.owner("kv"):
            scenario = scenario_on(engine.new_cache(p.batch, max_len))
        kv_measured = probe.current_bytes() - before
        dec = Phase()  # stays empty for a prefill-only point
        with profiles.timeline(p, folder, probe, model):
            with probe.phase("prefill") as pre:
                logits = scenario.prefill()
            probe.label(scenario.cache.buffers(), "kv")  # a cache that grows inside the model (hf_llama's)
            if decodes:
                with probe.phase("decode") as dec:
                    scenario.decode(logits, eager=True)
                probe.label(scenario.cache.buffers(), "kv")
        if kv_measured == 0:  # a cache that allocates as it grows (hf_llama's): what it holds at the end
            kv_measured = scenario.cache.nbytes()
        nvml = probe.nvml()
    phases = [ph for ph, used in ((pre, p.scenario != "decode"), (dec, decodes)) if used]
    breakdown = {f"{name}_{category}_bytes": phase.breakdown.get(category)
                 for name, phase in (("prefill", pre), ("decode", dec)) for category in BREAKDOWN_CATEGORIES}
    score = {}
    if scenario.scores is not None:
        nll = -scenario.scores.mean().item()
        score = {"scored_tokens": scenario.scores.numel(), "nll": nll, "perplexity": math.exp(nll)}
    return scenario, {**score,
        "weights_bytes": model.weights_bytes(),
        "baseline_bytes": baseline,
        "kv_bytes_analytic": model.kv_cache_bytes(p.batch, max_len),
        "kv_decode_bytes_analytic": model.kv_decode_bytes(p.batch, max_len),
        "kv_bytes_measured": kv_measured,
        "kv_bytes_per_token": model.kv_bytes_per_token(),
        "peak_prefill_bytes": pre.peak_bytes,
        "peak_decode_bytes": dec.peak_bytes,
        "peak_bytes": max(ph.peak_bytes for ph in phases),
        "reserved_bytes": max((ph.reserved_bytes for ph in phases if ph.reserved_bytes), default=None),
        **breakdown,
        "process_peak_rss_bytes": profiles.peak_rss_bytes(),
        **nvml,
    }


def _speed(p: BenchConfig, model, timings: Timings, limits: dict) -> dict:
    """The speed columns of the repeats' timings: medians with their min and max, latency
    percentiles, and against the machine's limits (roofline)."""
    speed = _spread("prefill_tokens_per_s", [p.batch * p.seq_len / s for s in timings.prefill_s])
    steps_per_s = None
    if timings.decode_steps_per_s:
        steps_per_s = float(np.median(timings.decode_steps_per_s))
        speed.update(_spread("decode_tokens_per_s", [p.batch * r for r in timings.decode_steps_per_s]),
                     token_latency_ms_p50=float(np.percentile(timings.step_s, 50)) * 1e3,
                     token_latency_ms_p90=float(np.percentile(timings.step_s, 90)) * 1e3)
    if timings.compile_s is not None:
        speed["compile_s"] = timings.compile_s
    speed.update(speed_columns(model, p, float(np.median(timings.prefill_s)), steps_per_s,
                               limits.get("copy_bytes_per_s"), limits.get("matmul_flops_per_s")))
    return speed


def _spread(column: str, values: list[float]) -> dict:
    """column: the median of values; column_min, column_max: their range over the repeats."""
    return {column: float(np.median(values)), f"{column}_min": min(values), f"{column}_max": max(values)}


def write_drift(point: BenchConfig, folder: Path) -> None:
    """Beside a scored LoopLM's row: how far each loop's K/V of the text's prompt drift from the
    last loop's and the first's (drift.kv_drift), the mechanism behind the policies' scores."""
    with torch.no_grad():
        model = MODEL_CLASSES["ouro"].from_pretrained(point.checkpoint, dtype=getattr(torch, point.dtype),
                                                      device=point.device, loops=point.loops)
        ids = encode(point.checkpoint, point.text, point.seq_len).to(point.device)
        table = kv_drift(model, ids, point.chunk_size if point.prefill == "chunked" else None)
    with atomic_file(folder / DRIFT_FILE) as tmp:
        table.to_csv(tmp, index=False)
