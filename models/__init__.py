"""The three models meltbench compares, built from one config class and one set of layers.

    from models import build_model
    model = build_model("melt", size="tiny", loops=4)
    cache = model.new_cache(batch_size=2, max_len=256)
    logits = model(input_ids, cache=cache, start_pos=0)
"""

from __future__ import annotations

import contextlib

import torch

from .cache import KVCache
from .config import (ALL_MODEL_NAMES, CACHE_UPDATES, EXIT_POLICIES, INIT_LATENTS, KV_SHARINGS, MODEL_NAMES,
                     MODEL_OPTIONS, PEER_NAMES, SIZES, ConfigError, LoopConfig, make_config)
from .hf_llama import HFLlamaLM
from .layers import CausalLM
from .loopcoder import LoopCoderLM
from .melt import MeltLM
from .ouro import OuroLM
from .standard import StandardLM

MODEL_CLASSES: dict[str, type[CausalLM]] = {"standard": StandardLM, "ouro": OuroLM, "melt": MeltLM,
                                            "loopcoder": LoopCoderLM,
                                            "hf_llama": HFLlamaLM}  # the peer, see models/hf_llama.py

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _as_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"unknown value {dtype!r}", " | ".join(DTYPES))
    return DTYPES[dtype]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # Parameters are created directly in the target dtype (fake/meta tensors cannot be cast later).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_from_config(config: LoopConfig, dtype=None, device=None, init: bool = True) -> CausalLM:
    """A model of config.arch in eval mode, randomly initialised (nothing on the meta device).
    init=False leaves the parameters uninitialised (torch.empty), for weights about to be loaded:
    the model is built on the meta device and given real storage once, with nothing computed."""
    dtype, device = _as_dtype(dtype), torch.device(device or "cpu")
    with torch.device(device if init else "meta"), _default_dtype(dtype):
        model = MODEL_CLASSES[config.arch](config)
    if not init and device.type != "meta":
        _materialize(model, device)
    elif device.type != "meta":
        with torch.no_grad():
            model.init_weights()
    return model.eval()


def _materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Give every meta parameter uninitialised storage on `device`, keeping tied ones tied
    (Module.to_empty would untie them, and cannot swap the fake tensors of the fake probe)."""
    new: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in new:
                new[id(p)] = torch.nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
            setattr(module, name, new[id(p)])


def build_model(name: str, size: str = "tiny", loops: int | None = None, *, dtype=None, device=None,
                **overrides) -> CausalLM:
    """Build "standard" | "ouro" | "melt" (or the peer "hf_llama") at a size preset. Bad input raises ConfigError (a
    ValueError) naming the field. `dtype`: torch dtype or "float32" | "bfloat16"; `device` may be
    "meta" to count parameters or estimate memory without allocating."""
    return build_from_config(make_config(name, size, loops, **overrides), dtype=dtype, device=device)


__all__ = ["build_model", "build_from_config", "make_config", "LoopConfig", "KVCache", "ConfigError",
           "CausalLM", "StandardLM", "OuroLM", "MeltLM", "LoopCoderLM", "MODEL_NAMES", "PEER_NAMES", "ALL_MODEL_NAMES", "HFLlamaLM", "MODEL_OPTIONS", "SIZES", "CACHE_UPDATES",
           "INIT_LATENTS", "KV_SHARINGS", "EXIT_POLICIES"]
