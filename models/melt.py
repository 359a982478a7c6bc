"""MELT: a LoopLM with ONE KV slot per layer, shared by all loops and updated in place.

Per layer l (gate shared across loops, like the layer), token i, loop t:
    u = input_layernorm(x)                               # attention input, as in the LoopLM
    z = sigmoid(u @ W_z + h_prev @ U_z + b_z)            # element-wise gate, width d
    h = z * h_prev + (1 - z) * u                         # latent state of (token, layer)
    cache_l[i] = rope_i(h @ W_k), h @ W_v                # overwrite row i; never a new slot
    out = attention(rope_i(u @ W_q), cache_l[0..i])
A sequence runs in chunks of C tokens: all T loops run over a chunk in lock-step, so a token sees
earlier chunks' final (loop-T) rows and its own chunk's current-loop rows, causally masked. After
loop T the chunk's rows are final and the next chunk starts; decode is a chunk of one token. The
transient state is N latents [B, C, d] for the current chunk: it grows with neither L nor T.

cache_update picks how h is formed (the paper's ablations): gated (MELT), last (z = 0: h = u),
mean (running mean of u over loops), ema (z = ema_alpha, a fixed decay), scalar (one learned z per
layer). init_latent: h_prev at loop 1 is u ("input", so loop 1 equals the LoopLM's whatever the
gate) or 0 ("zero").
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .cache import KVCache, Slot
from .config import LoopConfig
from .causal_lm import CausalLM
from .layers import EAGER, DecoderLayer, Eager, Positions


class _Half(NamedTuple):
    """A view of one half of the fused gate matrix, shaped like the nn.Linear it replaces."""
    weight: torch.Tensor
    bias: torch.Tensor | None


class LatentGate(nn.Module):
    """One layer's cache-update rule: (u, h_prev, loop) -> the latent h that K/V are made from.

    The gated rule's two projections are ONE matrix product: proj.weight [d, 2d] = [W_z | U_z]
    over the concatenation [u, h_prev] [.., 2d] (one weight read and one kernel per loop instead of
    two; the same 2d^2 + d parameters). Checkpoints and state_dict() keep the paper's two matrices,
    `input_proj.weight` (W_z), `input_proj.bias` (b_z) and `state_proj.weight` (U_z): they are
    split on saving and fused on loading, and `gate.input_proj` / `gate.state_proj` give views.
    """

    def __init__(self, config: LoopConfig):
        super().__init__()
        d = self.hidden_size = config.hidden_size
        self.mode, self.init_latent, self.ema_alpha = config.cache_update, config.init_latent, config.ema_alpha
        if self.mode == "gated":
            self.proj = nn.Linear(2 * d, d, bias=True)       # [W_z | U_z], b_z
            self.register_state_dict_post_hook(_split_gate)
            self.register_load_state_dict_pre_hook(_fuse_gate)
        elif self.mode == "scalar":
            self.logit = nn.Parameter(torch.zeros(1))        # z = sigmoid(logit), one per layer

    @property
    def input_proj(self) -> _Half:
        """W_z [d, d] and b_z [d]: views of the fused parameters (writes go through)."""
        return _Half(self.proj.weight[:, :self.hidden_size], self.proj.bias)

    @property
    def state_proj(self) -> _Half:
        """U_z [d, d]: a view of the fused matrix."""
        return _Half(self.proj.weight[:, self.hidden_size:], None)

    def forward(self, u: torch.Tensor, h_prev: torch.Tensor | None, loop: int | torch.Tensor) -> torch.Tensor:
        """u [B, C, d] of loop `loop` (0-based; an int, or a 0-d tensor in a compiled step), h_prev
        [B, C, d] or None at loop 0 -> h [B, C, d]."""
        if h_prev is None:
            if self.init_latent == "input":
                return u                                     # h = z*u + (1-z)*u = u, exactly
            h_prev = torch.zeros_like(u)
        if self.mode == "last":
            return u
        if self.mode == "mean":
            return (loop * h_prev + u) / (loop + 1)         # z = t / (t + 1): running mean of u
        if self.mode == "ema":
            return self.ema_alpha * h_prev + (1 - self.ema_alpha) * u
        # [B, C, 2d] @ [2d, d]: u @ W_z + h_prev @ U_z + b_z in one matmul
        logit = self.proj(torch.cat((u, h_prev), dim=-1)) if self.mode == "gated" else self.logit
        z = torch.sigmoid(logit)
        return z * h_prev + (1 - z) * u


def _split_gate(module: LatentGate, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: the fused proj -> the paper's input_proj (W_z, b_z) and state_proj (U_z)."""
    weight, bias = state_dict.pop(prefix + "proj.weight"), state_dict.pop(prefix + "proj.bias")
    d = module.hidden_size
    state_dict[prefix + "input_proj.weight"] = weight[:, :d]
    state_dict[prefix + "input_proj.bias"] = bias
    state_dict[prefix + "state_proj.weight"] = weight[:, d:]


