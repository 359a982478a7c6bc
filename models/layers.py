"""The layers every model is built from (the base model class is in models/causal_lm.py).

The decoder layer is Ouro's: sandwich RMSNorm (four norms), RoPE, SwiGLU, no biases. All three
models use it unchanged, so any memory difference between them comes from the cache policy alone.
Parameter names follow Ouro's Hugging Face checkpoints (`model.layers.{i}.self_attn.q_proj`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cache import Slot
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
        nothing reads the position back to Python: `start` is the tensor itself (Slot.update
        writes row pos in place) and the mask [1, max_len] hides rows past pos."""
        mask = torch.arange(max_len, device=pos.device)[None, :] <= pos[:, None]   # [1, max_len]
        return cls(pos, *cls.tables(pos.float(), head_dim, theta, dtype), mask)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE on x [B, H, S, D]: x * cos + cat(-x2, x1) * sin, with x = cat(x1, x2).
        cat(-x2, x1) * sin == roll(x, D/2) * sin_signed (sin with its first half negated): the
        same values, exactly, in one op instead of three."""
        return x * self.cos + x.roll(x.shape[-1] // 2, dims=-1) * self.sin


class LinearView(NamedTuple):
    """Rows of a fused projection, read and called like the nn.Linear they stand for (writes to
    .weight go through to the fused matrix)."""

    weight: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def fuse_on_load(module: nn.Module, fused: str, parts: Sequence[str]) -> None:
    """Keep the checkpoint's separate matrices (`parts`, e.g. q_proj, k_proj, v_proj) for a module
    that holds them stacked along the output axis as one `fused` Linear: state_dict() and
    checkpoints split it, load_state_dict() stacks them again. A partial set is left as it is, so
    loading reports it as missing or unexpected."""
    def split(module, state_dict, prefix, local_metadata):
        weight = state_dict.pop(prefix + fused + ".weight")
        for name, rows in zip(parts, weight.split(module.fused_rows[fused])):
            state_dict[prefix + name + ".weight"] = rows

    def stack(module, state_dict, prefix, *args):
        names = [prefix + name + ".weight" for name in parts]
        if all(n in state_dict for n in names):
            state_dict[prefix + fused + ".weight"] = torch.cat([state_dict.pop(n) for n in names])

    module.register_state_dict_post_hook(split)
    module.register_load_state_dict_pre_hook(stack)


class Attention(nn.Module):
    """Grouped-query attention with RoPE. q, k and v are one matrix, qkv_proj [(H + 2 Hkv) D, d]:
    the decode step computes them in one product (one weight read, one kernel), the eager paths
    row by row (q from one input, k and v from another for MELT; first_writes' later loops need q
    only). Checkpoints keep q_proj, k_proj and v_proj (fuse_on_load)."""

    def __init__(self, config: LoopConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        d, hd = config.hidden_size, config.head_dim
        self.fused_rows = {"qkv_proj": [self.num_heads * hd, self.num_kv_heads * hd, self.num_kv_heads * hd]}
        self.qkv_proj = nn.Linear(d, sum(self.fused_rows["qkv_proj"]), bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)
        fuse_on_load(self, "qkv_proj", ("q_proj", "k_proj", "v_proj"))

    @property
    def q_proj(self) -> LinearView:
        return LinearView(self.qkv_proj.weight[:self.num_heads * self.head_dim])

    @property
    def k_proj(self) -> LinearView:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return LinearView(self.qkv_proj.weight[q:q + kv])

    @property
    def v_proj(self) -> LinearView:
        return LinearView(self.qkv_proj.weight[self.num_heads * self.head_dim + self.num_kv_heads * self.head_dim:])

    def forward(self, x: torch.Tensor, kv_input: torch.Tensor, pos: Positions, slot: Slot | None,
                write: bool = True) -> torch.Tensor:
        """Queries from x [B, S, d]; keys and values from kv_input [B, S, d] (x itself, except for
        MELT's latent). With a cache slot, K/V go to its rows pos.start.. and attention covers its
        rows 0..pos.start+S. write=False: no K/V of its own (not even computed); the queries read
        what the slot holds (its rows for these tokens were written by an earlier loop)."""
        if write and kv_input is x and torch.compiler.is_compiling():
            q, k, v = self.fused_qkv(x, pos)                  # the compiled step: one product
        else:
            q = self.queries(x, pos)                                                           # [B, H, S, D]
            k, v = self.keys_values(kv_input, pos) if write else (None, None)                  # [B, Hkv, S, D]
        if write and slot is not None:
            k, v = slot.update(pos.start, k, v)                                                # [B, Hkv, start+S, D]
        elif not write:
            k, v = slot.read(pos.start, x.shape[1])
        return self.output(attend(q, k, v, pos.mask))

    def fused_qkv(self, x: torch.Tensor, pos: Positions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, d] -> rotated q [B, H, S, D], rotated k and v [B, Hkv, S, D], from one product."""
        B, S, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2).split(
            [self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        return pos.rotate(q), pos.rotate(k), v

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
    unrepeated K/V, and the mask [S, L] is stacked G times (the decode step's [1, L] broadcasts).
    On a GPU under torch.compile, a single query takes attend_one (decode attention the compiler
    fuses); on a CPU, SDPA's own kernel is the faster (docs/speed.md)."""
    B, H, S, D = q.shape
    groups = H // k.shape[1]
    if S == 1 and mask is not None and q.is_cuda and torch.compiler.is_compiling():
        return attend_one(q, k, v, mask)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, enable_gqa=groups > 1)
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    folded = q.reshape(B, k.shape[1], groups * S, D)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask.repeat(groups, 1) if S > 1 else mask)
    return out.view(B, H, S, D)


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per sequence, q [B, H, 1, D], over the whole cache k, v [B, Hkv, L, D] where mask
    [1, L] allows -> [B, H, 1, D]: the compiled decode step's attention, written as products and
    reductions, in fp32, for the compiler to fuse. At batch 1 a fused attention kernel gives each
    (sequence, head) one block, a few dozen blocks on a GPU of over a hundred cores; these
    reductions run across the L rows of every head instead (inductor splits a long reduction over
    many blocks, as flash-decoding splits the context). Eager code never takes this path: it would
    materialise [B, Hkv, G, L, D]."""
    B, H, _, D = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(B, kv_heads, H // kv_heads, 1, D).float() * D ** -0.5               # [B, Hkv, G, 1, D]
    scores = (q * k[:, :, None].float()).sum(-1)                                       # [B, Hkv, G, L]
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    out = (weights[..., None] * v[:, :, None].float()).sum(-2)                         # [B, Hkv, G, D]
    return out.reshape(B, H, 1, D).to(v.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). gate and up are one matrix, gate_up_proj [2F, d], for the
    compiled decode step's one product; eager code takes them row by row (its peak stays that of
    two [B, S, F] products, not one [B, S, 2F]). Checkpoints keep gate_proj and up_proj."""

    def __init__(self, config: LoopConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.fused_rows = {"gate_up_proj": [f, f]}
        self.gate_up_proj = nn.Linear(d, 2 * f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        fuse_on_load(self, "gate_up_proj", ("gate_proj", "up_proj"))

    @property
    def gate_proj(self) -> LinearView:
        return LinearView(self.gate_up_proj.weight[:self.gate_up_proj.out_features // 2])

    @property
    def up_proj(self) -> LinearView:
        return LinearView(self.gate_up_proj.weight[self.gate_up_proj.out_features // 2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
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

    def forward(self, x: torch.Tensor, pos: Positions, slot: Slot | None = None, latent=None,
                write: bool = True, attention=None) -> torch.Tensor:
        """x [B, S, d] -> [B, S, d], K/V in the cache slot `slot` (None: no cache). `latent(u) -> h`
        lets MELT derive K/V from its gated latent instead of the attention input u; the other
        models pass None. write=False: the attention reads `slot` without K/V of its own
        (Attention.forward). `attention(self_attn, u) -> [B, S, d]` replaces the attention
        sub-layer (LoopCoder's gated window attention), with the same weights and norms around it."""
        x = x + self.input_layernorm_2(self._attend(x, pos, slot, latent, write, attention))
        return x + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x)))

    def _attend(self, x, pos, slot, latent, write, attention) -> torch.Tensor:
        # Its own function so that u and the latent [B, S, d] are freed before the MLP runs.
        u = self.input_layernorm(x)
        if attention is not None:
            return attention(self.self_attn, u)
        return self.self_attn(u, u if latent is None else latent(u), pos, slot, write)


class Eager:
    """How a model's loop runs one layer application: `apply(fn, *args)`, where fn is a function
    of a layer (and its gate) and tensors, at module level in the model's file. This one calls fn
    as it is (prefill, the memory pass, the eager decode step); the compiled decode step passes
    models.compiled.CompiledLayers, which compiles each fn once and reuses it for every layer and
    loop. loop(t) is loop t's index as fn should receive it: here the int, there a tensor, so that
    nothing a compiled fn sees changes from one loop to the next. frees_early: whether fn must let
    go of a tensor the moment it is no longer needed (here, since the memory pass measures every
    byte; a compiled step may keep a small one a layer longer if that spares it a graph)."""

    frees_early = True

    def __call__(self, fn, *args):
        return fn(*args)

    def loop(self, t: int) -> int | torch.Tensor:
        return t


EAGER = Eager()


def decoder_layer(layer: "DecoderLayer", x: torch.Tensor, pos: Positions, slot: Slot | None) -> torch.Tensor:
    """The layer application of the standard model and the LoopLM: x [B, S, d] -> [B, S, d]."""
    return layer(x, pos, slot)


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
