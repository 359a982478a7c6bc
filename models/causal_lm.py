"""The base class of our models: embeddings, LM head, cache set-up, input checks, the prompt's
(chunked) forward, the static decode step, and checkpoints (models/checkpoints.py). Each model file
subclasses it and says how its layers loop and what its cache keeps."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch import nn

from .cache import KVCache, Slot
from .config import ConfigError, LoopConfig
from .layers import EAGER, Backbone, Eager, Positions, RMSNorm, chunk_bounds


class CausalLM(nn.Module):
    """What the three models share: embeddings, LM head, cache set-up, input checks, the prompt's
    (chunked) forward, the static decode step, and checkpoints. Subclasses say how many KV slots
    they need and how the layers run over a block of tokens (run_positions)."""

    arch: str = ""
    compilable = True  # decode_step's layers can be compiled and the step captured (models/runtime.py)
    # Whether every full-size prefill chunk from the third on runs the same ops, on tensors whose
    # sizes depend on where the chunk starts only through one key axis of length L = start + C (the
    # mask [C, L] and what attend / SDPA make of it; the cache is read through views [B, Hkv, L, D]).
    # The fake probe may then skip chunks (bench/measure/probes.py, FakeLiveTensors.prefill_chunks).
    # True for the standard model, the LoopLM (every policy) and MELT; not for LoopCoder, whose
    # window attention gathers min(start, W - 1) earlier rows.
    affine_chunks = False
    # Checkpoint keys a model may lack (freshly initialised) or ignore when loading.
    optional_keys: tuple[str, ...] = ()
    ignored_keys: tuple[str, ...] = ()

    def __init__(self, config: LoopConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- what subclasses define -------------------------------------------------------------
    def num_cache_slots(self) -> int:
        raise NotImplementedError

    def run_positions(self, x: torch.Tensor, cache: KVCache | None, pos: Positions,
                      last_only: bool, apply: Eager = EAGER) -> torch.Tensor:
        """The layers over a block of embedded tokens x [B, S, d] at `pos` -> final normed hidden
        states [B, S, d] ([B, 1, d] may do when last_only). Every layer application goes through
        `apply` (models.layers.Eager: as written, or compiled once for all layers and loops)."""
        raise NotImplementedError

    @staticmethod
    def slot(cache: KVCache | None, slot: int) -> Slot | None:
        """The buffers of cache slot `slot`, or None without a cache."""
        return None if cache is None else cache.slot(slot)

    def num_decode_slots(self) -> int:
        """Slots the cache holds after the prefill (fewer for a policy that merges them)."""
        return self.num_cache_slots()

    def needs_cache(self) -> bool:
        """Whether even an uncached forward needs a scratch cache (a loop reading another's K/V)."""
        return False

    def default_chunk_size(self) -> int | None:
        """The chunk of a forward that names none: one pass (None), except where chunks are part of
        the method (MELT)."""
        return None

    def end_prefill(self, cache: KVCache) -> None:
        """The prompt is in: a cache policy that keeps more during the prefill than after it
        (the LoopLM's last-loop sharing) lets go of the rest here."""

    # -- weights ------------------------------------------------------------------------------
    def init_weights(self, std: float = 0.02, prefix: str = "") -> None:
        """Random init in the usual HF style: N(0, std) matrices, unit norms, zero biases and zero
        for any other parameter; only the modules under `prefix` (e.g. "model.latent_gates")."""
        for name, module in self.named_modules():
            if not name.startswith(prefix):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            else:
                for p in module.parameters(recurse=False):
                    nn.init.zeros_(p)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once

    def weights_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # -- cache --------------------------------------------------------------------------------
    def _check_max_len(self, max_len: int) -> None:
        limit = self.config.max_position_embeddings
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= limit:
            raise ConfigError("max_len", f"got {max_len!r}", f"an integer in 1..{limit} (max_position_embeddings)")

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A KV cache preallocated for batch_size sequences of up to max_len tokens."""
        self._check_max_len(max_len)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size", f"got {batch_size!r}", "an integer >= 1")
        c = self.config
        return KVCache(self.num_cache_slots(), batch_size, c.num_key_value_heads, max_len, c.head_dim,
                       self.dtype, self.device)

    def kv_cache_bytes(self, batch_size: int, max_len: int) -> int:
        """Analytic size of new_cache(batch_size, max_len), without allocating it."""
        c = self.config
        return self.num_cache_slots() * KVCache.slot_bytes(batch_size, c.num_key_value_heads, max_len,
                                                            c.head_dim, self.dtype)

    def kv_bytes_per_token(self) -> int:
        return self.kv_cache_bytes(1, 1)

    def kv_decode_bytes(self, batch_size: int, max_len: int) -> int:
        """Analytic size of the cache after the prefill (num_decode_slots)."""
        c = self.config
        return self.num_decode_slots() * KVCache.slot_bytes(batch_size, c.num_key_value_heads, max_len,
                                                             c.head_dim, self.dtype)

    # -- forward ------------------------------------------------------------------------------
    def positions(self, start: int, length: int) -> Positions:
        c = self.config
        return Positions.make(start, length, c.head_dim, c.rope_theta, self.dtype, self.device)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0,
                last_only: bool = False, chunk_size: int | Sequence[int] | None = None,
                end_prefill: bool = True) -> torch.Tensor:
        """input_ids [B, S] at positions start_pos.. -> logits [B, S, V], or [B, 1, V] for the last
        position only (a long prefill then never materialises [B, S, V]).

        chunk_size (an int, or a list of chunk lengths; default: default_chunk_size()) runs the
        tokens chunk after chunk, every loop of a chunk before the next one starts; later chunks
        read earlier chunks' K/V from the cache (a scratch cache when none is given). For the
        standard model and the per-loop LoopLM that is exactly the one-pass result; for MELT the
        chunks are part of the method. A prompt given in several calls is one prefill: pass
        end_prefill=False to all calls but the last (see end_prefill())."""
        self._check_inputs(input_ids, cache, start_pos)
        B, S = input_ids.shape
        bounds = chunk_bounds(S, chunk_size or self.default_chunk_size() or S)
        if cache is None and (len(bounds) > 1 or self.needs_cache()):
            cache = self.new_cache(B, S)
        hidden = []
        chunks = bounds
        if last_only and self.affine_chunks:
            # Fake tensors hold no data: the fake memory probe runs only the chunks that bound the peak.
            fake = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)
            chunks = fake.prefill_chunks(bounds) if hasattr(fake, "prefill_chunks") else bounds
        for begin, end in chunks:
            if last_only:  # earlier chunks only fill the cache: free their output before the next
                hidden.clear()
            # The chunk's embedding [B, C, d] is not named here: the layers free it once used.
            hidden.append(self.run_positions(self.model.embed_tokens(input_ids[:, begin:end]), cache,
                                             self.positions(start_pos + begin, end - begin), last_only))
        if cache is not None and end_prefill:
            self.end_prefill(cache)
        hidden = torch.cat(hidden, dim=1) if len(hidden) > 1 else hidden[0]
        return self.lm_head(hidden[:, -1:] if last_only else hidden)

    def _check_inputs(self, input_ids: torch.Tensor, cache: KVCache | None, start_pos: int) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1 \
                or input_ids.dtype not in (torch.int32, torch.int64):
            raise ConfigError("input_ids", f"got {getattr(input_ids, 'shape', type(input_ids))}",
                              "an integer tensor [batch, seq_len] with seq_len >= 1")
        B, S = input_ids.shape
        if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
            raise ConfigError("start_pos", f"got {start_pos!r}", "an integer >= 0")
        if cache is None:
            if start_pos != 0:
                raise ConfigError("start_pos", f"{start_pos} without a cache", "0 (or pass the cache)")
            self._check_max_len(S)
            return
        if B != cache.batch_size:
            raise ConfigError("input_ids", f"batch {B} but the cache holds {cache.batch_size}",
                              f"batch {cache.batch_size}")
        if start_pos + S > cache.max_len:
            raise ConfigError("start_pos", f"start_pos {start_pos} + length {S} is beyond the cache "
                              f"(max_len {cache.max_len})", f"start_pos + length <= {cache.max_len}")

    # -- the runtime's interface (models/runtime.py) ---------------------------------------------
    def prefill(self, input_ids: torch.Tensor, cache: KVCache, chunk_size: int | None = None) -> torch.Tensor:
        """The prompt [B, S] into a fresh cache -> logits of its last position [B, 1, V]."""
        return self(input_ids, cache=cache, start_pos=0, last_only=True, chunk_size=chunk_size)

    def decode_step(self, token: torch.Tensor, cache: KVCache, pos: torch.Tensor,
                    apply: Eager = EAGER) -> torch.Tensor:
        """One decode token per sequence, token [B, 1] at position pos (int64 tensor [1]) -> logits
        [B, 1, V]. Same result as self(token, cache=cache, start_pos=int(pos), last_only=True), but
        with static shapes (attention covers all max_len rows of the cache, masked past pos) and no
        Python value that changes per step, so each compiled layer (apply) is traced once and a
        CUDA graph can replay the whole step (models/runtime.py). No input checks here: they would
        read pos back to Python."""
        c = self.config
        positions = Positions.at(pos, cache.max_len, c.head_dim, c.rope_theta, self.dtype)
        hidden = self.run_positions(self.model.embed_tokens(token), cache, positions, True, apply)
        return self.lm_head(hidden)

    def decode(self, token: torch.Tensor, cache: KVCache, start_pos: int, steps: int,
               step: Callable | None = None, on_step: Callable[[], None] | None = None) -> torch.Tensor:
        """`steps` greedy steps from token [B, 1] at start_pos with decode_step (or `step`, the
        compiled one) -> the chosen tokens [B, steps]."""
        from .runtime import greedy_decode

        return greedy_decode(step or self.decode_step, token, cache, start_pos, steps, on_step)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding with the KV cache: [B, S] -> [B, S + max_new_tokens] (the prompt
        through forward, every later token through decode_step; models/runtime.py)."""
        from .runtime import generate

        return generate(self, input_ids, max_new_tokens)

    # -- checkpoints (Hugging Face layout; models/checkpoints.py) ------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        from .checkpoints import save

        save(self, path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu", **overrides) -> "CausalLM":
        """Load a checkpoint: a folder (ours, or Ouro's as downloaded) or a Hugging Face hub id
        from the local cache. Weights this model has and the checkpoint lacks (MELT's gates) are
        freshly initialised; weights it does not use (the early-exit gate, for the standard model)
        are ignored. See models/checkpoints.py."""
        from .checkpoints import load

        return load(cls, path, dtype=dtype, device=device, **overrides)
