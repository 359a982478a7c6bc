"""Memory probes. Each one is used the same way:

    with probe.session():              # model and cache are built inside
        with probe.owner("weights"):     # storages made here count as weights (then "kv")
            model = ...
        baseline = probe.current_bytes()
        with probe.phase("prefill") as prefill:   # the peak is reset when a phase starts
            ...
        prefill.peak_bytes, prefill.breakdown  # {"weights", "kv", "activations"} at the peak
        probe.nvml()                      # NVML columns (CUDA only)

`tracked` counts the bytes of live tensor storages itself (a TorchDispatchMode), on any device and
deterministically (CI runs it on CPU); `fake` does the same over fake tensors, so a laptop
estimates a full-size model at any length without the memory or the compute; `cuda` reads the
caching allocator's statistics and, beside them, counts what the tracked probe counts. All report
integers, in bytes.

Where the peak goes: each storage belongs to one category, by who made it: the model's parameters
("weights"), the cache's buffers ("kv"), everything else ("activations": the activations and
temporaries of the pass). The three sum to the tracked peak to the byte. PyTorch's
torch.distributed._tools.mem_tracker is not used for this: its categories (parameters, buffers,
gradients, optimizer state, activations, temporaries) have no KV cache, which here is neither a
module's buffer nor an activation, and it follows modules with hooks for training, where a
storage's owner is the whole question here.

profile=timeline also records the live bytes of each category after every op, with markers for
phases, chunks and loops (Timeline).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import machine

CATEGORIES = ("weights", "kv", "activations")


@dataclass
class Phase:
    peak_bytes: Optional[int] = None
    reserved_bytes: Optional[int] = None
    breakdown: dict = field(default_factory=dict)  # category -> bytes at the peak


class Timeline:
    """Live bytes per category after every op that changed them, the part of the cache that holds
    written rows, and markers: what a plot of a point's memory over its memory pass needs."""

    def __init__(self):
        self.rows: list[tuple[int, int, int, int, int]] = []   # (op, weights, kv, activations, kv written)
        self.marks: list[tuple[int, str, str]] = []       # (op, kind, label): phase, chunk, loop
        self.written: dict[int, int] = {}                 # id(cache storage) -> bytes up to its last written row

    def write(self, dst: torch.Tensor) -> None:
        """A copy into rows start..end of a cache buffer [B, H, rows, D] (a prefill's write): its
        rows up to `end` now hold data. (The decode step's single rows, written by index, are not
        followed: a handful of rows.)"""
        if dst.dim() != 4 or dst.stride(2) == 0:
            return
        storage = dst.untyped_storage()
        rows = dst.stride(1) // dst.stride(2)                                  # the buffer's length
        end = (dst.storage_offset() % dst.stride(1)) // dst.stride(2) + dst.shape[2]
        key = id(storage)
        self.written[key] = max(self.written.get(key, 0), storage.nbytes() * min(end, rows) // rows)

    def frame(self):
        import pandas as pd

        samples = pd.DataFrame(self.rows, columns=["op", *CATEGORIES, "kv_written"])
        marks = pd.DataFrame(self.marks, columns=["op", "kind", "label"])
        return samples, marks


class LiveTensors(TorchDispatchMode):
    """Live bytes of every tensor storage created or touched while the mode is on, by category.

    Each storage counts once however many tensors view it; it stops counting when it is freed (a
    weak reference tells). With `limit_bytes`, an op whose result takes the total past the limit
    raises torch.OutOfMemoryError, as a device of that size would.
    """

    def __init__(self, limit_bytes: int | None = None):
        super().__init__()
        self.limit_bytes = limit_bytes
        self.sizes: dict[int, int] = {}  # id(storage) -> bytes, for storages alive now
        self.owners: dict[int, str] = {}  # id(storage) -> category
        self.by = Counter({c: 0 for c in CATEGORIES})
        self.current = 0
        self.peak = 0
        self.peak_by: dict = dict(self.by)
        self.default = "activations"      # the category of storages made now (probe.owner)
        self.timeline: Timeline | None = None
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = self._call(func, types, args, kwargs or {})
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t)
        self.ops += 1
        if self.timeline is not None:
            if func is torch.ops.aten.copy_.default and self.owners.get(id(args[0].untyped_storage())) == "kv":
                self.timeline.write(args[0])
            written = sum(b for k, b in self.timeline.written.items() if k in self.sizes)
            row = (self.ops, self.by["weights"], self.by["kv"], self.by["activations"], written)
            if not self.timeline.rows or self.timeline.rows[-1][1:] != row[1:]:
                self.timeline.rows.append(row)
        return out

    def _call(self, func, types, args, kwargs):
        return func(*args, **kwargs)

    def _see(self, t: torch.Tensor) -> None:
        if t.layout != torch.strided or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key, nbytes = id(storage), storage.nbytes()
        old = self.sizes.get(key)
        if old == nbytes:
            return
        if old is None:
            # PyTorch keeps one Python object per storage while the storage lives, so the
            # finalizer runs when the memory itself is released.
            weakref.finalize(storage, self._free, key)
            self.owners[key] = self.default
        self.sizes[key] = nbytes
        self.by[self.owners[key]] += nbytes - (old or 0)
        self.current += nbytes - (old or 0)
        if self.current > self.peak:
            self.peak = self.current
            self.peak_by = dict(self.by)
        if self.limit_bytes is not None and self.current > self.limit_bytes:
            raise torch.OutOfMemoryError(
                f"out of memory (simulated): live tensors would hold {self.current} bytes, "
                f"past mem_limit {self.limit_bytes} bytes")

    def _free(self, key: int) -> None:
        nbytes = self.sizes.pop(key, 0)
        self.by[self.owners.pop(key, "activations")] -= nbytes
        self.current -= nbytes

    def label(self, tensors, category: str) -> None:
        """Count these tensors' storages as `category` from now on (a cache that grows inside the
        model's own code, transformers' DynamicCache, is labelled after each phase)."""
        for t in tensors:
            key = id(t.untyped_storage())
            if key in self.sizes and self.owners[key] != category:
                self.by[self.owners[key]] -= self.sizes[key]
                self.by[category] += self.sizes[key]
                self.owners[key] = category

    def reset_peak(self) -> None:
        self.peak = self.current
        self.peak_by = dict(self.by)

    def mark(self, kind: str, label: str) -> None:
        if self.timeline is not None:
            self.timeline.marks.append((self.ops, kind, label))


