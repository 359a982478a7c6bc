"""The runtime: what drives a model for the benchmark, for generate and for training's evaluation.

The model files hold modules (layers, loops, cache policies); this one holds how they are run,
the way gpt-fast keeps generate.py apart from model.py:

    engine = Engine(model, compile=True)          # compile: the decode step's layers compiled once,
    cache = engine.new_cache(batch, max_len)      # and on a GPU the whole step one CUDA graph
    logits = engine.prefill(prompt, cache, chunk_size=500)
    tokens = engine.decode(logits, cache, start_pos=S, steps=32, timer=StepTimer(device))

A benchmark point runs its prompt through a `Scenario`: once eager under the memory probe (prefill
and decode apart), then `repeats` timed runs (Scenario.time -> Timings).

Every model the benchmark runs, ours and the transformers peer (models/hf_llama.py), has the small
`LanguageModel` interface below, so nothing above this file asks which kind of model it holds.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .compiled import CapturedStep, CompiledLayers, Step


class LanguageModel(Protocol):
    """What the runtime and the benchmark need of a model."""

    config: object
    compilable: bool  # whether decode_step takes compiled layers (ours: yes; the peer: no)

    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def device(self) -> torch.device: ...
    def weights_bytes(self) -> int: ...
    def kv_cache_bytes(self, batch_size: int, max_len: int) -> int: ...
    def kv_bytes_per_token(self) -> int: ...
    def kv_decode_bytes(self, batch_size: int, max_len: int) -> int: ...

    def new_cache(self, batch_size: int, max_len: int):
        """A cache for batch_size sequences of up to max_len tokens, with nbytes(), buffers() and
        reset() (ready for the next prompt)."""

    def prefill(self, input_ids: torch.Tensor, cache, chunk_size: int | None = None) -> torch.Tensor:
        """The prompt [B, S] into the cache, in chunks of chunk_size tokens (None: the model's
        default) -> logits of its last position [B, 1, V]."""

    def decode(self, token: torch.Tensor, cache, start_pos: int, steps: int, step: Step | None = None,
               on_step: Callable[[], None] | None = None) -> torch.Tensor:
        """`steps` greedy steps from token [B, 1] at position start_pos -> the tokens they chose
        [B, steps]. `step` replaces the model's own decode step (the compiled one); `on_step` is
        called as each step's work has been issued."""


def greedy_decode(step: Step, token: torch.Tensor, cache, start_pos: int, steps: int,
                  on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """The decode loop of our models: `step(token [B, 1], cache, pos [1]) -> logits [B, 1, V]`.
    The position is a tensor advanced in place, so a compiled step never sees a new Python value
    (no recompile) and nothing waits for the device between steps."""
    pos = torch.full((1,), start_pos, dtype=torch.long, device=token.device)
    chosen = []
    for _ in range(steps):
        token = step(token, cache, pos).argmax(-1)               # [B, 1]
        chosen.append(token)
        pos += 1
        if on_step is not None:
            on_step()
    return torch.cat(chosen, dim=1) if chosen else token[:, :0]


class StepTimer:
    """Times work queued on a device without waiting for it in between: mark() after each piece
    of work, intervals() at the end. On CUDA, marks are CUDA events (device time, one
    synchronisation at the end); on CPU, where work runs as it is called, perf_counter."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda and self.marks:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def attention_kernels(device: torch.device):
    """SDPA's kernel choice made explicit: on a GPU, the fused kernels only (flash, memory-efficient,
    cuDNN). The math kernel materialises the [S, L] scores and, for grouped-query attention, the
    repeated K/V: a silent fallback to it would change what the benchmark measures, so a call no
    fused kernel takes fails instead (models.layers.attend keeps our calls within what they take).
    On CPU, PyTorch's own choice (its flash kernel takes masks and grouped K/V)."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


