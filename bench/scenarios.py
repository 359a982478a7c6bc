"""The work a sweep point times and measures: a prefill of the prompt, then single-token decode."""

from __future__ import annotations

import time

import torch


class Scenario:
    """Prefill `prompt` [B, S] into a fresh cache, then decode `new_tokens` greedy tokens."""

    def __init__(self, model, prompt: torch.Tensor, new_tokens: int):
        self.model, self.prompt, self.new_tokens = model, prompt, new_tokens
        self.cache = None
        on_cuda = prompt.device.type == "cuda"
        # Kernels run asynchronously on a GPU: read the clock only once they are done.
        self.sync = torch.cuda.synchronize if on_cuda else (lambda: None)

    def new_cache(self) -> None:
        """A fresh cache for the next prefill (the LoopLM's last-loop sharing frees slots while
        decoding, so a cache is not reused). The old one goes first: two never coexist."""
        self.cache = None
        batch, seq_len = self.prompt.shape
        self.cache = self.model.new_cache(batch_size=batch, max_len=seq_len + self.new_tokens)

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
        times = []
        for step in range(self.new_tokens):
            start = time.perf_counter()
            logits = self.model(token, cache=self.cache, start_pos=seq_len + step, last_only=True)
            token = logits.argmax(-1)
            self.sync()
            times.append(time.perf_counter() - start)
        return times
