"""The peer: transformers' LlamaForCausalLM with the standard model's dimensions.

Not one of the three architectures, but the library most users would pick for a non-looped model:
benchmarking it in the same sweep, through the same probes and timers, shows what our standard
model's static cache and decode step buy. Random weights (HF's own init), SDPA attention, and HF's
own `generate` with its default cache (DynamicCache, which grows by concatenation). It has two
RMSNorms per layer where Ouro's layer has four, so 2 * d * N fewer parameters than `standard`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .cache import KVCache
from .config import LoopConfig


class HFLlamaLM(nn.Module):
    arch = "hf_llama"
    compilable = False  # run the way transformers users run it: eager, through generate

    def __init__(self, config: LoopConfig):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM  # imported on use: it is slow to load

        self.config = config
        hf_config = LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
            rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=config.tie_word_embeddings, attention_bias=False, mlp_bias=False,
            attn_implementation="sdpa", dtype=torch.get_default_dtype())
        self.hf = LlamaForCausalLM(hf_config)
        # Random weights never stop on an end-of-sequence token: every run decodes all its tokens.
        self.hf.generation_config.eos_token_id = None
        self.hf.generation_config.pad_token_id = 0

    def init_weights(self, std: float = 0.02) -> None:
        """HF's initialisation (N(0, initializer_range = 0.02) matrices, unit norms) ran in __init__."""

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def weights_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.hf.lm_head.weight.device

    def kv_cache_bytes(self, batch_size: int, max_len: int) -> int:
        """What HF's DynamicCache holds after max_len tokens: N layers of K and V (the standard
        model's layout). While it grows, each step briefly holds one layer's old and new copies."""
        c = self.config
        return c.num_hidden_layers * KVCache.slot_bytes(batch_size, c.num_key_value_heads, max_len,
                                                        c.head_dim, self.dtype)

    def kv_bytes_per_token(self) -> int:
        return self.kv_cache_bytes(1, 1)

    def kv_decode_bytes(self, batch_size: int, max_len: int) -> int:
        return self.kv_cache_bytes(batch_size, max_len)

    def forward(self, input_ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """input_ids [B, S] -> logits [B, S, V] (or [B, 1, V]), uncached."""
        return self.hf(input_ids, use_cache=False, logits_to_keep=1 if last_only else 0).logits

    # -- the runtime's interface (models/runtime.py) ---------------------------------------------
    def new_cache(self, batch_size: int, max_len: int) -> "HFCache":
        return HFCache(self.hf.config)

    def prefill(self, input_ids: torch.Tensor, cache: "HFCache", chunk_size: int | None = None) -> torch.Tensor:
        """The prompt through the model's forward into its DynamicCache (chunk by chunk when
        chunk_size is given, as the other models prefill) -> last logits [B, 1, V]."""
        from .layers import chunk_bounds

        for begin, end in chunk_bounds(input_ids.shape[1], chunk_size or input_ids.shape[1]):
            logits = self.hf(input_ids[:, begin:end], use_cache=True, logits_to_keep=1,
                             **{_cache_keyword(self.hf): cache.hf_cache}).logits
        return logits

    def decode(self, token: torch.Tensor, cache: "HFCache", start_pos: int, steps: int, step=None,
               on_step: Callable[[], None] | None = None) -> torch.Tensor:
        """transformers' own greedy `generate`, continuing from the cache (which holds start_pos
        tokens): `steps` tokens after `token`. A logits processor calls on_step once per step, as
        that step's scores are ready; generate's set-up runs before the first call."""
        from transformers import LogitsProcessorList

        if step is not None:
            raise ValueError("compile: hf_llama runs transformers' eager generate; allowed: false")
        if steps == 0:
            return token[:, :0]
        # generate wants the whole sequence; only the positions past the cache are run
        ids = torch.cat([torch.zeros_like(token).expand(-1, start_pos), token], dim=1)

        def mark(input_ids, scores):
            if on_step is not None:
                on_step()
            return scores

        out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               **{_cache_keyword(self.hf): cache.hf_cache}, max_new_tokens=steps,
                               min_new_tokens=steps, logits_processor=LogitsProcessorList([mark]))
        return out[:, start_pos + 1:]


class HFCache:
    """transformers' DynamicCache (what generate makes by default: it grows by concatenation) behind
    the runtime's cache interface."""

    def __init__(self, hf_config):
        self.hf_config = hf_config
        self.reset()

    def reset(self) -> "HFCache":
        from transformers import DynamicCache

        self.hf_cache = None
        self.hf_cache = DynamicCache(config=self.hf_config)
        return self

    def buffers(self) -> list[torch.Tensor]:
        return [t for layer in self.hf_cache.layers
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                if isinstance(t, torch.Tensor)]

    def nbytes(self) -> int:
        """Bytes the cache's tensors hold now (it allocates as it grows, not up front)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())


def _cache_keyword(hf_model) -> str:
    """transformers renamed `past_key_values` to `cache` in its newest releases (the old name
    warns); older 5.x releases, as on the GPU machines, know only the old one."""
    import inspect

    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
