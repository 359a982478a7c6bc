"""Analytic memory model: what a point should hold at its peak, from the config alone.

    predict(point) -> Prediction(weights, kv, prefill transient, decode transient, peaks)

Every row of a sweep carries these predictions beside what its probe measured (report.md shows
both), so a memory change that no formula explains stands out. The terms, in bytes (b = bytes per
element of the dtype; for a pass over C tokens E = B*C*d*b is one activation, F = B*C*f*b one MLP
intermediate, Q = B*C*H*D*b the queries):

- weights: parameters x b, from the config (equal to model.weights_bytes(); a test checks it).
- KV cache: slots x 2*B*Hkv*(seq_len + new_tokens)*D*b, slots = N (standard, MELT) or N per
  slot group of the LoopLM's cache policy (N*T for per-loop K/V); preallocated for the whole run.
  A merging policy (last_loop, first_loop, mean_loops) keeps N slots after the prefill.
- prefill transient: the prompt's int64 ids, and the largest set of activations alive at once
  during the pass over one chunk (all its loops; the whole prompt in a one-pass prefill):
  the MLP of a layer holds the layer's input, the residual after attention, the normed MLP
  input and three [B, C, f] intermediates at `silu(gate) * up` -> 3E + 3F, with the chunk's
  RoPE tables [C, D] x 2 and its [C, end] bool mask (none for a causal first chunk). MELT adds
  its N latents [B, C, d] (none with one loop: no later loop reads them); an early-exit LoopLM
  its earlier exits. At long contexts the attention of a masked chunk is larger than the MLP:
  SDPA makes a float copy of the [C, end] mask (stacked once per group, with the folded queries,
  for grouped-query attention: models.layers.attend); see attention_bytes.
- decode transient: the ids and the prefill's logits (held by the caller), and the largest
  moment of a decode step (decode_step_bytes): its mask, its MLP or attention, or its output head.
  Attention runs in a fused kernel (flash or memory-efficient SDPA) that keeps no [S, L] scores.

It models the code as written (tensors PyTorch keeps alive between ops), to the byte on the
tracked and fake probes (tests/measure/test_memory_model.py), not the allocator: the CUDA probe adds block
rounding, library workspaces and fragmentation, the reason the GPU check compares the three (see
scripts/gpu_check.sh).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models import make_config
from models.cache_policies import POLICIES
from models.layers import chunk_bounds


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
                "predicted_peak_bytes": max(phases),
                # the same peaks by category, as bench/measure/probes.py counts them: weights, the cache,
                # and everything else (the prefill's cache is as allocated, the decode's as kept)
                "predicted_weights_bytes": self.weights_bytes,
                "predicted_kv_decode_bytes": self.kv_decode_bytes if decode is not None else None,
                "predicted_prefill_activations_bytes": self.prefill_transient_bytes,
                "predicted_decode_activations_bytes": self.decode_transient_bytes if decode is not None else None}


def num_parameters(c) -> int:
    """Parameters of a model of config `c` (models/: layers.py, ouro.py, melt.py)."""
    d, f, N = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    attention = d * c.num_attention_heads * c.head_dim * 2 + d * c.num_key_value_heads * c.head_dim * 2
    layer = attention + 3 * d * f + 4 * d                     # q, k, v, o; SwiGLU; four norms
    table = c.vocab_size * d
    total = table * (1 if c.tie_word_embeddings else 2) + N * layer + d  # + final norm
    if c.arch in ("ouro", "melt", "loopcoder"):
        total += d + 1                                        # early-exit gate Linear(d, 1)
    if c.arch == "loopcoder":
        total += N * (c.num_attention_heads * c.head_dim + c.num_attention_heads)   # window gates w, b
    if c.arch == "melt":
        total += N * {"gated": 2 * d * d + d, "scalar": 1}.get(c.cache_update, 0)
    return total


def kv_slots(c, decode: bool = False) -> int:
    """Slots of the cache as allocated (decode=True: after the prefill): N, or for the LoopLM N per
    slot group its cache policy uses (models/cache_policies.py)."""
    if c.arch != "ouro":
        return c.num_hidden_layers
    policy = POLICIES[c.kv_sharing]
    groups = policy.decode_groups if decode else policy.groups
    return c.num_hidden_layers * groups(c.loops, c.kv_ring, c.kv_anchor)


def kv_bytes(c, batch: int, length: int, dtype: torch.dtype, decode: bool = False) -> int:
    rows = kv_slots(c, decode) * length
    if c.arch == "loopcoder":  # N global slots and (T - 1) N rings of min(window, length) rows
        rows = c.num_hidden_layers * (length + (c.loops - 1) * min(c.kv_window, length))
    return rows * 2 * batch * c.num_key_value_heads * c.head_dim * dtype.itemsize


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


def attention_bytes(c, batch: int, rows: int, end: int, masked: bool, dtype: torch.dtype) -> int:
    """What is alive inside the attention of a pass over `rows` query tokens and `end` keys,
    beside the caller's: the layer's input and its normed copy (2E), the rotated queries and the
    output (2Q; with grouped-query attention over several tokens a third, the folded queries), SDPA's
    float copy of the bool mask (stacked once per group over several tokens, with the stacked
    bool mask), and its log-sum-exp (fp32, one per query row and head). Unmasked (a causal first
    chunk): no mask at all."""
    b = dtype.itemsize
    groups = c.num_attention_heads // c.num_key_value_heads
    E = batch * rows * c.hidden_size * b
    Q = batch * rows * c.num_attention_heads * c.head_dim * b
    lse = batch * rows * c.num_attention_heads * 4
    if not masked:
        return 2 * E + 2 * Q + lse
    # Several query tokens: the folded queries are a copy (the rotated queries are laid out token
    # by token) and the mask is stacked once per group; a single query folds as a view and
    # broadcasts its [1, end] mask.
    stacked = groups if rows > 1 else 1
    folded = Q if groups > 1 and rows > 1 else 0
    return 2 * E + 2 * Q + folded + stacked * rows * end * b + (stacked * rows * end if stacked > 1 else 0) + lse


def window_attention_bytes(c, batch: int, begin: int, end: int, dtype: torch.dtype) -> int:
    """LoopCoder's later loops over tokens begin..end, at their local attention (the larger of
    its two): the layer's input and normed copy, the queries, the global attention's output, the
    loop's own K/V and, after the first chunk, their concatenation with the ring's last W - 1 rows
    of earlier tokens, the positions of those keys and queries (int64), the band mask (bool, its
    SDPA float copy, stacked per group with grouped-query attention), the output and log-sum-exp;
    or, if larger, the moment the two attentions are mixed."""
    b, C = dtype.itemsize, end - begin
    groups = c.num_attention_heads // c.num_key_value_heads
    earlier = min(c.kv_window - 1, begin)
    keys = earlier + C
    E = batch * C * c.hidden_size * b
    Q = batch * C * c.num_attention_heads * c.head_dim * b
    kv_row = batch * c.num_key_value_heads * c.head_dim * b
    stacked = groups if C > 1 else 1
    joined = 2 * keys * kv_row if earlier else 0            # the concatenated K and V
    folded = Q if groups > 1 and C > 1 else 0
    masks = C * keys + stacked * C * keys * b + (stacked * C * keys if stacked > 1 else 0)
    positions = 8 * (keys + earlier + C)
    lse = batch * C * c.num_attention_heads * 4
    local = 2 * E + 3 * Q + folded + 2 * C * kv_row + joined + masks + positions + lse
    # then the mix: the gate g [B, H, C, 1], the mixed heads, their [B, C, H * D] copy and o_proj's
    # output, beside the queries and both attentions' outputs
    mix = 3 * E + 5 * Q + 2 * C * kv_row + batch * c.num_attention_heads * C * b
    return max(local, mix)


def chunk_bytes(c, batch: int, begin: int, end: int, dtype: torch.dtype) -> int:
    """Peak activations of the pass over tokens begin..end of a prompt (all loops of one chunk,
    or the whole prompt in one pass): the larger of the MLP's set and the attention's (see
    attention_bytes), the chunk's RoPE tables and its bool mask (none for a causal first chunk),
    MELT's latents, the exits kept by an early-exit LoopLM."""
    b, C = dtype.itemsize, end - begin
    E = batch * C * c.hidden_size * b
    mask = C * end if begin > 0 else 0                       # bool [C, end]
    rope = 2 * C * c.head_dim * b
    mlp = 3 * E + 3 * batch * C * c.intermediate_size * b
    attention = attention_bytes(c, batch, C, end, begin > 0, dtype)
    if c.arch == "loopcoder" and c.loops > 1:  # later loops: the global attention with the loop's own K/V, or the local
        own = 2 * batch * C * c.num_key_value_heads * c.head_dim * b
        attention = max(attention + own, window_attention_bytes(c, batch, begin, end, dtype))
    latents = c.num_hidden_layers * E if c.arch == "melt" and c.loops > 1 else 0
    exits = (c.loops - 1) * batch * c.hidden_size * b if c.arch == "ouro" and c.exit_policy != "last" else 0
    return max(mlp, attention) + rope + mask + latents + exits


