"""One sweep point: check the config, skip it if already measured, measure it, write its row."""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from models import MODEL_NAMES
from models.policies import policy_name
from models.runtime import Engine, StepTimer

from . import env, profiles
from .config import BenchConfig, resolve
from .memory_model import predict_point
from .probes import Phase, make_probe
from .results import BREAKDOWN_CATEGORIES
from .results import COLUMNS, atomic_file, find_measured, identity, same_code, write_row
from .roofline import speed_columns
from .text import encode

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
        sha = env.info(point.device)["git_sha"]
        done = find_measured(hc.sweep.dir, identity(point), sha)
        if done is not None and same_code(done.get("git_sha"), sha):
            _progress(job_num, done, "already measured, skipped")
            return done
        if done is not None:
            again = f" (measured again: the row was from git {done['git_sha']}, this is {sha})"
    row = measure(point, folder=Path(hc.runtime.output_dir))
    write_row(Path(hc.runtime.output_dir), row)
    if point.scenario == "score" and row["status"] == "ok" and row["policy"] == "per_loop":
        write_drift(point, Path(hc.runtime.output_dir))
    _progress(job_num, row, row["status"] + again)
    return row


DRIFT_FILE = "drift.csv"


def write_drift(point: BenchConfig, folder: Path) -> None:
    """Beside a scored LoopLM's row: how far each loop's K/V of the text's prompt drift from the
    last loop's and the first's (bench.drift), the mechanism behind the policies' scores."""
    import models
    from .drift import kv_drift

    with torch.no_grad():
        model = models.MODEL_CLASSES["ouro"].from_pretrained(point.checkpoint, dtype=getattr(torch, point.dtype),
                                                             device=point.device, loops=point.loops)
        ids = encode(point.checkpoint, point.text, point.seq_len).to(point.device)
        table = kv_drift(model, ids, point.chunk_size if point.prefill == "chunked" else None)
    with atomic_file(folder / DRIFT_FILE) as tmp:
        table.to_csv(tmp, index=False)


def measure(point: BenchConfig, timed: bool = True, folder: Path | None = None) -> dict:
    """Measure a resolved point. An out-of-memory error is a result (status=oom); any other failure
    is status=error with its message: a sweep always gets its row and goes on. A failed timing pass
    keeps the memory pass's columns and says why in timing_status / timing_error. timed=False:
    memory only (the capacity search's trials). `folder`: where a profile (profile=timeline or
    snapshot) writes its file; none without it."""
    start = time.perf_counter()
    row = {**dict.fromkeys(COLUMNS), **identity(point), **env.info(point.device), "status": "ok",
           "policy": policy_name(point.model, point.kv_sharing)}
    if point.model in MODEL_NAMES:  # what the point should take, even when it runs out of memory
        row.update(predict_point(point).columns(point.scenario))
    try:
        row.update(_measure(point, timed, folder))
    except Exception as e:  # noqa: BLE001 - every failure becomes a row
        row.update(status=_failure(e), error=_message(e))
    # The exception (and the frames holding model and cache) is gone here: give the memory back
    # before the next point, which may run in this same process.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row["wall_s"] = round(time.perf_counter() - start, 3)
    return row


def _failure(e: Exception) -> str:
    """oom for an out-of-memory error (torch's, or a library's RuntimeError saying so), else error."""
    oom = isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))
    return "oom" if oom else "error"


def _message(e: Exception) -> str:
    message = str(e).strip()
    return f"{type(e).__name__}: {message.splitlines()[0] if message else ''}"


