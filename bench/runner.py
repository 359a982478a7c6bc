"""One sweep point: check the config, skip it if already measured, measure it, write its row."""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from models import MODEL_NAMES

from . import env
from .config import BenchConfig, resolve
from .memory_model import predict_point
from .probes import Phase, make_probe
from .results import COLUMNS, find_measured, identity, same_code, write_row
from .roofline import speed_columns
from .scenarios import Scenario, make_scenario

log = logging.getLogger("bench")

# Set by run_bench.py's preflight for the progress lines (the launcher does not tell a job).
POINTS_ENV, START_ENV = "MELTBENCH_POINTS", "MELTBENCH_START"


def run(cfg: DictConfig) -> dict:
    """Run the point `cfg` inside a Hydra job and return its row (also written as result.json in
    the job's folder). In a multirun, a point whose identity already has a row under the sweep
    folder, measured by this code version (git_sha), is skipped and that row returned; a row from
    another version is measured again."""
    point = resolve(cfg)
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    job_num = hc.job.num if multirun else 0
    if point.capacity:  # a search over batch (bench/capacity.py); it always runs, never resumes
        from . import capacity

        row = capacity.search(point, Path(hc.runtime.output_dir), measure)
        write_row(Path(hc.runtime.output_dir), row)
        _progress(job_num, row, f"{row['status']}, largest batch within the budget: "
                                f"{row['capacity_max_batch']}")
        return row
    again = ""
    if multirun:
        sha = env.info()["git_sha"]
        done = find_measured(hc.sweep.dir, identity(point), sha)
        if done is not None and same_code(done.get("git_sha"), sha):
            _progress(job_num, done, "already measured, skipped")
            return done
        if done is not None:
            again = f" (measured again: the row was from git {done['git_sha']}, this is {sha})"
    row = measure(point)
    write_row(Path(hc.runtime.output_dir), row)
    _progress(job_num, row, row["status"] + again)
    return row


def measure(point: BenchConfig, timed: bool = True) -> dict:
    """Measure a resolved point. An out-of-memory error is a result (status=oom); any other failure
    is status=error with its message: a sweep always gets its row and goes on. timed=False: memory
    only (the capacity search's trials)."""
    start = time.perf_counter()
    row = {**dict.fromkeys(COLUMNS), **identity(point), **env.info(), "status": "ok"}
    if point.model in MODEL_NAMES:  # what the point should take, even when it runs out of memory
        row.update(predict_point(point).columns(point.scenario))
    try:
        row.update(_measure(point, timed))
    except Exception as e:  # noqa: BLE001 - every failure becomes a row
        message = str(e).strip()
        oom = isinstance(e, torch.OutOfMemoryError) or (
            isinstance(e, RuntimeError) and "out of memory" in message)  # e.g. from a library
        row.update(status="oom" if oom else "error",
                   error=f"{type(e).__name__}: {message.splitlines()[0] if message else ''}")
    # The exception (and the frames holding model and cache) is gone here: give the memory back
    # before the next point, which may run in this same process.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row["wall_s"] = round(time.perf_counter() - start, 3)
    return row


def _measure(p: BenchConfig, timed: bool = True) -> dict:
    probe = make_probe(p.probe, None if p.mem_limit_mib is None else int(p.mem_limit_mib * 2**20))
    timed = timed and probe.timed and p.repeats > 0  # repeats=0: memory only
    # The machine's limits, measured once per process and before any model is built (their
    # buffers are gone when the point's memory is measured).
    limits = env.limits(p.device, p.dtype) if timed else {}
    torch.manual_seed(p.seed)
    with torch.inference_mode():
        run, row = _memory_pass(p, probe)
        if timed:  # outside the probe: the tracked probe's bookkeeping would slow it down
            row.update(limits, **_timing_pass(p, run, limits))
    return row


