"""The differentiable training forwards of the looped models, built from the models' own submodules.

loop_forward covers the three training-time forwards of MELT's recipe:
  - the LoopLM (teacher): all loops over the whole sequence; in loop t a token attends to earlier
    tokens' loop-t K/V, made from their attention input u (alpha = 0, one chunk);
  - MELT: the sequence in chunks processed in order, loops in lock-step inside a chunk; a token
    sees earlier chunks' FINAL rows (K/V of their latent after the last loop) and its own chunk's
    current-loop rows, causally masked; K/V from the gated latent h (alpha = 1);
  - phase 1's interpolated transition: every K/V row is alpha * KV_MELT + (1 - alpha) * KV_LoopLM,
    where KV_MELT is what MELT would hold there (the latent's K/V: this loop's for the current chunk,
    the final one for earlier chunks) and KV_LoopLM is the LoopLM's (from u, of this loop). At
    alpha = 0 it is exactly the LoopLM, whatever the chunks.
It returns every loop exit's logits and, on request, every (layer, loop) attention sub-layer output
(the term added to the residual: input_layernorm_2(o_proj(attention))), for the distillation losses.

The gates are called as modules, `model.model.latent_gates[l](u, h_prev, loop) -> h`, so their
parametrisation is the inference model's, whatever it is. Weight names and the inference code are
untouched; tests tie this forward to MeltLM's and OuroLM's real forwards.

policy_forward is the same for the cache policies post-trained like MELT, first_writes and
loopcoder (see its docstring); training_forward picks the one a model takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.causal_lm import CausalLM
from models.layers import Positions
from models.layers import chunk_bounds


@dataclass
class LoopOutputs:
    exit_logits: list[torch.Tensor]            # T x [B, L, V]: logits of loop t's exit
    attn_outputs: list[torch.Tensor] | None    # T*N x [B, L, d], index loop * N + layer (if captured)


def _mix(melt: torch.Tensor | None, loop: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """alpha * melt + (1 - alpha) * loop, with the exact end points (no 0 * x or 1 * x rounding)."""
    if alpha == 1.0:
        return melt
    if alpha == 0.0:
        return loop
    return alpha * melt + (1.0 - alpha) * loop


def loop_forward(model: CausalLM, input_ids: torch.Tensor, *, chunk_size: int | None = None,
                 alpha: float = 1.0, capture: bool = False) -> LoopOutputs:
    """input_ids [B, L] -> LoopOutputs. chunk_size None: one chunk (the whole sequence).
    alpha: 1 = MELT, 0 = LoopLM (the only value for models without latent gates: ouro, standard)."""
    c = model.config
    N, T = c.num_hidden_layers, c.loops
    gates = getattr(model.model, "latent_gates", None)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: got {alpha}; allowed: a number in [0, 1]")
    if gates is None and alpha != 0.0:
        raise ValueError(f"alpha: {alpha} needs a MELT model ({c.arch} has no latent gates); allowed: 0")
    use_melt, use_loop = alpha > 0.0, alpha < 1.0
    B, L = input_ids.shape
    x_all = model.model.embed_tokens(input_ids)                                   # [B, L, d]
    # Rows of earlier chunks, per layer: MELT's final K/V and, per loop, the LoopLM's K/V.
    # Each is a list of [B, Hkv, C, D] pieces, concatenated along positions when read.
    melt_k = [[] for _ in range(N)]
    melt_v = [[] for _ in range(N)]
    loop_k = [[[] for _ in range(N)] for _ in range(T)]
    loop_v = [[[] for _ in range(N)] for _ in range(T)]
    exits = [[] for _ in range(T)]                                               # T x chunks x [B, C, d]
    attn = [[] for _ in range(T * N)] if capture else None

    for begin, end in chunk_bounds(L, chunk_size or L):
        S = end - begin
        pos = Positions.make(begin, S, c.head_dim, c.rope_theta, x_all.dtype, x_all.device)
        x = x_all[:, begin:end]                                                   # [B, S, d]
        latents: list[torch.Tensor | None] = [None] * N                           # h per layer, this chunk
        for t in range(T):
            for l, layer in enumerate(model.model.layers):
                a = layer.self_attn
                H, Hkv, D = a.num_heads, a.num_kv_heads, a.head_dim
                u = layer.input_layernorm(x)                                      # [B, S, d]

                def kv(src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                    k = a.k_proj(src).view(B, S, Hkv, D).transpose(1, 2)         # [B, Hkv, S, D]
                    v = a.v_proj(src).view(B, S, Hkv, D).transpose(1, 2)
                    return pos.rotate(k), v

                km = vm = ku = vu = None
                if use_melt:
                    latents[l] = gates[l](u, latents[l], t)                       # h [B, S, d]
                    km, vm = kv(latents[l])
                if use_loop:
                    ku, vu = kv(u)
                k_cur, v_cur = _mix(km, ku, alpha), _mix(vm, vu, alpha)
                if begin > 0:                                                     # earlier chunks' rows
                    k_old = _mix(torch.cat(melt_k[l], 2) if use_melt else None,
                                 torch.cat(loop_k[t][l], 2) if use_loop else None, alpha)
                    v_old = _mix(torch.cat(melt_v[l], 2) if use_melt else None,
                                 torch.cat(loop_v[t][l], 2) if use_loop else None, alpha)
                    k_cur, v_cur = torch.cat([k_old, k_cur], 2), torch.cat([v_old, v_cur], 2)
                if use_loop:
                    loop_k[t][l].append(ku)
                    loop_v[t][l].append(vu)
                if use_melt and t == T - 1:                                       # the rows' final value
                    melt_k[l].append(km)
                    melt_v[l].append(vm)
                q = pos.rotate(a.q_proj(u).view(B, S, H, D).transpose(1, 2))      # [B, H, S, D]
                out = F.scaled_dot_product_attention(
                    q, k_cur, v_cur, attn_mask=pos.mask, is_causal=pos.mask is None and S > 1,
                    enable_gqa=Hkv != H)                                          # [B, H, S, D]
                o = layer.input_layernorm_2(a.o_proj(out.transpose(1, 2).reshape(B, S, H * D)))
                if capture:
                    attn[t * N + l].append(o)
                x = x + o
                x = x + layer.post_attention_layernorm_2(layer.mlp(layer.post_attention_layernorm(x)))
            x = model.model.norm(x)                                               # s_t: exit t, input of t+1
            exits[t].append(x)
    cat = lambda pieces: pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)
    return LoopOutputs([model.lm_head(cat(e)) for e in exits],
                       [cat(p) for p in attn] if capture else None)


# -- the post-trained cache policies of the LoopLM's weights ----------------------------------------

TRAINED_POLICIES = ("first_writes", "loopcoder")


def policy_of(model: CausalLM) -> str:
    """Which training forward a model takes: "looplm" (the LoopLM with per-loop K/V, MELT, the
    standard model: loop_forward), or one of TRAINED_POLICIES (policy_forward)."""
    c = model.config
    if c.arch == "loopcoder":
        return "loopcoder"
    if c.arch == "ouro" and c.kv_sharing != "per_loop":
        if c.kv_sharing != "first_writes":
            raise ValueError(f"kv_sharing: {c.kv_sharing!r} has no training forward; allowed: per_loop | first_writes")
        return "first_writes"
    return "looplm"


def policy_forward(model: CausalLM, input_ids: torch.Tensor, *, alpha: float = 1.0,
                   capture: bool = False) -> LoopOutputs:
    """The training forward of a LoopLM post-trained for a cache policy of its own: every loop over
    the whole sequence in one pass (both policies give the same logits whatever the prefill's
    chunks, so training needs none).

    first_writes (Mixture-of-Recursions' recursive KV sharing, an OuroLM with that kv_sharing):
        loop 0 attends causally over its own K/V; loop t >= 1 over loop 0's K/V of every token
        <= i, the token's own row included. Phase 1's interpolation: loop t >= 1 reads the rows
        alpha * KV_loop0 + (1 - alpha) * KV_loop_t (alpha = 0: the LoopLM).
    loopcoder (LoopCoderLM): loop 0 as above; loop t >= 1 mixes, per head with the window gate
        g = sigmoid(q . w + b), the attention over loop 0's K/V of tokens <= i and over loop t's
        own K/V of tokens i-W+1 .. i. Phase 1's interpolation acts on the attention, since a
        window cannot be blended into a full causal span row by row: alpha * (g A_global +
        (1 - g) A_local) + (1 - alpha) * A_LoopLM, with A_LoopLM loop t's causal attention over
        its own K/V (alpha = 0: the LoopLM).
    Built from the inference models' own submodules (Attention.queries / keys_values / output,
    WindowGate, models.layers.attend); tests tie it to their forwards and cached prefills."""
    from models.layers import attend

    kind = policy_of(model)
    if kind == "looplm":
        raise ValueError(f"model: {model.config.arch} with per-loop K/V trains with loop_forward; "
                         f"allowed: first_writes or loopcoder")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: got {alpha}; allowed: a number in [0, 1]")
    c = model.config
    N, T = c.num_hidden_layers, c.loops
    B, L = input_ids.shape
    x = model.model.embed_tokens(input_ids)                                       # [B, L, d]
    pos = Positions.make(0, L, c.head_dim, c.rope_theta, x.dtype, x.device)
    band = None
    if kind == "loopcoder":                                                       # key j seen by query i
        i, j = torch.arange(L, device=x.device)[:, None], torch.arange(L, device=x.device)[None, :]
        band = (j <= i) & (j > i - c.kv_window)                                   # [L, L]
    first_kv: list = [None] * N                                                   # loop 0's (k, v) per layer
    exits, attn = [], [] if capture else None
    for t in range(T):
        for l, layer in enumerate(model.model.layers):
            a = layer.self_attn
            u = layer.input_layernorm(x)
            q = a.queries(u, pos)                                                 # [B, H, S, D]
            need_own = t == 0 or kind == "loopcoder" or alpha < 1.0               # first_writes at alpha 1 skips them
            k, v = a.keys_values(u, pos) if need_own else (None, None)           # [B, Hkv, S, D]
            if t == 0:
                first_kv[l] = (k, v)
                out = attend(q, k, v, None)
            elif kind == "first_writes":
                k0, v0 = first_kv[l]
                out = attend(q, _mix(k0, k, alpha), _mix(v0, v, alpha), None)
            else:
                windowed = full = None
                if alpha > 0.0:
                    g = model.model.window_gates[l](q)                            # [B, H, S, 1]
                    windowed = g * attend(q, *first_kv[l], None) + (1 - g) * attend(q, k, v, band)
                if alpha < 1.0:
                    full = attend(q, k, v, None)
                out = _mix(windowed, full, alpha)
            o = layer.input_layernorm_2(a.output(out))
            if capture:
                attn.append(o)
            x = x + o
            x = x + layer.post_attention_layernorm_2(layer.mlp(layer.post_attention_layernorm(x)))
        x = model.model.norm(x)
        exits.append(model.lm_head(x))
    return LoopOutputs(exits, attn)


def training_forward(model: CausalLM, input_ids: torch.Tensor, *, chunk_size: int | None = None,
                     alpha: float = 1.0, capture: bool = False) -> LoopOutputs:
    """The differentiable forward a post-training step runs for `model`: policy_forward for the
    LoopLM's post-trained cache policies, loop_forward otherwise (chunk_size is MELT's)."""
    if policy_of(model) == "looplm":
        return loop_forward(model, input_ids, chunk_size=chunk_size, alpha=alpha, capture=capture)
    return policy_forward(model, input_ids, alpha=alpha, capture=capture)