def _measure(p: BenchConfig, timed: bool = True, folder: Path | None = None) -> dict:
    probe = make_probe(p.probe, None if p.mem_limit_mib is None else int(p.mem_limit_mib * 2**20))
    timed = timed and probe.timed and p.repeats > 0 and p.scenario != "score"  # repeats=0: memory only
    # The machine's limits, measured once per process and before any model is built (their
    # buffers are gone when the point's memory is measured).
    limits = env.limits(p.device, p.dtype) if timed else {}
    torch.manual_seed(p.seed)
    # The memory pass runs under no_grad, not inference_mode: in inference mode a composite op
    # (scaled_dot_product_attention) reaches the probes whole and makes its temporaries (the float
    # copy of a bool mask) below them, unseen; under no_grad the probes see each op it is made of.
    with torch.no_grad():
        point, row = _memory_pass(p, probe, folder)
    if timed:  # outside the probe: the tracked probe's bookkeeping would slow it down
        row["timing_status"] = "ok"
        try:
            with torch.inference_mode():
                row.update(limits, **_timing_pass(p, point, limits))
        except Exception as e:  # noqa: BLE001 - the memory columns stand; say why there is no speed
            row.update(timing_status=_failure(e), timing_error=_message(e))
    return row


class Point:
    """What the memory pass leaves for the timing pass: the engine, its cache and the prompt."""

    def __init__(self, engine: Engine, cache, prompt: torch.Tensor, p: BenchConfig,
                 continuation: torch.Tensor | None = None):
        self.engine, self.cache, self.prompt = engine, cache, prompt
        self.chunk_size = p.chunk_size if p.prefill == "chunked" else None  # None: the model's own
        self.new_tokens = p.new_tokens
        self.continuation = continuation  # scenario=score: the true tokens after the prompt [1, new_tokens]
        self.scores: torch.Tensor | None = None

    def prefill(self, timer: StepTimer | None = None) -> torch.Tensor:
        if timer is not None:
            timer.mark()
        logits = self.engine.prefill(self.prompt, self.cache, self.chunk_size)
        if timer is not None:
            timer.mark()
        return logits

    def decode(self, logits: torch.Tensor, eager: bool = False, timer: StepTimer | None = None) -> None:
        if self.continuation is not None:  # teacher forcing: the log-likelihood of the true tokens
            self.scores = self.engine.forced_decode(logits, self.cache, self.prompt.shape[1], self.continuation)
            return
        self.engine.decode(logits, self.cache, self.prompt.shape[1], self.new_tokens, eager=eager, timer=timer)

    def run(self, decodes: bool) -> None:
        """An untimed, eager run (a warm-up): nothing it made outlives it."""
        logits = self.prefill()
        if decodes:
            self.decode(logits, eager=True)


