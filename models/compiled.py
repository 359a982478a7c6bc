"""The compiled decode step: each layer function compiled once (CompiledLayers), and on a GPU the
whole step one CUDA graph (CapturedStep). models/runtime.py's Engine puts them together; the step
loop itself stays there.

Why layer functions: compiling decode_step as one graph unrolls its Python loops into loops x layers
copies of the layer (96 for a 24-layer model at 4 loops), so compile time grows with the depth a
sweep varies. A layer function receives only the layer, tensors and flags that do not change with
depth, so one compiled graph serves every layer and loop, and CUDA graphs remove the launches that
the Python loop between them would cost.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .layers import Eager

Step = Callable[[torch.Tensor, object, torch.Tensor], torch.Tensor]


class CompiledLayers(Eager):
    """The decode step's layer applications, compiled: each function a model's loop applies
    (models.layers.decoder_layer, MELT's gated_layer, LoopCoder's window_layer, ...) goes under
    torch.compile once (fullgraph: a graph break is an error, not a slow path; static shapes), and
    that one compiled function serves every layer and every loop, since all it receives are the
    layer, tensors (the cache slot's buffers, the position, the loop index) and flags that do not
    change with depth. So compile time does not grow with loops x layers, as it does when the whole
    unrolled step is one graph."""

    frees_early = False  # e.g. MELT's last loop keeps its latent [B, 1, d]: no graph of its own

    def __init__(self, backend: str, device: torch.device):
        self.backend, self.device = backend, device
        self.compiled: dict[Callable, Callable] = {}
        self.loop_index: dict[int, torch.Tensor] = {}

    def __call__(self, fn, *args):
        compiled = self.compiled.get(fn)
        if compiled is None:
            compiled = self.compiled[fn] = torch.compile(fn, backend=self.backend, fullgraph=True, dynamic=False)
        return compiled(*args)

    def loop(self, t: int) -> torch.Tensor:
        """Loop t's index as a 0-d tensor, made once (before any capture) and reused."""
        if t not in self.loop_index:
            self.loop_index[t] = torch.tensor(t, device=self.device)
        return self.loop_index[t]


class CapturedStep:
    """A decode step replayed as one CUDA graph, the way gpt-fast and vLLM run a decode step.

    The first call (and any call after the cache changed: another cache, or buffers allocated
    anew) runs the step `warmup` times on static copies of the token [B, 1] and position [1],
    which compiles its layers, then captures one more run; every call copies its token and
    position into the static buffers and replays the graph. A warm-up run writes what the real
    step writes (the token's K/V at its position, from the rows before it), so it changes no
    result. The logits returned are the graph's own buffer [B, 1, V]: read them before the next
    call. `record` is the capture itself (CUDA); tests on CPU replace it."""

    def __init__(self, step: Step, warmup: int = 2):
        self.step, self.warmup = step, warmup
        self.key: tuple | None = None
        self.captures = 0
        self.replay: Callable[[], None] | None = None

    @staticmethod
    def cache_key(cache, token: torch.Tensor) -> tuple:
        """What a captured graph depends on: the addresses and shapes of what it reads and writes."""
        return (tuple((t.data_ptr(), tuple(t.shape)) for t in cache.buffers()), tuple(cache.view or ()),
                tuple(token.shape))

    def __call__(self, token: torch.Tensor, cache, pos: torch.Tensor) -> torch.Tensor:
        key = self.cache_key(cache, token)
        if key != self.key:
            self.replay = None                       # the old graph's memory goes before the new capture
            self.token, self.pos = token.clone(), pos.clone()
            self.run_warmup(cache)
            self.replay, self.logits = self.record(lambda: self.step(self.token, cache, self.pos))
            self.key, self.captures = key, self.captures + 1
        self.token.copy_(token)
        self.pos.copy_(pos)
        self.replay()
        return self.logits

    def run_warmup(self, cache) -> None:
        cuda = self.token.device.type == "cuda"
        stream = torch.cuda.Stream() if cuda else None  # as torch.cuda.graphs asks: warm up off the main stream
        if cuda:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            for _ in range(self.warmup):
                self.step(self.token, cache, self.pos)
        if cuda:
            torch.cuda.current_stream().wait_stream(stream)

    @staticmethod
    def record(run: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Capture run() as a CUDA graph -> (replay, its output buffer)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        return graph.replay, out
