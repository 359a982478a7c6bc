"""LoopCoder: a shared loop-0 cache plus gated sliding-window attention in later loops (G-SWA).

As in IQuest-Coder-V1's Loop models and the Parallel Loop Transformer they implement
(cache-policies.md, `loopcoder`), on the shared Ouro layer and loop structure:
  loop 0:     ordinary causal attention; its K/V go to a global slot per layer (N slots, all
              positions);
  loop t >= 1: q, k, v from the loop's input as usual (RoPE at absolute positions), and two
              attentions with the same query: A_global over loop 0's K/V of tokens <= i (nothing is
              written there), A_local over loop t's own K/V of tokens i-W+1 .. i (the token itself
              included), kept in a ring buffer of W rows per layer and loop. Per head h,
              g = sigmoid(q_h . w_h + b_h) from the rotated query; out = g * A_global +
              (1 - g) * A_local, then o_proj. w [H, D] and b [H] per layer, shared by the loops >= 1,
              start at zero (g = 0.5).
KV bytes: N slots of every position (N s per token) plus (T - 1) N rings of min(W, max_len) rows.
Slot numbers: global slot l = layer l; the ring of loop t >= 1, layer l = N + (t - 1) * N + l.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import KVCache, Slot
from .config import LoopConfig
from .causal_lm import CausalLM
from .layers import EAGER, Attention, DecoderLayer, Eager, Positions, attend, decoder_layer


class WindowGate(nn.Module):
    """One layer's mix of its global and local attention, per head: g = sigmoid(q_h . w_h + b_h)."""

    def __init__(self, config: LoopConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.num_attention_heads, config.head_dim))   # w [H, D]
        self.bias = nn.Parameter(torch.zeros(config.num_attention_heads))                     # b [H]

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """Rotated queries [B, H, S, D] -> g [B, H, S, 1]."""
        return torch.sigmoid((q * self.weight[:, None, :]).sum(-1, keepdim=True) + self.bias[:, None, None])


class LoopCoderLM(CausalLM):
    arch = "loopcoder"
    optional_keys = ("model.window_gates.",)  # absent from a LoopLM checkpoint: zero (g = 0.5)

    def __init__(self, config: LoopConfig):
        super().__init__(config)
        self.model.early_exit_gate = nn.Linear(config.hidden_size, 1)  # kept from the LoopLM
        self.model.window_gates = nn.ModuleList(WindowGate(config) for _ in range(config.num_hidden_layers))

    def num_cache_slots(self) -> int:
        return self.config.num_hidden_layers * self.config.loops

    def needs_cache(self) -> bool:
        return self.config.loops > 1   # later loops read loop 0's K/V and their own rings

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        self._check_max_len(max_len)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            from .config import ConfigError

            raise ConfigError("batch_size", f"got {batch_size!r}", "an integer >= 1")
        c = self.config
        N, window = c.num_hidden_layers, min(c.kv_window, max_len)
        return KVCache(N * c.loops, batch_size, c.num_key_value_heads, max_len, c.head_dim, self.dtype,
                       self.device, slot_rows=[max_len] * N + [window] * (N * (c.loops - 1)))

    def kv_cache_bytes(self, batch_size: int, max_len: int) -> int:
        c = self.config
        rows = c.num_hidden_layers * (max_len + (c.loops - 1) * min(c.kv_window, max_len))
        return KVCache.slot_bytes(batch_size, c.num_key_value_heads, rows, c.head_dim, self.dtype)

    def kv_decode_bytes(self, batch_size: int, max_len: int) -> int:
        return self.kv_cache_bytes(batch_size, max_len)

    def kv_bytes_per_token(self) -> int:
        """What one more token of context adds: a row of every global slot (N s). The rings are a
        constant (T - 1) N W s per sequence once the context is longer than the window."""
        c = self.config
        return KVCache.slot_bytes(1, c.num_key_value_heads, c.num_hidden_layers, c.head_dim, self.dtype)

    def run_positions(self, x: torch.Tensor, cache: KVCache | None, pos: Positions,
                      last_only: bool, apply: Eager = EAGER) -> torch.Tensor:
        c = self.config
        N, T = c.num_hidden_layers, c.loops
        for loop in range(T):
            for layer_idx, layer in enumerate(self.model.layers):
                if loop == 0:
                    x = apply(decoder_layer, layer, x, pos, self.slot(cache, layer_idx))
                else:
                    x = apply(window_layer, layer, self.model.window_gates[layer_idx], x, pos,
                              cache.slot(layer_idx), cache.slot(N + (loop - 1) * N + layer_idx), c.kv_window)
            x = self.model.norm(x[:, -1:] if last_only and loop == T - 1 else x)
        return x


def window_layer(layer: DecoderLayer, gate: WindowGate, x: torch.Tensor, pos: Positions, global_slot: Slot,
                 ring: Slot, window: int) -> torch.Tensor:
    """Loop t >= 1 of one layer: x [B, S, d] -> [B, S, d], its attention the gated mix of loop 0's
    K/V (global_slot, nothing written) and this loop's window of K/V (ring)."""
    def attention(attn: Attention, u: torch.Tensor) -> torch.Tensor:
        q = attn.queries(u, pos)                                                   # [B, H, S, D]
        k, v = attn.keys_values(u, pos)                                            # [B, Hkv, S, D]
        glob = attend(q, *global_slot.read(pos.start, u.shape[1]), pos.mask)
        local = _local_attention(q, k, v, ring, pos, window)
        g = gate(q)
        return attn.output(g * glob + (1 - g) * local)

    return layer(x, pos, attention=attention)


def _local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Slot, pos: Positions,
                     window: int) -> torch.Tensor:
    """Attention of q [B, H, S, D] over the last `window` tokens' K/V of this loop (its own k, v
    [B, Hkv, S, D] and, from the ring buffer, earlier tokens'), then k, v go into the ring, row
    p mod rows for position p (rows = the ring's length: min(window, max_len))."""
    keys, values = ring                                                                          # [B, Hkv, rows, D]
    rows = keys.shape[2]
    if isinstance(pos.start, torch.Tensor):
        # The decode step: one token at tensor position p. Row j of the ring holds position
        # p - ((p - j) mod rows) after the write: valid when that is >= 0.
        p = pos.start
        ring.write(p % rows, k, v)
        j = torch.arange(rows, device=p.device)
        mask = (p[:, None] - torch.remainder(p[:, None] - j[None, :], rows)) >= 0                # [1, rows]
        return attend(q, keys, values, mask)
    start, S = pos.start, q.shape[2]
    earlier = torch.arange(max(0, start - window + 1), start, device=q.device)                   # positions
    if len(earlier):
        k_all = torch.cat([keys.index_select(2, earlier % rows), k], dim=2)
        v_all = torch.cat([values.index_select(2, earlier % rows), v], dim=2)
    else:
        k_all, v_all = k, v
    key_pos = torch.cat([earlier, torch.arange(start, start + S, device=q.device)])
    query_pos = torch.arange(start, start + S, device=q.device)
    mask = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] > query_pos[:, None] - window)
    out = attend(q, k_all, v_all, mask)
    keep = torch.arange(max(start, start + S - rows), start + S, device=q.device)                # the last rows
    ring.write(keep % rows, k.index_select(2, keep - start), v.index_select(2, keep - start))
    return out
