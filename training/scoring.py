"""Scoring through the model's own cache, and quality on held-out text (bits per byte, next-byte
accuracy).

cached_scores: each sequence's first prompt_len tokens prefilled, every later token fed through the
decode step with the true token each time (teacher forcing), so a decode-time cache policy
(last_loop, first_loop, ...) is what is scored; -> log p and argmax hit of every later token.
cached_quality: that, summarized over a text's bytes. exit_bits_per_byte scores every loop exit of
a LoopLM at once, uncached (the training forward), at every position of the windows.

Only targets that are bytes count (corpus.byte_mask): END_OF_TEXT separators are not text.
bits per byte = sum over counted targets of -log2 p(target) / their number (one token = one byte).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.causal_lm import CausalLM

from .corpus import byte_mask
from .student import loop_forward


def summarize(logp: torch.Tensor, hit: torch.Tensor, mask: torch.Tensor) -> dict:
    """logp, hit, mask [B, n] (log p of each target in nats, argmax == target, counted?) ->
    bits_per_byte, accuracy (next-byte), heldout_loss (nats per byte)."""
    count = mask.sum().item()
    nats = -(logp * mask).sum().item() / count
    return {"bits_per_byte": nats / math.log(2), "accuracy": (hit & mask).sum().item() / count,
            "heldout_loss": nats}


@torch.inference_mode()
def cached_scores(model: CausalLM, tokens: torch.Tensor, prompt_len: int,
                  batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, L] -> (log p, argmax == target), each [B, L - prompt_len], of targets
    prompt_len .. L-1 through prefill + decode steps (on the CPU)."""
    logps, hits = [], []
    for rows in torch.split(tokens.to(model.device), batch_size):
        b, L = rows.shape
        cache = model.new_cache(b, L)
        logits = model.prefill(rows[:, :prompt_len], cache)                   # [b, 1, V]: predicts prompt_len
        pos = torch.full((1,), prompt_len, dtype=torch.long, device=rows.device)
        lp, hit = [], []
        for i in range(prompt_len, L):
            target = rows[:, i:i + 1]                                          # [b, 1]
            lp.append(torch.log_softmax(logits[:, -1].float(), -1).gather(1, target))
            hit.append(logits[:, -1].argmax(-1, keepdim=True) == target)
            if i + 1 < L:
                logits = model.decode_step(target, cache, pos)
                pos += 1
        logps.append(torch.cat(lp, 1).cpu())
        hits.append(torch.cat(hit, 1).cpu())
    return torch.cat(logps), torch.cat(hits)


def cached_quality(model: CausalLM, tokens: torch.Tensor, prompt_len: int, batch_size: int = 64) -> dict:
    """tokens [B, L] of text: its bytes prompt_len .. L-1 scored through prefill + decode steps
    (cached_scores) -> summarize()."""
    logp, hit = cached_scores(model, tokens, prompt_len, batch_size)
    return summarize(logp, hit, byte_mask(tokens)[:, prompt_len - 1:-1])        # mask[i-1]: target i is a byte


@torch.no_grad()
def exit_bits_per_byte(model: CausalLM, tokens: torch.Tensor, batch_size: int = 64) -> list[dict]:
    """Every loop exit of `model` (one uncached training forward), all positions of tokens [B, L]
    -> one summarize() dict per exit."""
    parts: list[list[tuple]] = []
    for rows in torch.split(tokens.to(model.device), batch_size):
        out = loop_forward(model, rows, alpha=0.0)
        target, mask = rows[:, 1:], byte_mask(rows)[:, :-1]                   # [b, L-1]
        per_exit = []
        for lg in out.exit_logits:                                             # [b, L, V]
            lg = lg[:, :-1].float()
            logp = -F.cross_entropy(lg.transpose(1, 2), target, reduction="none")
            per_exit.append((logp.cpu(), (lg.argmax(-1) == target).cpu(), mask.cpu()))
        parts.append(per_exit)
    return [summarize(*(torch.cat([p[t][k] for p in parts]) for k in range(3))) for t in range(len(parts[0]))]