def _memory_pass(p: BenchConfig, probe, folder: Path | None = None) -> tuple[Point, dict]:
    """Build the model, warm up (first calls allocate library workspaces), then one prefill and
    one decode, each under its own peak, eager. -> (the point, for timing; the memory columns)."""
    import models  # imported on use: configs compose without building anything
    from models import build_model

    decodes = p.scenario != "prefill"
    snapshot = profiles.snapshot(p, folder)
    with snapshot, probe.session():
        with probe.owner("weights"):
            if p.checkpoint is None:
                model = build_model(p.model, size=p.size, loops=p.loops, dtype=getattr(torch, p.dtype),
                                    device=p.device, **p.model_options())
            else:  # trained weights; loops and model options apply on top
                model = models.MODEL_CLASSES[p.model].from_pretrained(
                    p.checkpoint, dtype=getattr(torch, p.dtype), device=p.device, loops=p.loops,
                    **p.model_options())
        baseline = probe.current_bytes()
        max_len = p.seq_len + p.new_tokens
        continuation = None
        if p.scenario == "score":  # the text's tokens: the prompt, then the ones scored
            ids = encode(p.checkpoint, p.text, max_len).to(p.device)
            prompt, continuation = ids[:, :p.seq_len], ids[:, p.seq_len:]
        else:
            prompt = torch.randint(model.config.vocab_size, (p.batch, p.seq_len), device=p.device)
        engine = Engine(model, compile=p.compile, backend=p.compile_backend)
        for _ in range(p.warmup if probe.timed else 0):
            with probe.owner("kv"):
                cache = engine.new_cache(p.batch, max_len)
            Point(engine, cache, prompt, p, continuation).run(decodes)
            cache = None
        before = probe.current_bytes()
        with probe.owner("kv"):
            point = Point(engine, engine.new_cache(p.batch, max_len), prompt, p, continuation)
        kv_measured = probe.current_bytes() - before
        dec = Phase()  # stays empty for a prefill-only point
        with profiles.timeline(p, folder, probe, model):
            with probe.phase("prefill") as pre:
                logits = point.prefill()
            probe.label(point.cache.buffers(), "kv")  # a cache that grows inside the model (hf_llama's)
            if decodes:
                with probe.phase("decode") as dec:
                    point.decode(logits, eager=True)
                probe.label(point.cache.buffers(), "kv")
        if kv_measured == 0:  # a cache that allocates as it grows (hf_llama's): what it holds at the end
            kv_measured = point.cache.nbytes()
        nvml = probe.nvml()
    phases = [ph for ph, used in ((pre, p.scenario != "decode"), (dec, decodes)) if used]
    breakdown = {f"{name}_{category}_bytes": phase.breakdown.get(category)
                 for name, phase in (("prefill", pre), ("decode", dec)) for category in BREAKDOWN_CATEGORIES}
    score = {}
    if point.scores is not None:
        nll = -point.scores.mean().item()
        score = {"scored_tokens": point.scores.numel(), "nll": nll, "perplexity": math.exp(nll)}
    return point, {**score,
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


def _timing_pass(p: BenchConfig, point: Point, limits: dict | None = None) -> dict:
    """`repeats` full runs of the scenario, each on the cache made ready for a new prompt -> the
    speed columns: medians over the repeats, with their min and max. With compile, the decode step
    is compiled first (an untimed run; the memory pass ran eager). Prefill: one interval per
    repeat. Decode: the intervals between consecutive steps, so what runs before the first step
    (generate's set-up, for the peer) is never timed."""
    if p.compile and p.scenario != "prefill":
        point.cache.reset()
        point.decode(point.prefill())
    prefill_s, decode_s, step_s = [], [], []
    for _ in range(p.repeats):
        point.cache.reset()
        timer = StepTimer(p.device)
        logits = point.prefill(timer)
        prefill_s += timer.intervals()
        if p.scenario != "prefill":
            timer = StepTimer(p.device)
            point.decode(logits, timer=timer)
            steps = timer.intervals()
            if steps:
                decode_s.append(len(steps) / sum(steps))        # steps per second of this repeat
                step_s += steps
    prefill_rates = [p.batch * p.seq_len / s for s in prefill_s]
    speed = _spread("prefill_tokens_per_s", prefill_rates)
    steps_per_s = None
    if decode_s:
        steps_per_s = float(np.median(decode_s))
        speed.update(_spread("decode_tokens_per_s", [p.batch * r for r in decode_s]),
                     token_latency_ms_p50=float(np.percentile(step_s, 50)) * 1e3,
                     token_latency_ms_p90=float(np.percentile(step_s, 90)) * 1e3)
    # bandwidth_utilization against the measured copy bandwidth, and what bounds each phase
    limits = limits or {}
    speed.update(speed_columns(point.engine.model, p, float(np.median(prefill_s)), steps_per_s,
                               limits.get("copy_bytes_per_s"), limits.get("matmul_flops_per_s")))
    return speed


def _spread(column: str, values: list[float]) -> dict:
    """column: the median of values; column_min, column_max: their range over the repeats."""
    return {column: float(np.median(values)), f"{column}_min": min(values), f"{column}_max": max(values)}


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
    from .report import design_label

    design = design_label(row) if row.get("policy") else row["model"]  # 'LoopLM ring (K=2)', 'MELT', ...
    log.info("point %d of %s | elapsed %s | %s loops=%s seq_len=%s batch=%s: %s%s",
             job_num + 1, total, elapsed, design, row["loops"], row["seq_len"], row["batch"],
             what, f" | {figures}" if figures else "")