class Engine:
    """Runs one model: caches, prefill, the decode loop (eager or compiled) and generate.

    compile=True decodes with the model's layers compiled (CompiledLayers, on `backend`) and, on a
    GPU, the whole step captured as one CUDA graph (CapturedStep). The compiler's caches are reset
    when an engine first compiles: dynamo keys them on the code of the layer functions, which
    every model instance shares, so a long sweep in one process would otherwise pile entries up to
    the recompile limit and fail.
    """

    def __init__(self, model: LanguageModel, compile: bool = False, backend: str = "inductor",
                 whole_step: bool = False):
        if compile and not model.compilable:
            raise ValueError(f"compile: {type(model).__name__} has no decode step to compile; allowed: false")
        self.model, self.compile, self.backend = model, compile, backend
        # whole_step: decode_step compiled as one graph, which unrolls loops x layers copies of the
        # layer (its compile time grows with depth): kept only to measure what the layer functions save.
        self.whole_step = whole_step
        self._compiled: Step | None = None

    def new_cache(self, batch_size: int, max_len: int):
        return self.model.new_cache(batch_size, max_len)

    def prefill(self, prompt: torch.Tensor, cache, chunk_size: int | None = None) -> torch.Tensor:
        with attention_kernels(self.model.device):
            return self.model.prefill(prompt, cache, chunk_size)

    def compiled_step(self) -> Step:
        """The compiled decode step, made on first use (its layers compile at its first call)."""
        if self._compiled is None:
            torch.compiler.reset()
            layers = CompiledLayers(self.backend, self.model.device)

            def step(token, cache, pos):
                return self.model.decode_step(token, cache, pos, layers)

            if self.whole_step:
                step = torch.compile(self.model.decode_step, backend=self.backend, fullgraph=True, dynamic=False)

            self._compiled = CapturedStep(step) if self.model.device.type == "cuda" else step
        return self._compiled

    def decode(self, logits: torch.Tensor, cache, start_pos: int, steps: int, *, eager: bool = False,
               timer: StepTimer | None = None) -> torch.Tensor:
        """`steps` greedy tokens after a prefill whose last logits [B, 1, V] are given; the compiled
        step unless eager (or compile is off). With a timer, one mark per step."""
        step = self.compiled_step() if self.compile and not eager else None
        with attention_kernels(self.model.device):
            return self.model.decode(logits.argmax(-1), cache, start_pos, steps, step,
                                     timer.mark if timer is not None else None)

    def forced_decode(self, logits: torch.Tensor, cache, start_pos: int, ids: torch.Tensor) -> torch.Tensor:
        """Teacher forcing after a prefill: log p of the true tokens ids [B, n] (forced_decode), eager."""
        with attention_kernels(self.model.device):
            return forced_decode(self.model.decode_step, logits, ids, cache, start_pos)

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, chunk_size: int | None = None) -> torch.Tensor:
        """Greedy decoding with the cache: [B, S] -> [B, S + max_new_tokens]."""
        batch, length = prompt.shape
        cache = self.new_cache(batch, length + max_new_tokens)
        logits = self.prefill(prompt, cache, chunk_size)
        first = logits.argmax(-1)
        rest = self.decode(logits, cache, length, max_new_tokens - 1) if max_new_tokens > 1 else first[:, :0]
        return torch.cat([prompt, first, rest], dim=1)[:, :length + max_new_tokens]


@dataclass
class Timings:
    """What Scenario.time measured: seconds per prefill, decode steps per second per repeat, and
    every decode step's interval."""

    prefill_s: list[float] = field(default_factory=list)        # one per repeat
    decode_steps_per_s: list[float] = field(default_factory=list)  # one per repeat that decoded
    step_s: list[float] = field(default_factory=list)           # all repeats' steps
    compile_s: float | None = None  # with compile: the first compiled step (compiles; on a GPU, captures)