class FakeLiveTensors(LiveTensors, FakeTensorMode):
    """LiveTensors over fake tensors: FakeTensorMode computes each op's output shapes and this
    counts their storages. One mode rather than LiveTensors stacked on FakeTensorMode: every op
    then goes through Python once, not twice (about 10 % faster on a 32K-token MELT prefill)."""

    def _call(self, func, types, args, kwargs):
        return FakeTensorMode.__torch_dispatch__(self, func, types, args, kwargs)


class TrackedProbe:
    name = "tracked"
    timed = True  # whether the point's timings mean anything

    def __init__(self, limit_bytes: int | None = None):
        self.live = LiveTensors(limit_bytes)

    def session(self):
        return self.live

    def current_bytes(self) -> int:
        return self.live.current

    @contextlib.contextmanager
    def owner(self, category: str):
        """Storages made inside count as `category` (weights, kv; activations otherwise)."""
        before, self.live.default = self.live.default, category
        try:
            yield
        finally:
            self.live.default = before

    def label(self, tensors, category: str) -> None:
        self.live.label(tensors, category)

    def record(self, timeline: Timeline | None) -> None:
        """Record a timeline of the session from now on (None: stop)."""
        self.live.timeline = timeline

    def mark(self, kind: str, label: str) -> None:
        self.live.mark(kind, label)

    @contextlib.contextmanager
    def phase(self, name: str = ""):
        stats = Phase()
        self.live.reset_peak()
        self.mark("phase", name)
        try:
            yield stats
        finally:
            stats.peak_bytes = self.live.peak
            stats.breakdown = dict(self.live.peak_by)

    def nvml(self) -> dict:
        return {}


class FakeProbe(TrackedProbe):
    """`tracked` under FakeTensorMode: tensors have shapes, dtypes and storages of the right size
    but no data, and ops only compute output shapes. Peak estimates of e.g. Ouro-1.4B at 32K tokens
    take seconds to a minute on a CPU; there is nothing to time."""

    name = "fake"
    timed = False

    def __init__(self, limit_bytes: int | None = None):
        self.live = FakeLiveTensors(limit_bytes)


class CudaProbe(TrackedProbe):
    """The caching allocator's peaks (peak_bytes, reserved), with the tracked probe's count of
    live tensors by owner running beside them: its categories sum to its own peak, which differs
    from the allocator's by the allocator's rounding and the kernels' private workspaces."""

    name = "cuda"
    timed = True

    def __init__(self, limit_bytes: int | None = None):
        self.limit_bytes = limit_bytes
        self.live = LiveTensors()  # the allocator enforces the limit, not the count

    @contextlib.contextmanager
    def session(self):
        if self.limit_bytes is not None:  # the allocator refuses past this, like a smaller GPU
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.limit_bytes / total))
        try:
            with self.live:
                yield self
        finally:
            if self.limit_bytes is not None:
                torch.cuda.set_per_process_memory_fraction(1.0)

    def current_bytes(self) -> int:
        return torch.cuda.memory_allocated()

    @contextlib.contextmanager
    def phase(self, name: str = ""):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with super().phase(name) as stats:
            try:
                yield stats
            finally:
                torch.cuda.synchronize()
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        stats.peak_bytes, stats.reserved_bytes = allocated, reserved
        stats.breakdown["allocator"] = reserved - allocated   # the allocator's cached, unused blocks
        used, _ = machine.nvml_used_bytes()
        if used is not None:
            stats.breakdown["outside_torch"] = used - torch.cuda.memory_reserved()

    def nvml(self) -> dict:
        """What the driver says this process uses now, and the part PyTorch does not account for
        (CUDA context, library workspaces). Device-wide when NVML cannot see our process id (as
        inside some containers): `nvml_scope` says which."""
        used, scope = machine.nvml_used_bytes()
        if used is None:
            return {}
        return {"nvml_used_bytes": used, "nvml_scope": scope,
                "non_torch_bytes": used - torch.cuda.memory_reserved()}


def make_probe(name: str, limit_bytes: int | None = None):
    return {"cuda": CudaProbe, "tracked": TrackedProbe, "fake": FakeProbe}[name](limit_bytes)
