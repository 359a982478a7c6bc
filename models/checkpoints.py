"""Checkpoints in the Hugging Face layout: ours (save_pretrained) and Ouro's, as users download them.

    folder = locate("ByteDance/Ouro-1.4B")           # a local folder, or a hub id (HF cache, offline mode)
    config, dtype = read_config(folder, "melt")     # a checked LoopConfig, and the weights' dtype
    model = load(MeltLM, folder, device="cuda")     # weights copied in place, shard by shard

A checkpoint folder holds config.json and either model.safetensors or shards listed in
model.safetensors.index.json. Every value a real Ouro config.json holds is honoured or refused with
a ConfigError naming the field: a model that ran with a setting it does not implement would give
wrong logits without saying so.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, LoopConfig
from .construct import construct

log = logging.getLogger("models")

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# What a download fetches: the config, the weights, the tokenizer; not other formats' weights.
HUB_FILES = ["config.json", "*.safetensors", INDEX_NAME, "tokenizer*", "special_tokens_map.json",
             "vocab.json", "merges.txt", "generation_config.json"]
FOLDER_HELP = "a folder with config.json and model.safetensors (or its shards), or a Hugging Face hub id"

# config.json keys that describe the file, the tokenizer or training, not the forward pass.
METADATA = {"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "arch",
            "use_cache", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
            "torch_dtype", "dtype", "attention_dropout", "output_hidden_states", "output_attentions",
            "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class"}
# Keys that only matter with a sliding window, which use_sliding_window=true (refused) turns on.
SLIDING_ONLY = {"sliding_window", "max_window_layers"}


def locate(source: str | os.PathLike, weights: bool = True) -> Path:
    """The folder of a checkpoint: `source` itself when it is a folder, else a Hugging Face hub id
    resolved through huggingface_hub (its cache, HF_HOME and HF_HUB_OFFLINE apply). weights=False
    fetches config.json only. Raises ConfigError with one line when it cannot be found."""
    path = Path(source)
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or path.is_absolute() or text.startswith(".") or text.count("/") != 1:
        raise ConfigError("checkpoint", f"{text}: no such folder", FOLDER_HELP)
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    try:
        if weights:
            return Path(snapshot_download(text, allow_patterns=HUB_FILES))
        return Path(hf_hub_download(text, "config.json")).parent
    except HFValidationError:
        raise ConfigError("checkpoint", f"{text}: no such folder, and not a hub id", FOLDER_HELP) from None
    except LocalEntryNotFoundError:
        raise ConfigError("checkpoint", f"{text}: not in the local Hugging Face cache, and the hub cannot "
                          "be reached (offline, or no network)",
                          "a local folder, or a hub id downloaded beforehand (hf download ID)") from None
    except RepositoryNotFoundError:
        raise ConfigError("checkpoint", f"{text}: no such model on the Hugging Face hub (or it is private)",
                          FOLDER_HELP) from None
    except (HfHubHTTPError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError("checkpoint", f"{text}: download failed ({first})", FOLDER_HELP) from None


def read_config(folder: str | os.PathLike, arch: str, **overrides) -> tuple[LoopConfig, torch.dtype | None]:
    """(the checked LoopConfig of `folder`'s config.json for model `arch`, with `overrides` on top;
    the dtype its weights are stored in, or None). `total_ut_steps` gives loops and Ouro's
    0-based `early_exit_step` a fixed exit, unless the overrides set them."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError("checkpoint", f"{folder} has no config.json", FOLDER_HELP)
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError("checkpoint", f"{path}: not JSON ({e})", FOLDER_HELP) from None
    if not isinstance(raw, dict):
        raise ConfigError("checkpoint", f"{path}: not a JSON object", FOLDER_HELP)
    dtype = _stored_dtype(raw)
    fields = _forward_fields(raw)
    if overrides.get("loops") is None:
        overrides.pop("loops", None)
    exit_step = fields.pop("early_exit_step", None)
    if exit_step is not None and arch == "ouro" and "exit_policy" not in overrides:
        loops = overrides.get("loops", fields.get("total_ut_steps", 4))
        if isinstance(exit_step, bool) or not isinstance(exit_step, int) or not 0 <= exit_step < loops:
            raise ConfigError("early_exit_step", f"{exit_step!r} in {path} (0-based)", f"0..{loops - 1}")
        fields.update(exit_policy="fixed", exit_step=exit_step + 1)
    threshold = fields.get("early_exit_threshold")
    if arch == "ouro" and isinstance(threshold, (int, float)) and threshold < 1 and "exit_policy" not in overrides \
            and "exit_policy" not in fields:
        fields["exit_policy"] = "threshold"  # Ouro exits a token early below 1.0
    try:
        config = LoopConfig(arch=arch, **{**fields, **overrides})
        if arch == "standard":
            config.loops = 1
        return config.validate(), dtype
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError("checkpoint", f"{path}: {e}", FOLDER_HELP) from None


def _stored_dtype(raw: dict) -> torch.dtype | None:
    name = raw.get("dtype") or raw.get("torch_dtype")
    if name is None:
        return None
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError("dtype", f"{name!r} in config.json", "float32 | bfloat16 | float16")
    return dtype


