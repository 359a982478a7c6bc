"""Making a model of a given class in a dtype, on a device: real and initialised, real and empty
(for weights about to be loaded), or on the meta device / under fake tensors (the fake probe).

models/__init__.py picks the class by config.arch; models/checkpoints.py builds the class it was
asked for. Neither is imported here, so checkpoints and the model classes need no cycle."""

from __future__ import annotations

import contextlib

import torch

from .config import ConfigError, LoopConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dtype(dtype) -> torch.dtype:
    """None (float32), a torch dtype, or its name -> the torch dtype."""
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


def construct(cls: type[torch.nn.Module], config: LoopConfig, dtype=None, device=None,
              init: bool = True) -> torch.nn.Module:
    """A `cls` model of `config` in eval mode, randomly initialised (nothing on the meta device).
    init=False leaves the parameters uninitialised (torch.empty), for weights about to be loaded:
    the model is built on the meta device and given real storage once, with nothing computed."""
    dtype, device = as_dtype(dtype), torch.device(device or "cpu")
    with torch.device(device if init else "meta"), _default_dtype(dtype):
        model = cls(config)
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
