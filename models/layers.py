"""Layers shared by all three models, and their common base class.

The decoder layer is Ouro's: sandwich RMSNorm (four norms), RoPE, SwiGLU, no biases. All three
models use it unchanged, so any memory difference between them comes from the cache policy alone.
Parameter names follow Ouro's Hugging Face checkpoints (`model.layers.{i}.self_attn.q_proj`, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import ConfigError, LoopConfig


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


class CausalLM(nn.Module):
    """What the three models share: embeddings, LM head, cache set-up, input checks, the prompt's
    (chunked) forward, the static decode step, and checkpoints. Subclasses say how many KV slots
    they need and how the layers run over a block of tokens (run_positions)."""

    arch: str = ""
    compilable = True  # decode_step goes under torch.compile whole (models/runtime.py)
    # Whether every full-size prefill chunk from the third on runs the same ops, on tensors whose
    # sizes depend on where the chunk starts only through one key axis of length L = start + C (the
    # mask [C, L] and what attend / SDPA make of it; the cache is read through views [B, Hkv, L, D]).
    # The fake probe may then skip chunks (bench/probes.py, FakeLiveTensors.prefill_chunks). True for
    # the standard model, the LoopLM (every policy) and MELT; not for LoopCoder, whose window
    # attention gathers min(start, W - 1) earlier rows.
    affine_chunks = False
    # Checkpoint keys a model may lack (freshly initialised) or ignore when loading.
    optional_keys: tuple[str, ...] = ()
    ignored_keys: tuple[str, ...] = ()

    def __init__(self, config: LoopConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- what subclasses define -------------------------------------------------------------
    def num_cache_slots(self) -> int:
        raise NotImplementedError

    def run_positions(self, x: torch.Tensor, cache: KVCache | None, pos: Positions,
                      last_only: bool) -> torch.Tensor:
        """The layers over a block of embedded tokens x [B, S, d] at `pos` -> final normed hidden
        states [B, S, d] ([B, 1, d] may do when last_only)."""
        raise NotImplementedError

    def num_decode_slots(self) -> int:
        """Slots the cache holds after the prefill (fewer for a policy that merges them)."""
        return self.num_cache_slots()

    def needs_cache(self) -> bool:
        """Whether even an uncached forward needs a scratch cache (a loop reading another's K/V)."""
        return False

    def default_chunk_size(self) -> int | None:
        """The chunk of a forward that names none: one pass (None), except where chunks are part of
        the method (MELT)."""
        return None

    def end_prefill(self, cache: KVCache) -> None:
        """The prompt is in: a cache policy that keeps more during the prefill than after it
        (the LoopLM's last-loop sharing) lets go of the rest here."""

    # -- weights ------------------------------------------------------------------------------
    def init_weights(self, std: float = 0.02, prefix: str = "") -> None:
        """Random init in the usual HF style: N(0, std) matrices, unit norms, zero biases and zero
        for any other parameter; only the modules under `prefix` (e.g. "model.latent_gates")."""
        for name, module in self.named_modules():
            if not name.startswith(prefix):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            else:
                for p in module.parameters(recurse=False):
                    nn.init.zeros_(p)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once

    def weights_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # -- cache --------------------------------------------------------------------------------
    def _check_max_len(self, max_len: int) -> None:
        limit = self.config.max_position_embeddings
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= limit:
            raise ConfigError("max_len", f"got {max_len!r}", f"an integer in 1..{limit} (max_position_embeddings)")

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A KV cache preallocated for batch_size sequences of up to max_len tokens."""
        self._check_max_len(max_len)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size", f"got {batch_size!r}", "an integer >= 1")
        c = self.config
        return KVCache(self.num_cache_slots(), batch_size, c.num_key_value_heads, max_len, c.head_dim,
                       self.dtype, self.device)

    def kv_cache_bytes(self, batch_size: int, max_len: int) -> int:
        """Analytic size of new_cache(batch_size, max_len), without allocating it."""
        c = self.config
        return self.num_cache_slots() * KVCache.slot_bytes(batch_size, c.num_key_value_heads, max_len,
                                                            c.head_dim, self.dtype)

    def kv_bytes_per_token(self) -> int:
        return self.kv_cache_bytes(1, 1)

    def kv_decode_bytes(self, batch_size: int, max_len: int) -> int:
        """Analytic size of the cache after the prefill (num_decode_slots)."""
        c = self.config
        return self.num_decode_slots() * KVCache.slot_bytes(batch_size, c.num_key_value_heads, max_len,
                                                             c.head_dim, self.dtype)

    # -- forward ------------------------------------------------------------------------------
    def positions(self, start: int, length: int) -> Positions:
        c = self.config
        return Positions.make(start, length, c.head_dim, c.rope_theta, self.dtype, self.device)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0,
                last_only: bool = False, chunk_size: int | Sequence[int] | None = None,
                end_prefill: bool = True) -> torch.Tensor:
        """input_ids [B, S] at positions start_pos.. -> logits [B, S, V], or [B, 1, V] for the last
        position only (a long prefill then never materialises [B, S, V]).

        chunk_size (an int, or a list of chunk lengths; default: default_chunk_size()) runs the
        tokens chunk after chunk, every loop of a chunk before the next one starts; later chunks
        read earlier chunks' K/V from the cache (a scratch cache when none is given). For the
        standard model and the per-loop LoopLM that is exactly the one-pass result; for MELT the
        chunks are part of the method. A prompt given in several calls is one prefill: pass
        end_prefill=False to all calls but the last (see end_prefill())."""
        self._check_inputs(input_ids, cache, start_pos)
        B, S = input_ids.shape
        bounds = chunk_bounds(S, chunk_size or self.default_chunk_size() or S)
        if cache is None and (len(bounds) > 1 or self.needs_cache()):
            cache = self.new_cache(B, S)
        hidden = []
        chunks = bounds
        if last_only and self.affine_chunks:
            # Fake tensors hold no data: the fake memory probe runs only the chunks that bound the peak.
            fake = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)
            chunks = fake.prefill_chunks(bounds) if hasattr(fake, "prefill_chunks") else bounds
        for begin, end in chunks:
            if last_only:  # earlier chunks only fill the cache: free their output before the next
                hidden.clear()
            # The chunk's embedding [B, C, d] is not named here: the layers free it once used.
            hidden.append(self.run_positions(self.model.embed_tokens(input_ids[:, begin:end]), cache,
                                             self.positions(start_pos + begin, end - begin), last_only))
        if cache is not None and end_prefill:
            self.end_prefill(cache)
        hidden = torch.cat(hidden, dim=1) if len(hidden) > 1 else hidden[0]
        return self.lm_head(hidden[:, -1:] if last_only else hidden)

    def _check_inputs(self, input_ids: torch.Tensor, cache: KVCache | None, start_pos: int) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1 \
                or input_ids.dtype not in (torch.int32, torch.int64):
            raise ConfigError("input_ids", f"got {getattr(input_ids, 'shape', type(input_ids))}",
                              "an integer tensor [batch, seq_len] with seq_len >= 1")
        B, S = input_ids.shape
        if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
            raise ConfigError("start_pos", f"got {start_pos!r}", "an integer >= 0")
        if cache is None:
            if start_pos != 0:
                raise ConfigError("start_pos", f"{start_pos} without a cache", "0 (or pass the cache)")
            self._check_max_len(S)
            return
        if B != cache.batch_size:
            raise ConfigError("input_ids", f"batch {B} but the cache holds {cache.batch_size}",
                              f"batch {cache.batch_size}")
        if start_pos + S > cache.max_len:
            raise ConfigError("start_pos", f"start_pos {start_pos} + length {S} is beyond the cache "
                              f"(max_len {cache.max_len})", f"start_pos + length <= {cache.max_len}")

    # -- the runtime's interface (models/runtime.py) ---------------------------------------------
    def prefill(self, input_ids: torch.Tensor, cache: KVCache, chunk_size: int | None = None) -> torch.Tensor:
        """The prompt [B, S] into a fresh cache -> logits of its last position [B, 1, V]."""
        return self(input_ids, cache=cache, start_pos=0, last_only=True, chunk_size=chunk_size)

    def decode_step(self, token: torch.Tensor, cache: KVCache, pos: torch.Tensor) -> torch.Tensor:
        """One decode token per sequence, token [B, 1] at position pos (int64 tensor [1]) -> logits
        [B, 1, V]. Same result as self(token, cache=cache, start_pos=int(pos), last_only=True), but
        with static shapes (attention covers all max_len rows of the cache, masked past pos) and no
        Python value that changes per step, so torch.compile captures the whole step once (and
        CUDA graphs replay it). No input checks here: they would read pos back to Python."""
        c = self.config
        positions = Positions.at(pos, cache.max_len, c.head_dim, c.rope_theta, self.dtype)
        hidden = self.run_positions(self.model.embed_tokens(token), cache, positions, last_only=True)
        return self.lm_head(hidden)

    def decode(self, token: torch.Tensor, cache: KVCache, start_pos: int, steps: int,
               step: Callable | None = None, on_step: Callable[[], None] | None = None) -> torch.Tensor:
        """`steps` greedy steps from token [B, 1] at start_pos with decode_step (or `step`, the
        compiled one) -> the chosen tokens [B, steps]."""
        from .runtime import greedy_decode

        return greedy_decode(step or self.decode_step, token, cache, start_pos, steps, on_step)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding with the KV cache: [B, S] -> [B, S + max_new_tokens] (the prompt
        through forward, every later token through decode_step; models/runtime.py)."""
        from .runtime import generate

        return generate(self, input_ids, max_new_tokens)

    # -- checkpoints (Hugging Face layout; models/checkpoints.py) ------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        from .checkpoints import save

        save(self, path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu", **overrides) -> "CausalLM":
        """Load a checkpoint: a folder (ours, or Ouro's as downloaded) or a Hugging Face hub id
        from the local cache. Weights this model has and the checkpoint lacks (MELT's gates) are
        freshly initialised; weights it does not use (the early-exit gate, for the standard model)
        are ignored. See models/checkpoints.py."""
        from .checkpoints import load

        return load(cls, path, dtype=dtype, device=device, **overrides)
