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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import machine
from .fake_dispatch import META_QUERIES, CachedFakeTensorMode

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
        return self._dispatch(func, types, args, kwargs)

    def _dispatch(self, func, types, args=(), kwargs=None):
        # (Not __torch_dispatch__ itself, which PyTorch wraps in torch._disable_dynamo for every
        # subclass: FakeLiveTensors calls this without a second wrapper.)
        out = self._call(func, types, args, kwargs or {})
        if isinstance(out, torch.Tensor):
            self._see(out)
        else:
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


class FakeLiveTensors(LiveTensors, CachedFakeTensorMode):
    """LiveTensors over fake tensors: FakeTensorMode computes each op's output shapes and this
    counts their storages. One mode rather than LiveTensors stacked on FakeTensorMode: every op
    then goes through Python once, not twice (about 10 % faster on a 32K-token MELT prefill).

    Every op is dispatched and counted, for less than plain FakeTensorMode takes and with the same
    results (bench/measure/fake_dispatch.py), except the prefill chunks that prefill_chunks proves cannot
    change the peak (a 32K-token prefill in chunks of 500: 6 of its 64 chunks run).
    """

    def __init__(self, limit_bytes: int | None = None):
        super().__init__(limit_bytes)
        self.trace: list | None = None        # (op, live bytes after it) while prefill_chunks checks a chunk
        self._depth = 0                       # ops FakeTensorMode decomposes an op into come back nested

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        handler = META_QUERIES.get(func)
        if handler is not None:  # e.g. a fake tensor's .device, asked from C++: no storage to count
            return handler(args)
        if self.trace is None:
            return self._dispatch(func, types, args, kwargs)
        self._depth += 1
        try:
            out = self._dispatch(func, types, args, kwargs)
        finally:
            self._depth -= 1
        if self._depth == 0:
            self.trace.append((func, self.current))
        return out

    def prefill_chunks(self, bounds: list[tuple[int, int]]):
        """The chunks [(begin, end)] of a prefill (last_only) that CausalLM.forward runs under this
        mode, for a model with affine_chunks: chunks 2 .. m have one size C (m as far as it goes,
        short of the final chunk); all run but 4 .. m-1. Why the prefill's peak and its breakdown
        stay those of running every chunk:

        Fake tensors hold no data, and the prefill keeps no chunk's output but the last: a skipped
        chunk changes nothing later chunks or the decode see, only the peak it would reach. Chunk
        k of the run starts at begin_2 + (k - 2) C and runs the same ops as the others; a tensor's
        size depends on k only through one axis of length L = start + C, the keys (affine_chunks:
        the mask [C, L], its G-fold repeat [G C, L], SDPA's float copy; the cache reads
        [B, Hkv, L, D] are views). So after op i of chunk k the live bytes are a_i + b_i k, and the
        chunk's peak P(k) = max_i (a_i + b_i k) is convex in k: over the run it is largest at an
        end, max(P(2), P(m)), both measured. If P(m) > P(2), then P(k) < P(m) for 2 <= k < m, so
        the peak is first reached, and its breakdown taken, in chunk m, skipping or not. (A memory
        limit is crossed in a skipped chunk only if in chunk 2 or m too: the row is oom either way.)
        Chunks 0 and 1 differ (no mask in chunk 0; in chunk 1 ops first called miss FakeTensorMode's
        cache and run its decompositions, nested) and run, as does the final chunk (it may end at
        the cache's last row, where reading rows 0 .. L is an alias of the buffer, not a slice).

        Checked as it runs: chunks 2, 3 and m must dispatch the same ops, with live bytes after
        each exactly affine in k, and start and end at the same live bytes (nothing is left
        behind); else this raises. With a timeline (profile=timeline) every chunk runs."""
        size = [end - begin for begin, end in bounds]
        first, last = 2, 2
        while last + 2 < len(bounds) and size[last + 1] == size[first]:
            last += 1
        if self.timeline is not None or last < 5:
            yield from bounds
            return
        traces = {}
        try:
            for i, chunk in enumerate(bounds):
                if first + 1 < i < last:
                    continue
                if i in (first, first + 1, last):
                    self.trace = [(None, self.current)]
                yield chunk
                if self.trace is not None:
                    traces[i], self.trace = self.trace + [(None, self.current)], None
        finally:
            self.trace = None
        a, b, z = traces[first], traces[first + 1], traces[last]
        if not (len(a) == len(b) == len(z) and a[0] == b[0] == z[0] and a[-1] == b[-1] == z[-1]
                and all(fa == fb == fz and cz - ca == (last - first) * (cb - ca)
                        for (fa, ca), (fb, cb), (fz, cz) in zip(a, b, z))):
            raise RuntimeError(f"fake probe: prefill chunks {first}, {first + 1} and {last} do not run the same "
                               f"ops with live bytes affine in the chunk; chunks {first + 2}..{last - 1} were "
                               "skipped on that premise (CausalLM.affine_chunks)")

    def _call(self, func, types, args, kwargs):
        return self.fake_dispatch(func, types, args, kwargs)


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
