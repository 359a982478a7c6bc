"""Standard LLM: embed -> N layers once -> final norm -> lm_head. KV cache: N slots (slot = layer).

The "non-looped model of the same size": T = 1 of the looped models, with the same weights.
"""

from __future__ import annotations

import torch

from .cache import KVCache
from .causal_lm import CausalLM
from .layers import EAGER, Eager, Positions, decoder_layer


class StandardLM(CausalLM):
    arch = "standard"
    affine_chunks = True  # the fake probe may skip prefill chunks (CausalLM.affine_chunks)
    ignored_keys = ("model.early_exit_gate.",)  # present in Ouro checkpoints, unused here

    def num_cache_slots(self) -> int:
        return self.config.num_hidden_layers

    def run_positions(self, x: torch.Tensor, cache: KVCache | None, pos: Positions, last_only: bool,
                      apply: Eager = EAGER) -> torch.Tensor:
        for layer_idx, layer in enumerate(self.model.layers):
            x = apply(decoder_layer, layer, x, pos, self.slot(cache, layer_idx))
        return self.model.norm(x[:, -1:] if last_only else x)