class Scenario:
    """One prompt through an engine and its cache: the prefill, then `new_tokens` greedy decode
    steps, or, given the true continuation, teacher-forced scoring of it (`scores`). A benchmark
    point runs it once eager under its memory probe (prefill() and decode() apart) and then times
    it (time()); the cache is made ready for a new prompt before each timed run."""

    def __init__(self, engine: Engine, cache, prompt: torch.Tensor, chunk_size: int | None = None,
                 new_tokens: int = 0, continuation: torch.Tensor | None = None):
        self.engine, self.cache, self.prompt = engine, cache, prompt   # prompt [B, S]
        self.chunk_size = chunk_size  # None: the model's own schedule
        self.new_tokens = new_tokens
        self.continuation = continuation  # the true tokens after the prompt [1, n], to score
        self.scores: torch.Tensor | None = None  # log p of the continuation [1, n], once decoded

    @property
    def decodes(self) -> bool:
        return self.continuation is not None or self.new_tokens > 0

    def prefill(self, timer: StepTimer | None = None) -> torch.Tensor:
        """The prompt into the cache -> the last position's logits [B, 1, V]; with a timer, a mark
        before and after."""
        if timer is not None:
            timer.mark()
        logits = self.engine.prefill(self.prompt, self.cache, self.chunk_size)
        if timer is not None:
            timer.mark()
        return logits

    def decode(self, logits: torch.Tensor, eager: bool = False, timer: StepTimer | None = None) -> None:
        """After prefill(): the decode steps (a timer marks each), or the continuation's scores."""
        if self.continuation is not None:
            self.scores = self.engine.forced_decode(logits, self.cache, self.prompt.shape[1], self.continuation)
            return
        self.engine.decode(logits, self.cache, self.prompt.shape[1], self.new_tokens, eager=eager, timer=timer)

    def run(self) -> None:
        """An untimed, eager run (a warm-up): nothing it made outlives it."""
        logits = self.prefill()
        if self.decodes:
            self.decode(logits, eager=True)

    def time(self, repeats: int) -> Timings:
        """`repeats` runs, each on the cache made ready for a new prompt. With compile, the decode
        step is compiled first, its first call timed apart (compile_s). Prefill: one interval per
        repeat. Decode: the intervals between consecutive steps, so what runs before the first step
        (the peer's generate set-up) is never timed."""
        timings = Timings()
        if self.engine.compile and self.new_tokens > 0 and self.continuation is None:
            self.cache.reset()
            logits = self.prefill()
            timer = StepTimer(self.engine.model.device)
            timer.mark()
            self.engine.decode(logits, self.cache, self.prompt.shape[1], 1, timer=timer)
            timings.compile_s = timer.intervals()[0]
        for _ in range(repeats):
            self.cache.reset()
            timer = StepTimer(self.engine.model.device)
            logits = self.prefill(timer)
            timings.prefill_s += timer.intervals()
            if self.decodes:
                timer = StepTimer(self.engine.model.device)
                self.decode(logits, timer=timer)
                steps = timer.intervals()
                if steps:
                    timings.decode_steps_per_s.append(len(steps) / sum(steps))
                    timings.step_s += steps
        return timings


def generate(model: LanguageModel, prompt: torch.Tensor, max_new_tokens: int,
             chunk_size: int | None = None) -> torch.Tensor:
    """Greedy decoding with the model's eager decode step (Engine(model).generate)."""
    return Engine(model).generate(prompt, max_new_tokens, chunk_size)


def forced_decode(step: Step, logits: torch.Tensor, ids: torch.Tensor, cache, start_pos: int) -> torch.Tensor:
    """Teacher forcing through the decode step: given the logits [B, 1, V] that predict the token
    at start_pos (the prefill's last), and the true tokens ids [B, n] from start_pos on, feed each
    true token through `step` -> log p(ids[:, i]) for i = 0 .. n-1, [B, n] (fp32). n - 1 steps."""
    pos = torch.full((1,), start_pos, dtype=torch.long, device=ids.device)
    scores = []
    for i in range(ids.shape[1]):
        scores.append(torch.log_softmax(logits[:, -1].float(), -1).gather(1, ids[:, i:i + 1]))
        if i + 1 < ids.shape[1]:
            logits = step(ids[:, i:i + 1], cache, pos)
            pos += 1
    return torch.cat(scores, dim=1)


@torch.inference_mode()
def score(model: LanguageModel, ids: torch.Tensor, prompt_len: int, chunk_size: int | None = None) -> torch.Tensor:
    """Teacher-forced log-probabilities of ids[:, prompt_len:] through the model's own cached path:
    the first prompt_len tokens prefilled (in chunks of chunk_size), every later token fed one at a
    time through the decode step, so a cache policy's decode-time rules are what is scored.
    ids [B, L] -> log p(ids[:, i] | ids[:, :i]) for i = prompt_len .. L-1, [B, L - prompt_len] (fp32)."""
    batch, length = ids.shape
    if not 1 <= prompt_len < length:
        raise ValueError(f"prompt_len: got {prompt_len}; allowed: 1..{length - 1}")
    cache = model.new_cache(batch, length)
    logits = model.prefill(ids[:, :prompt_len], cache, chunk_size)                 # [B, 1, V]
    return forced_decode(model.decode_step, logits, ids[:, prompt_len:], cache, prompt_len)
