"""The three models meltbench compares, built from one config class and one set of layers.

    from models import build_model
    model = build_model("melt", size="tiny", loops=4)
    cache = model.new_cache(batch_size=2, max_len=256)
    logits = model(input_ids, cache=cache, start_pos=0)

    config.py      LoopConfig (a transformers PretrainedConfig), the size presets, option checks
    layers.py      the decoder layer every model shares (Ouro's), RoPE, attention, chunking
    causal_lm.py   the base model: embeddings, head, cache set-up, chunked forward, decode step
    standard.py, ouro.py, melt.py, loopcoder.py   one model a file; hf_llama.py: transformers' peer
    cache.py       the preallocated KV cache (exact nbytes()); cache_policies.py: the LoopLM's
    construct.py   a model made in a dtype on a device (real, empty for loading, meta or fake)
    checkpoints.py the Hugging Face folder layout: save, load, Ouro's checkpoints
    runtime.py     how a model is run: engine, decode loop, timers, scenario, generate, score
    compiled.py    the compiled decode step: layer functions compiled once, the step one CUDA graph

The bottom of the flow: runs with torch and transformers alone.
May import: nothing.
"""

from __future__ import annotations

from .cache import KVCache
from .causal_lm import CausalLM
from .config import (ALL_MODEL_NAMES, CACHE_UPDATES, EXIT_POLICIES, INIT_LATENTS, KV_SHARINGS, MODEL_NAMES,
                     MODEL_OPTIONS, PEER_NAMES, SIZES, ConfigError, LoopConfig, make_config)
from .construct import construct
from .hf_llama import HFLlamaLM
from .loopcoder import LoopCoderLM
from .melt import MeltLM
from .ouro import OuroLM
from .standard import StandardLM

MODEL_CLASSES: dict[str, type[CausalLM]] = {"standard": StandardLM, "ouro": OuroLM, "melt": MeltLM,
                                            "loopcoder": LoopCoderLM,
                                            "hf_llama": HFLlamaLM}  # the peer, see models/hf_llama.py


def build_from_config(config: LoopConfig, dtype=None, device=None, init: bool = True) -> CausalLM:
    """A model of config.arch in eval mode, randomly initialised (nothing on the meta device).
    init=False leaves the parameters uninitialised, for weights about to be loaded (construct)."""
    return construct(MODEL_CLASSES[config.arch], config, dtype=dtype, device=device, init=init)


def build_model(name: str, size: str = "tiny", loops: int | None = None, *, dtype=None, device=None,
                **overrides) -> CausalLM:
    """Build "standard" | "ouro" | "melt" (or the peer "hf_llama") at a size preset. Bad input raises ConfigError (a
    ValueError) naming the field. `dtype`: torch dtype or "float32" | "bfloat16"; `device` may be
    "meta" to count parameters or estimate memory without allocating."""
    return build_from_config(make_config(name, size, loops, **overrides), dtype=dtype, device=device)


__all__ = ["build_model", "build_from_config", "make_config", "LoopConfig", "KVCache", "ConfigError",
           "CausalLM", "StandardLM", "OuroLM", "MeltLM", "LoopCoderLM", "HFLlamaLM", "MODEL_CLASSES",
           "MODEL_NAMES", "PEER_NAMES", "ALL_MODEL_NAMES", "MODEL_OPTIONS", "SIZES", "CACHE_UPDATES",
           "INIT_LATENTS", "KV_SHARINGS", "EXIT_POLICIES"]
