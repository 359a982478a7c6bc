"""Ouro-style LoopLM: the same N layers applied T times, one KV slot per (loop, layer).

After every loop the final norm gives s_t = model.norm(h_t): loop t's exit (logits_t = lm_head(s_t))
and loop t+1's input. RoPE tables are computed once and reused by every loop. In loop t, layer l a
token writes its K/V to slot t * N + l and attends to earlier tokens' loop-t K/V of that layer, so
the cache holds N * T slots: T times the standard model's.

kv_sharing="last_loop" is the Ouro paper's zero-shot decode-time sharing: the prefill fills all
N * T slots, then only the last loop's N slots are kept; in decode every loop's K/V of the new token
goes to that last-loop slot (overwritten loop by loop), so the token sees past tokens' last-loop K/V
plus its own current K/V, and only its last-loop K/V stays.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import KVCache
from .config import LoopConfig
from .layers import CausalLM, Positions


def exit_probabilities(gate_logits: torch.Tensor) -> torch.Tensor:
    """Ouro's exit distribution over loops. gate_logits [T, ...] -> p [T, ...] summing to 1 over T.

    lambda_t = sigmoid(gate_t); p_t = lambda_t * prod_{j<t}(1 - lambda_j) for t < T and
    p_T = prod_{j<T}(1 - lambda_j) (the last loop's own lambda is unused)."""
    lam = torch.sigmoid(gate_logits.float())
    survive = torch.cumprod(1 - lam, dim=0)                         # prod_{j<=t}(1 - lambda_j)
    not_exited_before = torch.cat([torch.ones_like(survive[:1]), survive[:-1]])
    p = lam * not_exited_before
    p[-1] = not_exited_before[-1]
    return p


def exit_loops_by_threshold(gate_logits: torch.Tensor, q: float) -> torch.Tensor:
    """0-based loop at which each token exits: the first t with CDF(t) >= q, else the last."""
    cdf = exit_probabilities(gate_logits).cumsum(0)
    reached = cdf >= q
    reached[-1] = True
    return reached.int().argmax(0)


class OuroLM(CausalLM):
    arch = "ouro"

    def __init__(self, config: LoopConfig):
        super().__init__(config)
        self.model.early_exit_gate = nn.Linear(config.hidden_size, 1)

    def num_cache_slots(self) -> int:
        return self.config.num_hidden_layers * self.config.loops

    def end_prefill(self, cache: KVCache) -> None:
        """Last-loop sharing: once the whole prompt is in, keep only the last loop's N slots."""
        c = self.config
        if c.kv_sharing == "last_loop":
            cache.keep_slots(range((c.loops - 1) * c.num_hidden_layers, c.loops * c.num_hidden_layers))

    def run_positions(self, x: torch.Tensor, cache: KVCache | None, pos: Positions, last_only: bool) -> torch.Tensor:
        c = self.config
        N, T = c.num_hidden_layers, c.loops
        last_loop_slots = range((T - 1) * N, T * N)
        # After a last-loop-sharing prefill only the last loop's slots remain: every loop writes there.
        shared = cache is not None and c.kv_sharing == "last_loop" and not cache.has_slot(0) and T > 1
        exits = []                                                   # s_t per loop, when the policy needs them
        for loop in range(T):
            for layer_idx, layer in enumerate(self.model.layers):
                slot = last_loop_slots[layer_idx] if shared else loop * N + layer_idx
                x = layer(x, pos, cache, slot)
            # s_t: exit t and the input of loop t+1 (the last loop's only at the last position
            # when that is all the caller wants)
            x = self.model.norm(x[:, -1:] if last_only and loop == T - 1 else x)
            if c.exit_policy != "last":  # (a copy of the last position: a view would keep all of x)
                exits.append(x[:, -1:].clone() if last_only else x)
        if c.exit_policy == "last":
            return x
        if c.exit_policy == "fixed":
            return exits[c.exit_step - 1]
        states = torch.stack(exits)                                  # [T, B, S, d]
        gate_logits = self.model.early_exit_gate(states).squeeze(-1)  # [T, B, S]
        exit_loop = exit_loops_by_threshold(gate_logits, c.exit_threshold)  # [B, S]
        index = exit_loop[None, :, :, None].expand(1, *states.shape[1:])
        return states.gather(0, index.long()).squeeze(0)
