"""The benchmark's configuration: one dataclass registered in Hydra's ConfigStore, and its checks.

Hydra composes conf/ on top of `BenchConfig` (types are enforced by OmegaConf while composing);
`resolve()` then checks the values against each other and against this machine, resolves the
`auto` choices and returns the `BenchConfig` a sweep point runs with. Every bad value raises
`ConfigError`, whose message is the one line the command line prints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

# MODEL_OPTIONS: option -> the one model that has it. In a sweep across models an option goes only
# to the model that has it; the others leave its column empty.
from models import ALL_MODEL_NAMES, MODEL_OPTIONS, PEER_NAMES, SIZES, make_config

SCENARIOS = ("prefill", "decode", "generate")
PROBES = ("auto", "cuda", "tracked", "fake")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")

class ConfigError(ValueError):
    """A bad setting; the message reads '<field>: <what is wrong>; allowed: <what is>', the format
    the models package uses too."""


def _bad(field: str, problem: str, allowed: str) -> ConfigError:
    return ConfigError(f"{field}: {problem}; allowed: {allowed}")


@dataclass
class BenchConfig:
    # What to measure
    model: str = "melt"  # standard | ouro | melt | hf_llama (the peer: transformers' Llama)
    # Size preset of models.SIZES; by default `small` on CPU and Ouro-1.4B on a GPU.
    size: str = "${on_device:${device},small,ouro-1.4b}"
    loops: int = 4
    seq_len: int = 1024  # prompt tokens (the cache holds this many before decoding)
    batch: int = 1
    scenario: str = "generate"  # prefill | decode | generate
    new_tokens: int = 32  # decode steps (decode and generate)
    # How and where
    probe: str = "auto"  # auto (cuda on a GPU, else tracked) | cuda | tracked | fake (estimate)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bfloat16 on a GPU, float32 on CPU) | float32 | bfloat16
    repeats: int = 3  # timed repeats; speed columns are medians over them (0: memory only)
    warmup: int = 1  # untimed full runs of the scenario before measuring
    seed: int = 0
    # Model options (None: the model's default); see MODEL_OPTIONS for which model takes which.
    chunk_size: Optional[int] = None
    cache_update: Optional[str] = None
    init_latent: Optional[str] = None
    kv_sharing: Optional[str] = None
    exit_policy: Optional[str] = None
    exit_threshold: Optional[float] = None
    exit_step: Optional[int] = None
    ema_alpha: Optional[float] = None  # MELT, cache_update=ema: the fraction of h_prev kept
    # A device memory cap in MiB: allocations past it raise an out-of-memory error, as a smaller
    # device would (the tracked probe checks live bytes; on CUDA it sets the allocator's fraction).
    mem_limit_mib: Optional[float] = None
    # A checkpoint folder (config.json + model.safetensors, e.g. from train_melt.py): weights,
    # dimensions and model options come from it; `model`, `loops` and model options set here apply
    # on top. `size` then only labels the row.
    checkpoint: Optional[str] = None
    # Sweep name: a multirun writes to results/<name>/ (set by each conf/experiment/*.yaml).
    name: str = "adhoc"
    # Decode with the step compiled whole by torch.compile (CUDA graphs on a GPU). None: auto, on
    # for CUDA and off for CPU. The memory pass always runs eager; hf_llama never compiles.
    compile: Optional[bool] = None
    # The capacity search (conf/experiment/capacity.yaml): the largest batch whose run fits
    # budget_gb (decimal GB, 1e9 bytes; default: the GPU's free memory; needed on CPU, where the
    # tracked probe enforces it), then the decode throughput at that batch.
    capacity: bool = False
    budget_gb: Optional[float] = None

    def model_options(self) -> dict:
        """The options set for this point's model, as keyword arguments for models.build_model."""
        return {k: getattr(self, k) for k, owner in MODEL_OPTIONS.items()
                if self.model == owner and getattr(self, k) is not None}


def cuda_wanted(device: str) -> bool:
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def register() -> None:
    """Put the schema in Hydra's ConfigStore (conf/config.yaml builds on it) and add the resolver
    that lets configs pick a value by device: ${on_device:${device},<on CPU>,<on a GPU>}, and
    the one giving the isolated launcher's sweeps batches of one point (submitit's local executor
    would start a whole batch at once)."""
    ConfigStore.instance().store(name="bench_schema", node=BenchConfig)
    if not OmegaConf.has_resolver("on_device"):
        OmegaConf.register_new_resolver(
            "on_device", lambda device, cpu, gpu: gpu if cuda_wanted(str(device)) else cpu)
        OmegaConf.register_new_resolver(
            "sweep_batch", lambda launcher: 1 if launcher == "isolated" else None)


