"""How a looped model keeps its K/V across loops: every training-free policy of the LoopLM, as data.

A policy says, for loop t of T, which slot group its layers read and write (one group = one slot
per layer), whether it writes at all, and, for the policies that keep every loop's K/V only while
the prompt goes in, how the groups merge into one when the prefill ends and how a decoded token's
row is stored. The LoopLM's loop (models/ouro.py) reads this and nothing else, so a new policy is
a few lines here. (../shared reference: cache-policies.md; loops are 0-based.)

    policy        groups (prefill / decode)  loop t reads and writes          merge
    per_loop      T / T                      group t                          -
    last_loop     T / 1                      group t; after the prefill, 0    last
    first_loop    T / 1                      group t; after the prefill, 0    first
    mean_loops    T / 1                      group t; after the prefill, 0    mean
    ring (K)      K / K                      group t mod K                    -
    anchor (A, K) A + K / A + K              t < A: group t; else A + (t - A) mod K
    first_writes  1 / 1                      group 0; loops >= 1 only read    -

A query always sees its own token's K/V of the current loop (written before it reads), except under
first_writes, where loops >= 1 read the token's loop-0 K/V and compute no K/V of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

MERGES = ("last", "first", "mean")


@dataclass(frozen=True)
class KVPolicy:
    name: str
    group: Callable[[int, int, int], int]   # (loop t, K, A) -> the group loop t reads and writes in the prefill
    merge: str | None = None                # after the prefill: groups -> one, and how a decoded row is kept
    writes: Callable[[int], bool] = lambda t: True   # whether loop t writes (and so computes) its K/V
    source: str = ""

    def groups(self, loops: int, ring: int = 1, anchor: int = 1) -> int:
        """Slot groups per layer while the prompt goes in: the distinct groups its loops use."""
        return len({self.group(t, ring, anchor) for t in range(loops)})

    def decode_groups(self, loops: int, ring: int = 1, anchor: int = 1) -> int:
        """Slot groups per layer after the prefill."""
        return 1 if self.merge else self.groups(loops, ring, anchor)


POLICIES: dict[str, KVPolicy] = {p.name: p for p in (
    KVPolicy("per_loop", lambda t, K, A: t, source="Ouro's released code, vLLM"),
    KVPolicy("last_loop", lambda t, K, A: t, "last", source='Ouro paper, Table 14, "last step"'),
    KVPolicy("first_loop", lambda t, K, A: t, "first", source='Ouro paper, Table 14, "first step"'),
    KVPolicy("mean_loops", lambda t, K, A: t, "mean", source='Ouro paper, Table 14, "averaged"'),
    KVPolicy("ring", lambda t, K, A: t % K, source='Huginn, "compress-s"'),
    KVPolicy("anchor", lambda t, K, A: t if t < A else A + (t - A) % K, source='Huginn, "compress-anchor"'),
    KVPolicy("first_writes", lambda t, K, A: 0, writes=lambda t: t == 0,
             source="Mixture-of-Recursions, recursive KV sharing"),
)}
KV_SHARINGS = tuple(POLICIES)


def policy_name(model: str, kv_sharing: str | None = None) -> str:
    """One name per cache design everywhere (the conf/policy/ option, the table's `policy`
    column, the plots): the LoopLM's policy, or the model's own name (standard, melt, loopcoder)."""
    if model == "ouro":
        return kv_sharing or "per_loop"  # the LoopLM's default
    return model