def decode_step_bytes(c, batch: int, max_len: int, new_tokens: int, dtype: torch.dtype,
                      scored: bool = False) -> int:
    """Peak of a decode step over a cache of max_len rows (models.layers.Positions.at), beside the
    prompt's ids and the prefill's logits that the caller holds: the tokens chosen so far and the
    position, and the largest of three moments: making the [1, max_len] mask (an int64 range, then
    the bool mask), the MLP (3E + 3F of one token, MELT's latents), and the output head (the
    logits and the normed hidden state), with the mask and the RoPE tables alive through both, and
    an early-exit LoopLM's earlier exits."""
    b = dtype.itemsize
    E, F = batch * c.hidden_size * b, batch * c.intermediate_size * b
    logits = batch * c.vocab_size * b
    tokens = new_tokens * batch * 8 + 8                     # the chosen tokens [B, 1] int64, and pos [1]
    if scored:  # teacher forcing: the scores so far [B, 1] fp32, and the step before's logits
        tokens = (new_tokens - 1) * batch * 4 + 8 + (logits if new_tokens > 2 else 0)
    positions = 2 * c.head_dim * b + max_len                 # RoPE tables [1, D] x 2, bool mask [1, max_len]
    latents = c.num_hidden_layers * E if c.arch == "melt" and c.loops > 1 else 0
    exits = (c.loops - 1) * E if c.arch == "ouro" and c.exit_policy != "last" else 0
    merge = POLICIES[c.kv_sharing].merge if c.arch == "ouro" else None
    if merge in ("first", "mean"):
        # the new token's K/V row per layer, kept across the loops (its first, or the running sum;
        # the mean's sum is replaced row by row, so one layer briefly holds two). With one loop,
        # the last layer's row is taken after its MLP, the step's peak.
        rows = c.num_hidden_layers + (merge == "mean") if c.loops > 1 else c.num_hidden_layers - 1
        exits += rows * 2 * batch * c.num_key_value_heads * c.head_dim * b
    attention = attention_bytes(c, batch, 1, max_len, True, dtype)
    if c.arch == "loopcoder" and c.loops > 1:
        # later loops: the global attention beside the loop's own K/V row, the ring's mask being
        # made (the row index j and two [1, rows] int64 steps of p - (p - j) mod rows), or the two
        # attentions mixed: q, both outputs, g * global, (1 - g) * local and their sum (6 Q), g
        own = 2 * batch * c.num_key_value_heads * c.head_dim * b
        Q = batch * c.num_attention_heads * c.head_dim * b
        rows = min(c.kv_window, max_len)
        gate = batch * c.num_attention_heads * b
        attention = max(attention + own, 2 * E + 2 * Q + own + 3 * 8 * rows, 2 * E + 6 * Q + own + gate)
    return tokens + max(8 * max_len + max_len, positions + max(3 * E + 3 * F, attention) + latents + exits,
                        positions + E + logits + exits)


