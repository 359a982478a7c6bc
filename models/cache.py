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

from typing import NamedTuple, Sequence

import torch


class Slot(NamedTuple):
    """One slot's K and V buffers, [B, H_kv, rows, D] each: what a layer reads and writes. A tuple
    of tensors, so a compiled layer takes it as an input and one compiled graph serves every slot."""

    keys: torch.Tensor
    values: torch.Tensor

    def write(self, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rows start_pos..start_pos+S := k, v [B, H_kv, S, D]. A tensor position (the decode step:
        no Python int that changes per step, so a compiled step never recompiles) names the rows
        itself, [S]."""
        if isinstance(start_pos, torch.Tensor):
            self.keys.index_copy_(2, start_pos, k)
            self.values.index_copy_(2, start_pos, v)
        else:
            self.keys[:, :, start_pos:start_pos + k.shape[2]].copy_(k)
            self.values[:, :, start_pos:start_pos + v.shape[2]].copy_(v)

    def read(self, start_pos: int | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of rows 0..start_pos+length; with a tensor position, the whole buffers
        [B, H_kv, rows, D], masked by the caller (Positions.at)."""
        if isinstance(start_pos, torch.Tensor):
            return self.keys, self.values
        end = start_pos + length
        return self.keys[:, :, :end], self.values[:, :, :end]

    def update(self, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """write(), then read() what the queries of these rows may see."""
        self.write(start_pos, k, v)
        return self.read(start_pos, k.shape[2])

    def copy_rows(self, start_pos: int | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of rows start_pos..start_pos+length (a tensor position: rows [S])."""
        if isinstance(start_pos, torch.Tensor):
            return self.keys.index_select(2, start_pos), self.values.index_select(2, start_pos)
        end = start_pos + length
        return self.keys[:, :, start_pos:end].clone(), self.values[:, :, start_pos:end].clone()


class KVCache:
    def __init__(self, num_slots: int, batch_size: int, num_kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 slot_rows: Sequence[int] | None = None):
        self.dtype, self.device = dtype, device
        self.batch_size, self.max_len = batch_size, max_len
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.rows = list(slot_rows) if slot_rows is not None else [max_len] * num_slots
        self.view: list[int] | None = None  # after merge_groups: slot number -> the slot kept for it
        # One tensor per slot (not one big block) so that a slot can be dropped on its own.
        self.keys: list[torch.Tensor | None] = [self._buffer(i) for i in range(num_slots)]
        self.values: list[torch.Tensor | None] = [self._buffer(i) for i in range(num_slots)]

    def _buffer(self, slot: int) -> torch.Tensor:
        return torch.zeros((self.batch_size, self.num_kv_heads, self.rows[slot], self.head_dim),
                           dtype=self.dtype, device=self.device)

    @staticmethod
    def slot_bytes(batch_size: int, num_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype) -> int:
        """Analytic bytes of one slot: 2 (K and V) * B * H_kv * L * D * bytes(dtype)."""
        return 2 * batch_size * num_kv_heads * max_len * head_dim * dtype.itemsize

    def slot(self, slot: int) -> Slot:
        """Slot number `slot` (after merge_groups, the slot kept for it)."""
        physical = self.view[slot] if self.view is not None else slot
        keys, values = self.keys[physical], self.values[physical]
        if keys is None:
            raise RuntimeError(f"KV slot {physical} was dropped from this cache")
        return Slot(keys, values)

    def update(self, slot: int, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H_kv, S, D] at rows start_pos.. of `slot` and return what the queries see."""
        return self.slot(slot).update(start_pos, k, v)

    def write(self, slot: int, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.slot(slot).write(start_pos, k, v)

    def read(self, slot: int, start_pos: int | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.slot(slot).read(start_pos, length)

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

    def buffers(self) -> list[torch.Tensor]:
        """The tensors the cache holds now."""
        return [t for t in self.keys + self.values if t is not None]

    def reset(self) -> "KVCache":
        """Ready for the next prompt: slots freed after a prefill are allocated again and the kept
        ones stay where they are (so a captured decode step finds them where it left them). Rows are
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