def _forward_fields(raw: dict) -> dict:
    """The config.json values that shape the forward pass, every one either kept (to be checked
    by LoopConfig) or refused here; null means the default."""
    fields = {k: v for k, v in raw.items() if v is not None and k not in METADATA}
    if fields.pop("use_sliding_window", False):
        raise ConfigError("use_sliding_window", "true: sliding-window attention is not implemented here",
                          "false (full attention in every layer)")
    for key in SLIDING_ONLY:
        fields.pop(key, None)
    layer_types = fields.pop("layer_types", None)
    if layer_types is not None:
        other = [(i, t) for i, t in enumerate(layer_types) if t != "full_attention"]
        if other:
            raise ConfigError("layer_types", f"layer {other[0][0]} is {other[0][1]!r}",
                              "full_attention for every layer")
    for key in ("rope_scaling", "rope_parameters"):
        rope = fields.pop(key, None) or {}
        kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
        if kind not in ("default", None):
            raise ConfigError(key, f"rope_type {kind!r}: only unscaled RoPE is implemented here",
                              "null, or rope_type default")
        if isinstance(rope, dict) and rope.get("rope_theta") is not None:
            fields["rope_theta"] = rope["rope_theta"]
    if fields.get("hidden_act", "silu") != "silu":
        raise ConfigError("hidden_act", f"{fields['hidden_act']!r}", "silu (SwiGLU)")
    fields.pop("hidden_act", None)
    for key in ("attention_bias", "mlp_bias"):
        if fields.pop(key, False):
            raise ConfigError(key, "true: the layers here have no biases", "false")
    known = set(LoopConfig().to_dict()) | set(LoopConfig.attribute_map) | {"early_exit_step"}
    unknown = sorted(set(fields) - known)
    if unknown:
        log.warning("config.json: keys not used by meltbench's models, ignored: %s", ", ".join(unknown))
        for key in unknown:
            fields.pop(key)
    return fields


def _weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    index = folder / INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ConfigError("checkpoint", f"{folder}: shard {missing[0]} of {INDEX_NAME} is missing", FOLDER_HELP)
        return [folder / s for s in shards]
    raise ConfigError("checkpoint", f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}", FOLDER_HELP)


def load(cls, source: str | os.PathLike, dtype: torch.dtype | None = None,
         device: torch.device | str = "cpu", **overrides):
    """A `cls` model (StandardLM, OuroLM, MeltLM) with the checkpoint's weights, in `dtype`
    (default: the dtype the checkpoint names, else float32) on `device`.

    The model is built without initialising, then each stored tensor is copied into its parameter
    (views for MELT's two gate matrices), so memory holds the weights once plus one tensor. Weights
    the model has and the checkpoint lacks (`cls.optional_keys`, MELT's gates) are initialised;
    stored weights it does not use (`cls.ignored_keys`) are skipped. Under a FakeTensorMode (the
    fake memory probe) only names and shapes are read."""
    folder = locate(source)
    config, stored = read_config(folder, cls.arch, **overrides)
    model = construct(cls, config, dtype=dtype or stored or torch.float32, device=device, init=False)
    targets = model.state_dict()                 # views of the parameters (MELT's gate halves too)
    expected = set(targets)
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")       # the embedding's; a stored copy is read but not needed
    files = _weight_files(folder)
    fake = torch._guards.detect_fake_mode() is not None
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in files]
        stored_keys = {key: h for h in handles for key in h.keys()}
        partial = bool(cls.optional_keys) and any(k.startswith(cls.optional_keys) for k in stored_keys)
        missing = {k for k in expected - set(stored_keys) if partial or not k.startswith(cls.optional_keys)}
        unexpected = {k for k in set(stored_keys) - set(targets) if not k.startswith(cls.ignored_keys)}
        if missing or unexpected:
            raise ValueError(f"checkpoint {source} does not fit {cls.__name__}: "
                             f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        shapes = {k: tuple(h.get_slice(k).get_shape()) for k, h in stored_keys.items() if k in targets}
        wrong = [k for k, shape in shapes.items() if shape != tuple(targets[k].shape)]
        if wrong:
            raise ValueError(f"checkpoint {source} does not fit {cls.__name__}: {wrong[0]} is "
                             f"{list(shapes[wrong[0]])}, the model's is {list(targets[wrong[0]].shape)}")
        if not fake:
            with torch.no_grad():
                for key in shapes:
                    targets[key].copy_(stored_keys[key].get_tensor(key))
    if not fake and any(k.startswith(cls.optional_keys) for k in expected - set(stored_keys)):
        with torch.no_grad():
            model.init_weights(prefix=cls.optional_keys[0].rstrip("."))
    return model


def save(model, path: str | os.PathLike) -> None:
    """config.json (with the weights' dtype) and model.safetensors; a tied output head is stored once."""
    os.makedirs(path, exist_ok=True)
    model.config.dtype = model.dtype
    model.config.save_pretrained(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
