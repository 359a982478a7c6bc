"""The KV cache shared by all models: preallocated slots, written in place.

A slot is one layer's K and V buffers, each [B, H_kv, rows, D] (rows = max_len, or a window for
LoopCoder's local attention). The models differ only in how many slots they ask for and which slot
a (loop, layer) reads and writes; slot numbers are group * N + layer, a group being one slot per
layer:
  standard: N slots, slot = layer
  LoopLM:   the groups its cache policy uses (models/cache_policies.py): T groups for per-loop K/V
            (memory grows with depth), fewer for the shared policies
  MELT:     N slots, slot = layer, every loop overwrites the token's row in place
Buffers are allocated once for (batch, max_len); nothing is ever concatenated, so a step never makes
a transient copy of the cache (the peak-inflating pattern of growing caches). A policy that keeps
more while the prompt goes in than after it merges its groups into one when the prefill ends
(merge_groups): the others are freed, and decode addresses the kept slot of each layer as slot
`layer` (group 0).
"""

from __future__ import annotations

from typing import Sequence

import torch


class KVCache:
    def __init__(self, num_slots: int, batch_size: int, num_kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 slot_rows: Sequence[int] | None = None):
        self.dtype, self.device = dtype, device
        self.batch_size, self.max_len = batch_size, max_len
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.rows = list(slot_rows) if slot_rows is not None else [max_len] * num_slots
        self.static = False
        self.view: list[int] | None = None  # after merge_groups: slot number -> the slot kept for it
        # One tensor per slot (not one big block) so that a slot can be dropped on its own.
        self.keys: list[torch.Tensor | None] = [self._buffer(i) for i in range(num_slots)]
        self.values: list[torch.Tensor | None] = [self._buffer(i) for i in range(num_slots)]

    def _buffer(self, slot: int) -> torch.Tensor:
        t = torch.zeros((self.batch_size, self.num_kv_heads, self.rows[slot], self.head_dim),
                        dtype=self.dtype, device=self.device)
        if self.static:
            torch._dynamo.mark_static_address(t)
        return t

    @staticmethod
    def slot_bytes(batch_size: int, num_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype) -> int:
        """Analytic bytes of one slot: 2 (K and V) * B * H_kv * L * D * bytes(dtype)."""
        return 2 * batch_size * num_kv_heads * max_len * head_dim * dtype.itemsize

    def _slot(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        physical = self.view[slot] if self.view is not None else slot
        keys, values = self.keys[physical], self.values[physical]
        if keys is None:
            raise RuntimeError(f"KV slot {physical} was dropped from this cache")
        return keys, values

    def update(self, slot: int, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H_kv, S, D] at rows start_pos..start_pos+S of `slot` (overwriting what was
        there) and return the keys and values the queries may see (read)."""
        self.write(slot, start_pos, k, v)
        return self.read(slot, start_pos, k.shape[2])

    def write(self, slot: int, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rows start_pos..start_pos+S of `slot` := k, v [B, H_kv, S, D]. A tensor position (the
        fast decode step: no new Python int per step, so a compiled step never recompiles) names the
        rows itself, [S]."""
        keys, values = self._slot(slot)
        if isinstance(start_pos, torch.Tensor):
            keys.index_copy_(2, start_pos, k)
            values.index_copy_(2, start_pos, v)
        else:
            keys[:, :, start_pos:start_pos + k.shape[2]].copy_(k)
            values[:, :, start_pos:start_pos + v.shape[2]].copy_(v)

    def read(self, slot: int, start_pos: int | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of rows 0..start_pos+length of `slot`; with a tensor position, the whole buffer
        [B, H_kv, max_len, D], masked by the caller (Positions.at)."""
        keys, values = self._slot(slot)
        if isinstance(start_pos, torch.Tensor):
            return keys, values
        end = start_pos + length
        return keys[:, :, :end], values[:, :, :end]

    def buffers_of(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole K and V buffers of `slot` [B, H_kv, rows, D]."""
        return self._slot(slot)

    def copy_rows(self, slot: int, start_pos: int | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of rows start_pos..start_pos+length of `slot` (a tensor position: rows [S])."""
        keys, values = self._slot(slot)
        if isinstance(start_pos, torch.Tensor):
            return keys.index_select(2, start_pos), values.index_select(2, start_pos)
        return keys[:, :, start_pos:start_pos + length].clone(), values[:, :, start_pos:start_pos + length].clone()

    def merge_groups(self, slots_per_layer: Sequence[Sequence[int]], how: str) -> None:
        """The prefill is over: per layer, its slots (one per group, in loop order) become one,
        the last one ("last"), the first ("first") or their mean, kept in the first ("mean"). The
        others are freed; slot `layer` then names the kept one."""
        kept = []
        for slots in slots_per_layer:
            keep = slots[-1] if how == "last" else slots[0]
            if how == "mean":
                for buffers in (self.keys, self.values):
                    for other in slots[1:]:
                        buffers[keep].add_(buffers[other])
                    buffers[keep].div_(len(slots))
            kept.append(keep)
        drop = {s for slots in slots_per_layer for s in slots} - set(kept)
        for s in drop:
            self.keys[s] = self.values[s] = None
        self.view = kept

    @property
    def merged(self) -> bool:
        """Whether the prefill's groups were merged (the cache is in its decode layout)."""
        return self.view is not None

    def mark_static(self) -> "KVCache":
        """Tell torch.compile the buffers keep their addresses, now and when reset() makes them
        again: CUDA graphs then read and write them in place between replays. A compiled step that
        mutates an input not marked static is not captured as a CUDA graph at all (inductor skips
        it for "mutated inputs"). Eager code ignores the mark."""
        self.static = True
        for t in self.buffers():
            torch._dynamo.mark_static_address(t)
        return self

    def buffers(self) -> list[torch.Tensor]:
        """The tensors the cache holds now."""
        return [t for t in self.keys + self.values if t is not None]

    def reset(self) -> "KVCache":
        """Ready for the next prompt: slots freed after a prefill are allocated again and the kept
        ones stay where they are (so a compiled step sees the same addresses every time). Rows are
        not cleared: a prefill overwrites every row a later query can see."""
        for slots in (self.keys, self.values):
            for i, t in enumerate(slots):
                if t is None:
                    slots[i] = self._buffer(i)
        self.view = None
        return self

    @property
    def num_slots(self) -> int:
        """Slots currently held."""
        return sum(k is not None for k in self.keys)

    def nbytes(self) -> int:
        """Exact bytes held by the cache's tensors."""
        return sum(t.numel() * t.element_size() for t in self.buffers())
