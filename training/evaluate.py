"""Evaluation of a trained model on the held-out set, through each model's real inference code.

accuracy:     exact match of the last query block's answers (and END), produced by greedy
              `model.generate` from the prompt: the model's own cache path (per-loop slots for the
              LoopLM, last-loop sharing when the config asks for it, MELT's chunked prefill and
              one-slot decode)
heldout_loss: cross-entropy at every answer position of the held-out set, from the model's
              uncached inference forward (MELT: chunk-wise with its config.chunk_size)
kv_bytes_per_token: the model's analytic cache bytes per token
peak_gen_bytes: the tracked probe's peak live bytes (weights touched, cache, activations) of one
              greedy generation from a long random prompt (batch 1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.measure.probes import TrackedProbe
from models.causal_lm import CausalLM

from .task import TaskSpec, targets


@torch.no_grad()
def accuracy(model: CausalLM, spec: TaskSpec, tokens: torch.Tensor, batch_size: int = 128) -> float:
    """Fraction of held-out sequences whose generated answer block equals the true one."""
    hits = 0
    for rows in torch.split(tokens.to(model.device), batch_size):
        generated = model.generate(rows[:, :spec.prompt_len], spec.answer_len)     # [b, seq_len]
        hits += (generated[:, spec.prompt_len:] == rows[:, spec.prompt_len:]).all(1).sum().item()
    return hits / tokens.shape[0]


@torch.no_grad()
def heldout_loss(model: CausalLM, tokens: torch.Tensor, mask: torch.Tensor, batch_size: int = 128) -> float:
    total, count = 0.0, 0
    tokens, mask = tokens.to(model.device), mask.to(model.device)
    for rows, m in zip(torch.split(tokens, batch_size), torch.split(mask, batch_size)):
        logits = model(rows)                                                         # [b, L, V]
        target = targets(rows, m)
        total += F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100,
                                 reduction="sum").item()
        count += (target != -100).sum().item()
    return total / count


def peak_generation_bytes(model: CausalLM, prompt_len: int, new_tokens: int, seed: int = 0) -> int:
    """Peak live-tensor bytes of one generation from a random prompt of prompt_len tokens."""
    prompt = torch.randint(model.config.vocab_size, (1, prompt_len),
                           generator=torch.Generator().manual_seed(seed)).to(model.device)
    probe = TrackedProbe()
    with probe.session(), probe.phase() as phase:
        model.generate(prompt, new_tokens)
    return phase.peak_bytes


def evaluate(model: CausalLM, spec: TaskSpec, tokens: torch.Tensor, mask: torch.Tensor,
             long_prompt_len: int, batch_size: int = 128) -> dict:
    return {
        "accuracy": accuracy(model, spec, tokens, batch_size),
        "heldout_loss": heldout_loss(model, tokens, mask, batch_size),
        "kv_bytes_per_token": model.kv_bytes_per_token(),
        "peak_gen_bytes": peak_generation_bytes(model, long_prompt_len, spec.answer_len),
    }
