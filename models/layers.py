"""The layers every model is built from (the base model class is in models/causal_lm.py).

The decoder layer is Ouro's: sandwich RMSNorm (four norms), RoPE, SwiGLU, no biases. All three
models use it unchanged, so any memory difference between them comes from the cache policy alone.
Parameter names follow Ouro's Hugging Face checkpoints (`model.layers.{i}.self_attn.q_proj`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import LoopConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back to the input dtype, then scale (Ouro / Llama order).
        # F.rms_norm computes x * rsqrt(mean(x^2) + eps), the same ops in fewer calls.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


@dataclass
class Positions:
    """Where a block of S tokens sits: RoPE tables for its positions and the attention mask.

    Built once per forward (per chunk for MELT) and reused by every layer and loop.
    """
    start: int | torch.Tensor        # position of the block's first token (a tensor [1]: Positions.at)
    cos: torch.Tensor                # [S, D]: computed in fp32, applied in the activations' dtype (as HF)
    sin: torch.Tensor                # [S, D], its first half negated (see rotate)
    mask: torch.Tensor | None        # [S, start+S] bool, only when start > 0 and S > 1

    @staticmethod
    def tables(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin [S, D] for float positions pos [S] (computed in fp32)."""
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
        freqs = pos[:, None] * inv_freq                            # [S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                    # [S, D]
        sign = torch.ones(head_dim, device=pos.device)
        sign[: head_dim // 2] = -1
        return emb.cos().to(dtype), (emb.sin() * sign).to(dtype)

    @classmethod
    def make(cls, start: int, length: int, head_dim: int, theta: float, dtype: torch.dtype,
             device: torch.device) -> "Positions":
        pos = torch.arange(start, start + length, device=device, dtype=torch.float32)
        mask = None
        if start > 0 and length > 1:
            # Query i (absolute start+i) sees keys 0..start+i. When start == 0 the plain causal
            # mask applies and SDPA needs no tensor; a single query sees everything before it.
            # (torch's CausalBias would avoid the tensor, but as a tensor subclass it cannot be
            # made under the memory probes' dispatch modes; [C, start+C] bool is small.)
            keys = torch.arange(start + length, device=device)
            mask = keys[None, :] <= pos.long()[:, None]
        return cls(start, *cls.tables(pos, head_dim, theta, dtype), mask)

    @classmethod
    def at(cls, pos: torch.Tensor, max_len: int, head_dim: int, theta: float, dtype: torch.dtype) -> "Positions":
        """One decode token at position `pos` (an int64 tensor [1]) over a cache of max_len rows:
        the fast, compile-friendly step. Shapes depend on max_len only, never on the position, and
        nothing reads the position back to Python: `start` is the tensor itself (KVCache.update
        writes row pos in place) and the mask [1, max_len] hides rows past pos."""
        mask = torch.arange(max_len, device=pos.device)[None, :] <= pos[:, None]   # [1, max_len]
        return cls(pos, *cls.tables(pos.float(), head_dim, theta, dtype), mask)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE on x [B, H, S, D]: x * cos + cat(-x2, x1) * sin, with x = cat(x1, x2).
        cat(-x2, x1) * sin == roll(x, D/2) * sin_signed (sin with its first half negated): the
        same values, exactly, in one op instead of three."""
        return x * self.cos + x.roll(x.shape[-1] // 2, dims=-1) * self.sin


class Attention(nn.Module):
    def __init__(self, config: LoopConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, kv_input: torch.Tensor, pos: Positions,
                cache: KVCache | None, slot: int, write: bool = True) -> torch.Tensor:
        """Queries from x [B, S, d]; keys and values from kv_input [B, S, d] (x itself, except for
        MELT's latent). With a cache, K/V go to rows pos.start.. of `slot` and attention covers
        rows 0..pos.start+S of that slot. write=False: no K/V of its own (not even computed); the
        queries read what `slot` holds (its rows for these tokens were written by an earlier loop)."""
        q = self.queries(x, pos)                                                               # [B, H, S, D]
        if write:
            k, v = self.keys_values(kv_input, pos)                                              # [B, Hkv, S, D]
            if cache is not None:
                k, v = cache.update(slot, pos.start, k, v)                                      # [B, Hkv, start+S, D]
        else:
            k, v = cache.read(slot, pos.start, x.shape[1])
        return self.output(attend(q, k, v, pos.mask))

    def queries(self, x: torch.Tensor, pos: Positions) -> torch.Tensor:
        """x [B, S, d] -> rotated queries [B, H, S, D]."""
        B, S, _ = x.shape
        return pos.rotate(self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2))

    def keys_values(self, x: torch.Tensor, pos: Positions) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, d] -> rotated keys and values [B, Hkv, S, D]."""
        B, S, _ = x.shape
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return pos.rotate(k), v

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output [B, H, S, D] -> o_proj of the heads concatenated [B, S, d]."""
        B, _, S, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of q [B, H, S, D] over k, v [B, Hkv, L, D] -> [B, H, S, D], causal when
    there is no mask, never repeating K/V for grouped-query attention (H = G * Hkv).

    SDPA's `enable_gqa` is passed only without a mask: on a GPU, a masked grouped call has no fused
    kernel and falls back to the math kernel, which repeats K/V G times (at 32K tokens, hundreds of
    MB per layer per step). With a mask, the G query heads of a group ride along the query axis
    instead: q becomes [B, Hkv, G * S, D] (row g * S + s is head kv * G + g, token s) against the
    unrepeated K/V, and the mask [S, L] is stacked G times (the decode step's [1, L] broadcasts)."""
    B, H, S, D = q.shape
    groups = H // k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, enable_gqa=groups > 1)
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    folded = q.reshape(B, k.shape[1], groups * S, D)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask.repeat(groups, 1) if S > 1 else mask)
    return out.view(B, H, S, D)


class MLP(nn.Module):
    def __init__(self, config: LoopConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Ouro's sandwich-norm layer. Checkpoint names mislead; the order is:
        x = x + input_layernorm_2(attn(input_layernorm(x)))
        x = x + post_attention_layernorm_2(mlp(post_attention_layernorm(x)))
    """

    def __init__(self, config: LoopConfig):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(d, eps)             # before attention
        self.input_layernorm_2 = RMSNorm(d, eps)           # after attention
        self.post_attention_layernorm = RMSNorm(d, eps)    # before the MLP
        self.post_attention_layernorm_2 = RMSNorm(d, eps)  # after the MLP

    def forward(self, x: torch.Tensor, pos: Positions, cache: KVCache | None = None, slot: int = 0,
                latent=None, write: bool = True, attention=None) -> torch.Tensor:
        """x [B, S, d] -> [B, S, d]. `latent(u) -> h` lets MELT derive K/V from its gated latent
        instead of the attention input u; the other models pass None. write=False: the attention
        reads `slot` without K/V of its own (Attention.forward). `attention(self_attn, u) -> [B, S, d]`
        replaces the attention sub-layer (LoopCoder's gated window attention), with the same
        weights and norms around it."""
        x = x + self.input_layernorm_2(self._attend(x, pos, cache, slot, latent, write, attention))
        return x + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x)))

    def _attend(self, x, pos, cache, slot, latent, write, attention) -> torch.Tensor:
        # Its own function so that u and the latent [B, S, d] are freed before the MLP runs.
        u = self.input_layernorm(x)
        if attention is not None:
            return attention(self.self_attn, u)
        return self.self_attn(u, u if latent is None else latent(u), pos, cache, slot, write)


class Backbone(nn.Module):
    """The `model.` prefix of the checkpoint: embeddings, layers, final norm."""

    def __init__(self, config: LoopConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def chunk_bounds(length: int, chunk_size: int | Sequence[int]) -> list[tuple[int, int]]:
    """[(begin, end)] covering 0..length in chunks of chunk_size (or of the given sizes)."""
    sizes = [chunk_size] * -(-length // chunk_size) if isinstance(chunk_size, int) else list(chunk_size)
    bounds, begin = [], 0
    for size in sizes:
        if begin >= length:
            break
        bounds.append((begin, min(begin + size, length)))
        begin += size
    if begin < length:
        raise ValueError(f"chunk_size: sizes {list(chunk_size)} cover {begin} of {length} tokens")
    return bounds