def _fuse_gate(module: LatentGate, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: input_proj / state_proj (checkpoints, older code) -> fused proj.
    Partial sets are left as they are, so loading reports them as missing or unexpected."""
    names = [prefix + n for n in ("input_proj.weight", "input_proj.bias", "state_proj.weight")]
    if all(n in state_dict for n in names):
        w_z, b_z, u_z = (state_dict.pop(n) for n in names)
        state_dict[prefix + "proj.weight"] = torch.cat((w_z, u_z), dim=1)   # [d, 2d]
        state_dict[prefix + "proj.bias"] = b_z


class MeltLM(CausalLM):
    arch = "melt"
    affine_chunks = True  # the fake probe may skip prefill chunks (CausalLM.affine_chunks)
    optional_keys = ("model.latent_gates.",)  # absent from a LoopLM checkpoint: freshly initialised

    def __init__(self, config: LoopConfig):
        super().__init__(config)
        self.model.early_exit_gate = nn.Linear(config.hidden_size, 1)  # kept from the LoopLM
        self.model.latent_gates = nn.ModuleList(LatentGate(config) for _ in range(config.num_hidden_layers))

    def num_cache_slots(self) -> int:
        return self.config.num_hidden_layers

    def default_chunk_size(self) -> int:
        return self.config.chunk_size

    def run_positions(self, x: torch.Tensor, cache: KVCache | None, pos: Positions,
                      last_only: bool, apply: Eager = EAGER) -> torch.Tensor:
        """One chunk (the decode step: a chunk of one token), all loops in lock-step -> s_T."""
        T = self.config.loops
        latents = [[None] for _ in self.model.layers]   # per layer: [h_prev [B, C, d]], or [None] at loop 0
        for loop in range(T):
            # After the last loop no latent is read again: none is kept (with one loop MELT then
            # holds exactly what the standard model holds), except by a compiled step, which then
            # runs its later loops through one graph.
            keep = loop < T - 1 or not apply.frees_early
            for layer_idx, layer in enumerate(self.model.layers):
                x = apply(gated_layer, layer, self.model.latent_gates[layer_idx], x, latents[layer_idx],
                          apply.loop(loop), pos, self.slot(cache, layer_idx), keep)
            x = self.model.norm(x[:, -1:] if last_only and loop == T - 1 else x)
        return x  # the latents die with the chunk


def gated_layer(layer: DecoderLayer, gate: LatentGate, x: torch.Tensor, latent: list, loop: int | torch.Tensor,
                pos: Positions, slot: Slot | None, keep: bool) -> torch.Tensor:
    """One layer of one MELT loop: x [B, C, d] -> [B, C, d], K/V made from the gated latent.
    latent is the layer's [h_prev] (or [None] at loop 0): the gate takes h_prev out of it, so h_prev
    dies once read, and puts the new h back only when a later loop reads it (keep), so the last
    loop's h dies once its K/V are made."""
    def update(u: torch.Tensor) -> torch.Tensor:
        h = gate(u, latent.pop(), loop)
        if keep:
            latent.append(h)
        return h

    return layer(x, pos, slot, latent=update)
