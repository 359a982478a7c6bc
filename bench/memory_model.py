"""Analytic memory model: what a point should hold at its peak, from the config alone.

    predict(point) -> Prediction(weights, kv, prefill transient, decode transient, peaks)

Every row of a sweep carries these predictions beside what its probe measured (report.md shows
both), so a memory change that no formula explains stands out. The terms, in bytes (b = bytes per
element of the dtype, E = B*S*d*b one activation of a pass over S tokens, F = B*S*f*b one MLP
intermediate, Q = B*S*H*D*b, K = B*S*Hkv*D*b):

- weights: parameters x b, from the config (equal to model.weights_bytes(); a test checks it).
- KV cache: slots x 2*B*Hkv*(seq_len + new_tokens)*D*b, slots = N (standard, MELT) or N*T
  (LoopLM); preallocated for the whole run. A LoopLM with last-loop sharing keeps N slots after
  the prefill.
- prefill transient: the largest set of activations alive at once during a pass over S tokens
  (the whole prompt; one chunk of C tokens for MELT). It is the MLP of a layer: the layer's input
  (held by the caller), the residual after attention, the normed MLP input, and three [B, S, f]
  intermediates at `silu(gate) * up` -> 3E + 3F. MELT adds what lives across its chunks: the
  embedded prompt [B, L, d] (chunks are views of it), the N latents [B, C, d] of the current
  chunk, and the [C, start+C] bool attention mask of its largest chunk. The RoPE tables [S, D] x 2,
  the prompt's token ids and the last position's logits [B, 1, V] complete it.
- decode transient: the same for a pass over one token, and the prefill's logits. Attention runs
  in a fused kernel (flash or memory-efficient SDPA) that keeps no [S, L] scores.

It models the code as written (tensors PyTorch keeps alive between ops), not the allocator: the
CUDA probe adds block rounding, library workspaces and fragmentation, the reason the GPU check
compares the three (see scripts/gpu_check.sh).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models import make_config
from models.melt import chunk_bounds


@dataclass(frozen=True)
class Prediction:
    weights_bytes: int
    kv_bytes: int                 # the cache as allocated before the prefill
    kv_decode_bytes: int          # the cache during decode (less with last-loop sharing)
    prefill_transient_bytes: int
    decode_transient_bytes: int

    @property
    def prefill_peak_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.prefill_transient_bytes

    @property
    def decode_peak_bytes(self) -> int:
        return self.weights_bytes + self.kv_decode_bytes + self.decode_transient_bytes

    def columns(self, scenario: str) -> dict:
        """The predicted_* columns of a result row for `scenario` (prefill | decode | generate)."""
        prefill = self.prefill_peak_bytes
        decode = self.decode_peak_bytes if scenario != "prefill" else None
        phases = [v for v, used in ((prefill, scenario != "decode"), (decode, decode is not None)) if used]
        return {"predicted_kv_bytes": self.kv_bytes,
                "predicted_prefill_bytes": prefill,
                "predicted_decode_bytes": decode,
                "predicted_peak_bytes": max(phases)}


def num_parameters(c) -> int:
    """Parameters of a model of config `c` (models/: layers.py, ouro.py, melt.py)."""
    d, f, N = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    attention = d * c.num_attention_heads * c.head_dim * 2 + d * c.num_key_value_heads * c.head_dim * 2
    layer = attention + 3 * d * f + 4 * d                     # q, k, v, o; SwiGLU; four norms
    table = c.vocab_size * d
    total = table * (1 if c.tie_word_embeddings else 2) + N * layer + d  # + final norm
    if c.arch in ("ouro", "melt"):
        total += d + 1                                        # early-exit gate Linear(d, 1)
    if c.arch == "melt":
        total += N * {"gated": 2 * d * d + d, "scalar": 1}.get(c.cache_update, 0)
    return total


def kv_slots(c) -> int:
    return c.num_hidden_layers * (c.loops if c.arch == "ouro" else 1)


def kv_bytes(c, batch: int, length: int, dtype: torch.dtype) -> int:
    return kv_slots(c) * 2 * batch * c.num_key_value_heads * length * c.head_dim * dtype.itemsize


def kv_bytes_per_token(c, dtype: torch.dtype) -> int:
    return kv_bytes(c, 1, 1, dtype)


def pass_bytes(c, batch: int, tokens: int, dtype: torch.dtype) -> int:
    """Peak activations of one layer over `tokens` tokens: 3E + 3F (see the module doc), and the
    RoPE tables of the pass."""
    b = dtype.itemsize
    E = batch * tokens * c.hidden_size * b
    F = batch * tokens * c.intermediate_size * b
    rope = 2 * tokens * c.head_dim * b
    return 3 * E + 3 * F + rope


def predict(model: str, size: str, loops: int, seq_len: int, batch: int, new_tokens: int,
            dtype: str | torch.dtype, scenario: str = "generate", **options) -> Prediction:
    """The prediction for one point of a size preset."""
    return predict_config(make_config(model, size=size, loops=loops, **options), seq_len, batch,
                          new_tokens, dtype, scenario)


def predict_point(point) -> Prediction:
    """predict() for a resolved bench.config.BenchConfig (its checkpoint's config if it has one)."""
    from .config import model_config

    return predict_config(model_config(point), point.seq_len, point.batch, point.new_tokens,
                          point.dtype, point.scenario)


def predict_config(c, seq_len: int, batch: int, new_tokens: int, dtype: str | torch.dtype,
                   scenario: str = "generate") -> Prediction:
    """The prediction for a model of config `c` (models.LoopConfig) at one point."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    b = dtype.itemsize
    length = seq_len + (new_tokens if scenario != "prefill" else 0)
    kv = kv_bytes(c, batch, length, dtype)
    kv_decode = kv // c.loops if (c.arch == "ouro" and c.kv_sharing == "last_loop") else kv
    logits = batch * c.vocab_size * b
    ids = batch * seq_len * 8                                 # the prompt's int64 token ids
    prompt = batch * seq_len * c.hidden_size * b              # the embedded prompt (MELT: sliced per chunk)
    if c.arch == "melt" and seq_len > c.chunk_size:
        # The largest chunk pass: its activations and latents, and its [C, end] bool mask (the
        # first chunk needs none).
        chunk = max(pass_bytes(c, batch, end - begin, dtype)
                    + c.num_hidden_layers * batch * (end - begin) * c.hidden_size * b
                    + ((end - begin) * end if begin > 0 else 0)
                    for begin, end in chunk_bounds(seq_len, c.chunk_size))
        prefill = ids + prompt + chunk + logits
    else:
        exits = c.loops * prompt if (c.arch == "ouro" and c.exit_policy != "last") else 0
        latents = c.num_hidden_layers * prompt if c.arch == "melt" else 0
        prefill = ids + prompt + pass_bytes(c, batch, seq_len, dtype) + exits + latents + logits
    decode = ids + pass_bytes(c, batch, 1, dtype) + 2 * logits  # this step's and the last step's logits
    return Prediction(num_parameters(c) * b, kv, kv_decode, prefill, decode)