def _memory_pass(p: BenchConfig, probe) -> tuple[Scenario, dict]:
    """Build the model, warm up (first calls allocate library workspaces), then one prefill and
    one decode, each under its own peak. -> (the scenario, for timing; the memory columns)."""
    import models  # imported on use: configs compose without building anything
    from models import build_model

    decodes = p.scenario != "prefill"
    with probe.session():
        if p.checkpoint is None:
            model = build_model(p.model, size=p.size, loops=p.loops, dtype=getattr(torch, p.dtype),
                                device=p.device, **p.model_options())
        else:  # trained weights (train_melt.py); loops and model options apply on top
            model = models.MODEL_CLASSES[p.model].from_pretrained(
                p.checkpoint, dtype=getattr(torch, p.dtype), device=p.device, loops=p.loops,
                **p.model_options())
        baseline = probe.current_bytes()
        prompt = torch.randint(model.config.vocab_size, (p.batch, p.seq_len), device=p.device)
        run = make_scenario(model, prompt, p.new_tokens)
        for _ in range(p.warmup if probe.timed else 0):
            run.new_cache()
            logits, _ = run.prefill()
            if decodes:
                run.decode(logits)
        run.cache = None
        before = probe.current_bytes()
        run.new_cache()
        kv_measured = probe.current_bytes() - before
        dec = Phase()  # stays empty for a prefill-only point
        with probe.phase() as pre:
            logits, _ = run.prefill()
        if decodes:
            with probe.phase() as dec:
                run.decode(logits)
        if hasattr(run, "kv_bytes"):  # a cache that grows (hf_llama's): what it holds at the end
            kv_measured = run.kv_bytes()
        nvml = probe.nvml()
    phases = [ph for ph, used in ((pre, p.scenario != "decode"), (dec, decodes)) if used]
    return run, {
        "weights_bytes": model.weights_bytes(),
        "baseline_bytes": baseline,
        "kv_bytes_analytic": model.kv_cache_bytes(p.batch, p.seq_len + p.new_tokens),
        "kv_bytes_measured": kv_measured,
        "kv_bytes_per_token": model.kv_bytes_per_token(),
        "peak_prefill_bytes": pre.peak_bytes,
        "peak_decode_bytes": dec.peak_bytes,
        "peak_bytes": max(ph.peak_bytes for ph in phases),
        "reserved_bytes": max((ph.reserved_bytes for ph in phases if ph.reserved_bytes), default=None),
        **nvml,
    }


def _timing_pass(p: BenchConfig, run: Scenario, limits: dict | None = None) -> dict:
    """`repeats` full runs of the scenario, each from a fresh cache -> the speed columns. With
    compile, the decode step is compiled first (an untimed run; the memory pass ran eager)."""
    if p.compile and p.scenario != "prefill":
        run.compile()
        run.new_cache()
        run.decode(run.prefill()[0])
    prefill_s, decode_s, step_s = [], [], []
    for _ in range(p.repeats):
        run.new_cache()
        logits, seconds = run.prefill()
        prefill_s.append(seconds)
        if p.scenario != "prefill":
            steps = run.decode(logits)
            decode_s.append(sum(steps))
            step_s += steps
    speed = {"prefill_tokens_per_s": p.batch * p.seq_len / float(np.median(prefill_s))}
    steps_per_s = None
    if decode_s:
        steps_per_s = p.new_tokens / float(np.median(decode_s))
        speed.update(
            decode_tokens_per_s=p.batch * steps_per_s,
            token_latency_ms_p50=float(np.percentile(step_s, 50)) * 1e3,
            token_latency_ms_p90=float(np.percentile(step_s, 90)) * 1e3,
        )
    # bandwidth_utilization against the measured copy bandwidth, and what bounds each phase
    limits = limits or {}
    speed.update(speed_columns(run.model, p, float(np.median(prefill_s)), steps_per_s,
                               limits.get("copy_bytes_per_s"), limits.get("matmul_flops_per_s")))
    return speed


def _progress(job_num: int, row: dict, what: str) -> None:
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
    log.info("point %d of %s | elapsed %s | %s loops=%s seq_len=%s batch=%s: %s%s",
             job_num + 1, total, elapsed, row["model"], row["loops"], row["seq_len"], row["batch"],
             what, f" | {figures}" if figures else "")