def predict(model: str, size: str, loops: int, seq_len: int, batch: int, new_tokens: int,
            dtype: str | torch.dtype, scenario: str = "generate", chunk_size: int | None = None,
            **options) -> Prediction:
    """The prediction for one point of a size preset (chunk_size: the prefill's; None: one pass)."""
    return predict_config(make_config(model, size=size, loops=loops, **options), seq_len, batch,
                          new_tokens, dtype, scenario, chunk_size)


def predict_point(point) -> Prediction:
    """predict() for a resolved bench.config.BenchConfig (its checkpoint's config if it has one)."""
    from ..config import model_config

    chunk_size = point.chunk_size if point.prefill == "chunked" else None
    return predict_config(model_config(point)[0], point.seq_len, point.batch, point.new_tokens,
                          point.dtype, point.scenario, chunk_size)


def predict_config(c, seq_len: int, batch: int, new_tokens: int, dtype: str | torch.dtype,
                   scenario: str = "generate", chunk_size: int | None = None) -> Prediction:
    """The prediction for a model of config `c` (models.LoopConfig) at one point whose prefill runs
    in chunks of chunk_size tokens (None: one pass; MELT always runs in chunks, of its own
    config.chunk_size when none is given)."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    b = dtype.itemsize
    length = seq_len + (new_tokens if scenario != "prefill" else 0)
    kv = kv_bytes(c, batch, length, dtype)
    kv_decode = kv_bytes(c, batch, length, dtype, decode=True)
    logits = batch * c.vocab_size * b
    ids = batch * (length if scenario == "score" else seq_len) * 8   # the int64 token ids (a scored text's all)
    chunk_size = chunk_size or (c.chunk_size if c.arch == "melt" else seq_len)
    prefill = ids + max(chunk_bytes(c, batch, begin, end, dtype) for begin, end in chunk_bounds(seq_len, chunk_size))
    decode = ids + logits + decode_step_bytes(c, batch, length, new_tokens, dtype, scored=scenario == "score")
    return Prediction(num_parameters(c) * b, kv, kv_decode, prefill, decode)
