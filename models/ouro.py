"""Ouro-style LoopLM: the same N layers applied T times, with a KV cache policy.

After every loop the final norm gives s_t = model.norm(h_t): loop t's exit (logits_t = lm_head(s_t))
and loop t+1's input. RoPE tables are computed once and reused by every loop. In loop t, layer l a
token writes its K/V to slot group * N + l, the group its cache policy (kv_sharing) gives loop t,
and attends to earlier tokens' K/V in that slot:

  per_loop (Ouro's own): group t, so the cache holds N * T slots, T times the standard model's;
  last_loop, first_loop, mean_loops (the Ouro paper's decode-time sharing): per-loop while the
    prompt goes in, then one slot per layer (the last loop's, the first's, or their mean), which
    every loop of a decoded token writes and reads; the token's row keeps its last, first or mean
    K/V;
  ring (K), anchor (A, K) (Huginn's compressed caches), first_writes (Mixture-of-Recursions):
    fewer groups in every phase. models/cache_policies.py has them all, as data this loop reads.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import KVCache, Slot
from .config import LoopConfig
from .causal_lm import CausalLM
from .layers import EAGER, DecoderLayer, Eager, Positions, decoder_layer
from .cache_policies import POLICIES, KVPolicy


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
    affine_chunks = True  # the fake probe may skip prefill chunks (CausalLM.affine_chunks)

    def __init__(self, config: LoopConfig):
        super().__init__(config)
        self.model.early_exit_gate = nn.Linear(config.hidden_size, 1)

    @property
    def policy(self) -> KVPolicy:
        return POLICIES[self.config.kv_sharing]

    def _groups(self) -> int:
        c = self.config
        return self.policy.groups(c.loops, c.kv_ring, c.kv_anchor)

    def num_cache_slots(self) -> int:
        return self.config.num_hidden_layers * self._groups()

    def num_decode_slots(self) -> int:
        c = self.config
        return c.num_hidden_layers * self.policy.decode_groups(c.loops, c.kv_ring, c.kv_anchor)

    def needs_cache(self) -> bool:
        return not all(self.policy.writes(t) for t in range(self.config.loops))

    def end_prefill(self, cache: KVCache) -> None:
        """The prompt is in: a merging policy turns each layer's per-loop slots into one."""
        if self.policy.merge and not cache.merged:
            N = self.config.num_hidden_layers
            cache.merge_groups([[g * N + layer for g in range(self._groups())] for layer in range(N)],
                               self.policy.merge)

    def run_positions(self, x: torch.Tensor, cache: KVCache | None, pos: Positions, last_only: bool,
                      apply: Eager = EAGER) -> torch.Tensor:
        c = self.config
        N, T, policy = c.num_hidden_layers, c.loops, self.policy
        merged = cache is not None and cache.merged      # decoding with one slot per layer
        # A merged slot gets every loop's K/V of the new tokens (each query sees its own), then
        # keeps the first loop's or the mean (the last loop's is already there).
        keep = policy.merge if merged and policy.merge in ("first", "mean") else None
        kept: list = [None] * N                           # per layer: (k, v) rows [B, Hkv, S, D] to store
        exits = []                                       # s_t per loop, when the exit policy needs them
        for loop in range(T):
            group = 0 if merged else policy.group(loop, c.kv_ring, c.kv_anchor)
            run_layer = decoder_layer if policy.writes(loop) else reading_layer
            for layer_idx, layer in enumerate(self.model.layers):
                x = apply(run_layer, layer, x, pos, self.slot(cache, group * N + layer_idx))
                if keep == "mean" or (keep == "first" and loop == 0):
                    rows = cache.slot(layer_idx).copy_rows(pos.start, x.shape[1])
                    kept[layer_idx] = rows if kept[layer_idx] is None else tuple(
                        a + b for a, b in zip(kept[layer_idx], rows))
            # s_t: exit t and the input of loop t+1 (the last loop's only at the last position
            # when that is all the caller wants)
            x = self.model.norm(x[:, -1:] if last_only and loop == T - 1 else x)
            if c.exit_policy != "last":  # (a copy of the last position: a view would keep all of x)
                exits.append(x[:, -1:].clone() if last_only else x)
        for layer_idx, rows in enumerate(kept if keep else ()):
            k, v = (r / T for r in rows) if keep == "mean" else rows
            cache.write(layer_idx, pos.start, k, v)
        if c.exit_policy == "last":
            return x
        if c.exit_policy == "fixed":
            return exits[c.exit_step - 1]
        states = torch.stack(exits)                                  # [T, B, S, d]
        gate_logits = self.model.early_exit_gate(states).squeeze(-1)  # [T, B, S]
        exit_loop = exit_loops_by_threshold(gate_logits, c.exit_threshold)  # [B, S]
        index = exit_loop[None, :, :, None].expand(1, *states.shape[1:])
        return states.gather(0, index.long()).squeeze(0)


def reading_layer(layer: DecoderLayer, x: torch.Tensor, pos: Positions, slot: Slot) -> torch.Tensor:
    """A loop that writes no K/V (first_writes' later loops): its queries read the slot's rows."""
    return layer(x, pos, slot, write=False)
