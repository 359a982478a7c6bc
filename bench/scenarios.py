"""The work a sweep point times and measures: a prefill of the prompt, then single-token decode."""

from __future__ import annotations

import time

import torch


class Scenario:
    """Prefill `prompt` [B, S] into a fresh cache, then decode `new_tokens` greedy tokens with the
    model's fast decode step (static shapes; see CausalLM.decode_step), eager until compile()."""

    def __init__(self, model, prompt: torch.Tensor, new_tokens: int):
        self.model, self.prompt, self.new_tokens = model, prompt, new_tokens
        self.cache = None
        self.step = model.decode_step
        self.static = False  # caches marked static for CUDA graphs (see compile)
        on_cuda = prompt.device.type == "cuda"
        # Kernels run asynchronously on a GPU: read the clock only once they are done.
        self.sync = torch.cuda.synchronize if on_cuda else (lambda: None)
        self.compiled = False

    def compile(self) -> None:
        """Decode with the step compiled whole: CUDA graphs on a GPU ("reduce-overhead"), plain
        inductor on CPU. The first decode after this compiles (minutes at full size): warm up."""
        on_cuda = self.prompt.device.type == "cuda"
        self.step = self.model.compiled_decode_step(mode="reduce-overhead" if on_cuda else None)
        self.static = self.compiled = True

    def new_cache(self) -> None:
        """A fresh cache for the next prefill (the LoopLM's last-loop sharing frees slots while
        decoding, so a cache is not reused). The old one goes first: two never coexist.
        Compiled, a cache that still holds all its slots is reused: CUDA graphs read the buffers
        at fixed addresses, and new ones would make them record the step again. The prefill and
        the decode overwrite every row they read, so nothing stale is seen."""
        if self.static and self.cache is not None and self.cache.num_slots == len(self.cache.keys):
            return
        self.cache = None
        batch, seq_len = self.prompt.shape
        self.cache = self.model.new_cache(batch_size=batch, max_len=seq_len + self.new_tokens)
        if self.static:
            self.cache.mark_static()

    def prefill(self) -> tuple[torch.Tensor, float]:
        """-> (last position's logits [B, 1, V], seconds)."""
        self.sync()
        start = time.perf_counter()
        logits = self.model(self.prompt, cache=self.cache, start_pos=0, last_only=True)
        self.sync()
        return logits, time.perf_counter() - start

    def decode(self, logits: torch.Tensor) -> list[float]:
        """Greedy single-token steps after a prefill -> seconds of each step."""
        seq_len = self.prompt.shape[1]
        token = logits.argmax(-1)  # [B, 1]
        # The position is a tensor advanced in place: no step sees a new Python int (no recompile).
        pos = torch.full((1,), seq_len, dtype=torch.long, device=self.prompt.device)
        mark_step = torch.compiler.cudagraph_mark_step_begin if self.compiled else (lambda: None)
        times = []
        for _ in range(self.new_tokens):
            start = time.perf_counter()
            mark_step()  # CUDA graphs: the previous step's outputs may be overwritten now
            logits = self.step(token, self.cache, pos)
            token = logits.argmax(-1)
            pos += 1
            self.sync()
            times.append(time.perf_counter() - start)
        return times


class HFScenario:
    """The same scenario for the peer `hf_llama`, the way transformers users run it: its model
    forward fills its default cache (DynamicCache, what generate makes) with the prompt, then its
    own `generate` continues from that cache, greedy, for `new_tokens` steps. A logits processor
    reads the clock after each step, so per-step times come from inside generate."""

    compiled = False

    def __init__(self, model, prompt: torch.Tensor, new_tokens: int):
        self.model, self.prompt, self.new_tokens = model, prompt, new_tokens
        self.cache = None
        on_cuda = prompt.device.type == "cuda"
        self.sync = torch.cuda.synchronize if on_cuda else (lambda: None)

    def compile(self) -> None:
        raise ValueError("compile: hf_llama runs transformers' eager generate; allowed: compile=false")

    def new_cache(self) -> None:
        from transformers import DynamicCache

        self.cache = None
        self.cache = DynamicCache(config=self.model.hf.config)

    def kv_bytes(self) -> int:
        """Bytes the cache's tensors hold now (it allocates as it grows, not up front)."""
        return sum(t.numel() * t.element_size() for layer in self.cache.layers
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                   if isinstance(t, torch.Tensor))

    def prefill(self) -> tuple[torch.Tensor, float]:
        self.sync()
        start = time.perf_counter()
        out = self.model.hf(self.prompt, use_cache=True, logits_to_keep=1,
                            **{_cache_keyword(self.model.hf): self.cache})
        self.sync()
        return out.logits, time.perf_counter() - start

    def decode(self, logits: torch.Tensor) -> list[float]:
        from transformers import LogitsProcessorList

        ids = torch.cat([self.prompt, logits.argmax(-1)], dim=1)  # generate runs only the uncached token
        stamps = [time.perf_counter()]

        def clock(input_ids, scores):  # called once per step, after that step's forward
            self.sync()
            stamps.append(time.perf_counter())
            return scores

        self.model.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               **{_cache_keyword(self.model.hf): self.cache}, max_new_tokens=self.new_tokens,
                               min_new_tokens=self.new_tokens, logits_processor=LogitsProcessorList([clock]))
        return [b - a for a, b in zip(stamps, stamps[1:])]


def _cache_keyword(hf_model) -> str:
    """transformers renamed `past_key_values` to `cache` in its newest releases (the old name
    warns); older 5.x releases, as on the GPU machines, know only the old one."""
    import inspect

    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


def make_scenario(model, prompt: torch.Tensor, new_tokens: int):
    """The scenario for this model: ours, or transformers' own generate for the hf_llama peer."""
    if getattr(model, "arch", None) == "hf_llama":
        return HFScenario(model, prompt, new_tokens)
    return Scenario(model, prompt, new_tokens)