def resolve(cfg: DictConfig | BenchConfig) -> BenchConfig:
    """Check a composed config and return it with every `auto` replaced by what will be used.
    Raises ConfigError on the first bad value; allocates nothing."""
    if isinstance(cfg, DictConfig):
        unknown = sorted(set(cfg) - set(BenchConfig.__dataclass_fields__))  # e.g. from +key=value
        if unknown:
            raise _bad(unknown[0], "not a setting of run_bench.py",
                       ", ".join(BenchConfig.__dataclass_fields__))
    c = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg
    _choice("model", c.model, ALL_MODEL_NAMES)
    _choice("size", c.size, tuple(SIZES))
    _choice("scenario", c.scenario, SCENARIOS)
    _choice("device", c.device, DEVICES)
    _choice("dtype", c.dtype, DTYPES)
    _choice("probe", c.probe, PROBES)
    for field, low in (("loops", 1), ("seq_len", 1), ("batch", 1), ("new_tokens", 1),
                       ("repeats", 0), ("warmup", 0)):
        if getattr(c, field) < low:
            raise _bad(field, f"got {getattr(c, field)}", f"an integer >= {low}")
    if c.mem_limit_mib is not None and c.mem_limit_mib <= 0:
        raise _bad("mem_limit_mib", f"got {c.mem_limit_mib}", "a positive number of MiB")
    _check_speed_settings(c)

    if c.device == "cuda" and not torch.cuda.is_available():
        raise _bad("device", "cuda asked for, but this machine has no CUDA GPU", "auto | cpu")
    device = "cuda" if cuda_wanted(c.device) else "cpu"
    if c.probe == "cuda" and device != "cuda":
        raise _bad("probe", f"cuda needs device=cuda (device is {device})", "auto | tracked | fake")
    if c.dtype == "bfloat16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise _bad("dtype", f"bfloat16 is not supported by {torch.cuda.get_device_name()}",
                   "auto | float32")
    dtype = c.dtype if c.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    probe = c.probe if c.probe != "auto" else ("cuda" if device == "cuda" else "tracked")

    model_cfg = model_config(c)
    needed = c.seq_len + (c.new_tokens if c.scenario != "prefill" else 0)
    if needed > model_cfg.max_position_embeddings:
        limit = model_cfg.max_position_embeddings
        what = "seq_len" if c.scenario == "prefill" else "seq_len + new_tokens"
        source = f"checkpoint {c.checkpoint}" if c.checkpoint else f"size {c.size}"
        raise _bad("seq_len", f"{what} = {needed} is past {source}'s "
                   f"max_position_embeddings {limit}", f"seq_len <= {limit - needed + c.seq_len}")
    # The point as it will run: `standard` runs once whatever loops asks, a prefill decodes nothing,
    # and the options show the model's values (empty for options the model does not have).
    options = {k: getattr(model_cfg, k) if c.model == owner else None
               for k, owner in MODEL_OPTIONS.items()}
    if c.capacity and c.budget_gb is None and device != "cuda":
        raise _bad("budget_gb", "the capacity search on a CPU needs a budget (there is no free device "
                   "memory to default to)", "a positive number of GB, e.g. budget_gb=0.25")
    # auto: compiled decode on CUDA; the hf_llama peer runs transformers' eager generate
    compile_step = (device == "cuda" if c.compile is None else c.compile) and c.model not in PEER_NAMES
    return dataclasses.replace(c, device=device, dtype=dtype, probe=probe, loops=model_cfg.loops,
                               new_tokens=0 if c.scenario == "prefill" else c.new_tokens,
                               compile=compile_step, **options)


def _check_speed_settings(c: BenchConfig) -> None:
    """Checks of the speed settings (compile, capacity, budget_gb) and of what the hf_llama peer
    cannot do."""
    if c.compile and c.model in PEER_NAMES:
        raise _bad("compile", f"{c.model} runs transformers' eager generate", "false or unset")
    if c.model in PEER_NAMES and c.probe == "fake":  # generate's stopping checks read tensor values
        raise _bad("probe", f"fake cannot run {c.model} (transformers' generate reads tensor values "
                   "to decide when to stop)", "auto | tracked | cuda")
    if c.model in PEER_NAMES and c.checkpoint is not None:
        raise _bad("checkpoint", f"{c.model} is built with random weights from the size preset",
                   "unset (checkpoints are for standard | ouro | melt)")
    if c.budget_gb is not None and c.budget_gb <= 0:
        raise _bad("budget_gb", f"got {c.budget_gb}", "a positive number of GB (1e9 bytes)")
    if c.budget_gb is not None and not c.capacity:
        raise _bad("budget_gb", "set without capacity=true", "with capacity=true (or use mem_limit_mib)")
    if c.capacity and c.scenario == "prefill":
        raise _bad("scenario", "prefill has no decode throughput to report at capacity", "decode | generate")
    if c.capacity and c.mem_limit_mib is not None:
        raise _bad("mem_limit_mib", "the capacity search sets the limit itself", "unset; use budget_gb")


def model_config(c: BenchConfig):
    """The models.LoopConfig a point builds: its size preset with its loops and options, or its
    checkpoint's config with those on top."""
    try:
        model_cfg = make_config(c.model, size=c.size, loops=c.loops, **c.model_options())
    except ValueError as e:  # the models package names the field and what is allowed
        raise ConfigError(str(e)) from None
    return model_cfg if c.checkpoint is None else _checkpoint_config(c)


def _checkpoint_config(c: BenchConfig):
    """The model config a checkpoint folder gives, with this point's loops and explicitly set model
    options on top (so a row shows the checkpoint's chunk_size, cache_update, ...). Refuses a
    folder without a readable config.json before anything is built."""
    import json
    from pathlib import Path

    from models import LoopConfig

    path = Path(c.checkpoint)
    allowed = "a folder written by save_pretrained (config.json + model.safetensors)"
    if not (path / "config.json").is_file():
        raise _bad("checkpoint", f"{c.checkpoint} has no config.json", allowed)
    try:
        fields = json.loads((path / "config.json").read_text())
        for key in ("model_type", "architectures", "auto_map", "transformers_version", "arch"):
            fields.pop(key, None)  # as CausalLM.from_pretrained does
        if fields.get("rope_scaling", 0) is None:
            fields.pop("rope_scaling")
        model_cfg = LoopConfig(arch=c.model, **{**fields, **c.model_options()})
        model_cfg.loops = 1 if c.model == "standard" else c.loops
        return model_cfg.validate()
    except ValueError as e:  # bad JSON, or a field the models refuse (named in the message)
        raise _bad("checkpoint", f"{path / 'config.json'}: {e}", allowed) from None


def _choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise _bad(field, f"unknown value {value!r}", " | ".join(allowed))

