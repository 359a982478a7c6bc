"""The peer: transformers' LlamaForCausalLM with the standard model's dimensions.

Not one of the three architectures, but the library most users would pick for a non-looped model:
benchmarking it in the same sweep, through the same probes and timers, shows what our standard
model's static cache and decode step buy. Random weights (HF's own init), SDPA attention, and HF's
own `generate` with its default cache (DynamicCache, which grows by concatenation). It has two
RMSNorms per layer where Ouro's layer has four, so 2 * d * N fewer parameters than `standard`.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import KVCache
from .config import LoopConfig


class HFLlamaLM(nn.Module):
    arch = "hf_llama"

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

    def forward(self, input_ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """input_ids [B, S] -> logits [B, S, V] (or [B, 1, V]), uncached."""
        return self.hf(input_ids, use_cache=False, logits_to_keep=1 if last_only else 0).logits

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """HF's greedy generate with its default cache: [B, S] -> [B, S + max_new_tokens]."""
        return self.hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
