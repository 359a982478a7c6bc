"""The KV cache shared by all three models: preallocated slots, written in place.

A slot is one layer's K and V buffers for one loop, each [B, H_kv, max_len, D]. The models differ
only in how many slots they ask for and which slot a (loop, layer) writes:
  standard: N slots, slot = layer
  LoopLM:   N * T slots, slot = loop * N + layer      (memory grows with depth)
  MELT:     N slots, slot = layer, every loop overwrites the token's row in place
Buffers are allocated once for (batch, max_len); nothing is ever concatenated, so a step never makes
a transient copy of the cache (the peak-inflating pattern of growing caches).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_slots: int, batch_size: int, num_kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        self.shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.dtype, self.device = dtype, device
        self.batch_size, self.max_len = batch_size, max_len
        self.static = False
        # One tensor per slot (not one big block) so that a slot can be dropped on its own.
        self.keys: list[torch.Tensor | None] = [self._buffer() for _ in range(num_slots)]
        self.values: list[torch.Tensor | None] = [self._buffer() for _ in range(num_slots)]

    def _buffer(self) -> torch.Tensor:
        t = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        if self.static:
            torch._dynamo.mark_static_address(t)
        return t

    @staticmethod
    def slot_bytes(batch_size: int, num_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype) -> int:
        """Analytic bytes of one slot: 2 (K and V) * B * H_kv * L * D * bytes(dtype)."""
        return 2 * batch_size * num_kv_heads * max_len * head_dim * dtype.itemsize

    def update(self, slot: int, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H_kv, S, D] at rows start_pos..start_pos+S of `slot` (overwriting what was
        there) and return views of rows 0..start_pos+S, the keys and values the queries may see."""
        keys, values = self.keys[slot], self.values[slot]
        if keys is None:
            raise RuntimeError(f"KV slot {slot} was dropped from this cache")
        if isinstance(start_pos, torch.Tensor):
            # The fast decode step: the position is a tensor [S] (no new Python int per step, so a
            # compiled step never recompiles); rows are written in place and the whole buffer
            # [B, H_kv, max_len, D] is returned, masked by the caller (Positions.at).
            keys.index_copy_(2, start_pos, k)
            values.index_copy_(2, start_pos, v)
            return keys, values
        end = start_pos + k.shape[2]
        keys[:, :, start_pos:end].copy_(k)
        values[:, :, start_pos:end].copy_(v)
        return keys[:, :, :end], values[:, :, :end]

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
        """Ready for the next prompt: slots dropped after a prefill are allocated again, the kept
        ones stay where they are (so a compiled step sees the same addresses every time). Rows are
        not cleared: a prefill overwrites every row a later query can see."""
        for slots in (self.keys, self.values):
            for i, t in enumerate(slots):
                if t is None:
                    slots[i] = self._buffer()
        return self

    def keep_slots(self, slots) -> None:
        """Free every slot not in `slots` (the LoopLM's last-loop KV sharing after prefill)."""
        keep = set(slots)
        for i in range(len(self.keys)):
            if i not in keep:
                self.keys[i] = self.values[i] = None

    @property
    def num_slots(self) -> int:
        """Slots currently held."""
        return sum(k is not None for k in self.keys)

    def has_slot(self, slot: int) -> bool:
        return self.keys[slot] is not None

    def nbytes(self) -> int:
        """Exact bytes held by the cache's tensors."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
