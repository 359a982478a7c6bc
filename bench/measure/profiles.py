"""What a point records beyond its row (profile=timeline | snapshot), and its process's memory.

    profile=timeline   live bytes per category (weights, kv, activations) after every op of the
                       memory pass, with markers for phases, chunks and loops: timeline.parquet
                       and timeline_marks.parquet in the point's folder; the report draws them.
    profile=snapshot   on CUDA, PyTorch's memory history of the memory pass only (never a timed
                       pass): memory_snapshot.pickle, which https://pytorch.org/memory_viz opens.
                       Without CUDA there is nothing to record: the point runs without it.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
from pathlib import Path

import torch

from ..rows.files import MARKS_FILE, SNAPSHOT_FILE, TIMELINE_FILE
from .probes import Timeline

log = logging.getLogger("bench")

SNAPSHOT_ENTRIES = 200_000  # allocation events kept (the memory pass of a large point has many)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS): for a
    point run alone (hydra/launcher=isolated) its own peak; under the basic launcher, the peak of
    every point the process ran before it too."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextlib.contextmanager
def timeline(p, folder: Path | None, probe, model):
    """With profile=timeline: record the probe's live bytes per category and mark chunks (each call
    of the embedding: a prefill chunk, or a decode step) and loops (each call of the final norm,
    which ends a loop), then write the tables into `folder`."""
    if p.profile != "timeline" or folder is None:
        yield
        return
    record, counts = Timeline(), {"chunk": 0, "loop": 0}

    def chunk(module, args):
        counts["chunk"] += 1
        counts["loop"] = 0
        probe.mark("chunk", str(counts["chunk"]))

    def loop(module, args, output):
        counts["loop"] += 1
        probe.mark("loop", str(counts["loop"]))

    backbone = getattr(model, "model", None)
    hooks = [] if backbone is None or not hasattr(backbone, "norm") else [
        backbone.embed_tokens.register_forward_pre_hook(chunk), backbone.norm.register_forward_hook(loop)]
    probe.record(record)
    try:
        yield
    finally:
        probe.record(None)
        for hook in hooks:
            hook.remove()
    samples, marks = record.frame()
    folder.mkdir(parents=True, exist_ok=True)
    samples.to_parquet(folder / TIMELINE_FILE, index=False)
    marks.to_parquet(folder / MARKS_FILE, index=False)


def snapshot_possible(p) -> bool:
    """Whether the point runs on a CUDA device whose allocator can record its history."""
    return p.device == "cuda" and torch.cuda.is_available()


@contextlib.contextmanager
def snapshot(p, folder: Path | None):
    """With profile=snapshot on CUDA: PyTorch's allocation history while the context is open (the
    memory pass), dumped to `folder`; recording stops before anything is timed."""
    if p.profile != "snapshot" or folder is None:
        yield
        return
    if not snapshot_possible(p):
        log.warning("profile=snapshot: no CUDA device for this point (device %s); no snapshot recorded", p.device)
        yield
        return
    torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_ENTRIES)
    try:
        yield
        folder.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(folder / SNAPSHOT_FILE))
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
