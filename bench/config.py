"""The benchmark's configuration: one dataclass registered in Hydra's ConfigStore, and its checks.

Hydra composes conf/ on top of `BenchConfig` (types are enforced by OmegaConf while composing);
`resolve()` then checks the values against each other and against this machine, resolves the
`auto` choices and returns the `BenchConfig` a sweep point runs with. Every bad value raises
`ConfigError`, whose message is the one line the command line prints.

May import: models.
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

SCENARIOS = ("prefill", "decode", "generate", "score")
PREFILLS = ("chunked", "one_pass")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
PROFILES = ("none", "timeline", "snapshot")  # bench/measure/profiles.py
# Launchers whose points run on other machines (Slurm nodes with the GPU they ask for): `auto`
# device values there mean the GPU's, whatever the machine that submits the sweep has.
REMOTE_LAUNCHERS = ("slurm", "submitit_slurm")
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
    model: str = "melt"  # standard | ouro | melt | loopcoder | hf_llama (the peer: transformers' Llama)
    # Size preset of models.SIZES; by default `small` on CPU and Ouro-1.4B on a GPU.
    size: str = "${on_device:${device},small,ouro-1.4b}"
    loops: Optional[int] = None  # None: the model's own (4 for the size presets; a checkpoint's total_ut_steps)
    seq_len: int = 1024  # prompt tokens (the cache holds this many before decoding)
    batch: int = 1
    scenario: str = "generate"  # prefill | decode | generate | score (a text's likelihood: `text`)
    new_tokens: int = 32  # decode steps (decode and generate)
    # How and where
    probe: str = "auto"  # auto (cuda on a GPU, else tracked) | cuda | tracked | fake (estimate)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bfloat16 on a GPU, float32 on CPU) | float32 | bfloat16
    repeats: int = 3  # timed repeats; speed columns are medians over them (0: memory only)
    warmup: int = 1  # untimed full runs of the scenario before measuring
    seed: int = 0
    # The prefill schedule of every model: `chunked` (chunks of chunk_size tokens, every loop of a
    # chunk before the next) or `one_pass` (the whole prompt per loop; MELT always chunks: the
    # chunks are its method). Memory comparisons are fair at equal chunking, the default.
    prefill: str = "chunked"
    chunk_size: Optional[int] = None  # None: the model's (500, the MELT paper's; a MELT checkpoint's own)
    # Model options (None: the model's default); see MODEL_OPTIONS for which model takes which.
    cache_update: Optional[str] = None
    init_latent: Optional[str] = None
    kv_sharing: Optional[str] = None  # the LoopLM's cache policy (models/cache_policies.py)
    kv_ring: Optional[int] = None     # its ring's slots per layer (ring, anchor)
    kv_anchor: Optional[int] = None   # its anchor slots per layer (anchor)
    kv_window: Optional[int] = None   # LoopCoder's local attention window W
    exit_policy: Optional[str] = None
    exit_threshold: Optional[float] = None
    exit_step: Optional[int] = None
    ema_alpha: Optional[float] = None  # MELT, cache_update=ema: the fraction of h_prev kept
    # A device memory cap in MiB: allocations past it raise an out-of-memory error, as a smaller
    # device would. The tracked and fake probes count live tensor bytes against it; on CUDA it sets
    # the caching allocator's memory fraction, which counts reserved bytes (allocated + cached).
    mem_limit_mib: Optional[float] = None
    # A checkpoint: a folder (config.json + model.safetensors or its shards, e.g. from
    # train_melt.py) or a Hugging Face hub id (e.g. ByteDance/Ouro-1.4B, from the local cache or
    # downloaded). Weights, dimensions, loops (total_ut_steps), dtype and model options come from
    # it; `model`, `loops`, `dtype` and model options set here apply on top. `size` then only
    # labels the row.
    checkpoint: Optional[str] = None
    # scenario=score: a UTF-8 text file, tokenized with the checkpoint's tokenizer; its first
    # seq_len tokens are prefilled, the next new_tokens scored one at a time through the decode
    # step (teacher forcing), so a cache policy's decode-time rules are what is scored.
    text: Optional[str] = None
    # What a point records beyond its row (bench/measure/profiles.py): none | timeline (live bytes per
    # category over the memory pass, drawn in the report) | snapshot (CUDA: PyTorch's memory
    # history of the memory pass, for pytorch.org/memory_viz).
    profile: str = "none"
    # Sweep name: a multirun writes to results/<name>/ (set by each conf/experiment/*.yaml).
    name: str = "adhoc"
    # Decode with the compiled step: each layer function under torch.compile once, for every layer
    # and loop, and on a GPU the whole step one CUDA graph (models/compiled.py). None: auto, on for
    # CUDA and off for CPU. The memory pass always runs eager; hf_llama never compiles.
    compile: Optional[bool] = None
    # torch.compile's backend with compile=true: inductor (kernels), or
    # aot_eager / eager, which check that every layer function is captured whole without generating
    # kernels (on a GPU the step is still one CUDA graph).
    compile_backend: str = "inductor"
    # The capacity search (conf/experiment/capacity.yaml): the largest batch whose run fits
    # budget_gb (decimal GB, 1e9 bytes; default: the GPU's free memory; needed on CPU, where the
    # tracked probe enforces it), then the decode throughput at that batch.
    capacity: bool = False
    budget_gb: Optional[float] = None

    def model_options(self) -> dict:
        """The options set for this point's model, as keyword arguments for models.build_model."""
        return {k: getattr(self, k) for k, owner in MODEL_OPTIONS.items()
                if self.model == owner and getattr(self, k) is not None}


def runs_on_gpu(device: str, launcher: str | None = None) -> bool:
    """Whether a point of this `device` setting runs on a GPU: cuda does, cpu does not, and auto
    does where the point runs: on the GPU nodes of a remote launcher, else on this machine if it
    has one."""
    if device != "auto":
        return device == "cuda"
    return launcher in REMOTE_LAUNCHERS or torch.cuda.is_available()


def launcher_of(root) -> str | None:
    """The hydra/launcher choice of a composed config that has its `hydra` node, else None."""
    choices = OmegaConf.select(root, "hydra.runtime.choices", default=None) if root is not None else None
    return (choices or {}).get("hydra/launcher")


def register() -> None:
    """Put the schema in Hydra's ConfigStore (conf/config.yaml builds on it) and add the resolvers:
    ${on_device:${device},<on CPU>,<on a GPU>} picks a value by where the point runs (it reads the
    launcher when the config has Hydra's node, so a Slurm sweep submitted from a CPU login node
    gets the GPU values), and ${sweep_batch:...} gives the isolated launcher's sweeps batches of
    one point (submitit's local executor would start a whole batch at once)."""
    ConfigStore.instance().store(name="bench_schema", node=BenchConfig)
    if not OmegaConf.has_resolver("on_device"):
        OmegaConf.register_new_resolver(
            "on_device", lambda device, cpu, gpu, *, _root_: gpu if runs_on_gpu(str(device), launcher_of(_root_)) else cpu)
        OmegaConf.register_new_resolver(
            "sweep_batch", lambda launcher: 1 if launcher == "isolated" else None)


def resolve(cfg: DictConfig | BenchConfig, launcher: str | None = None) -> BenchConfig:
    """Check a composed config and return it with every `auto` replaced by what will be used.
    `launcher`: the sweep's hydra/launcher; under a remote one (slurm) the point is checked for the
    GPU node it will run on, not for this machine. Raises ConfigError on the first bad value;
    allocates nothing."""
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
    _choice("prefill", c.prefill, PREFILLS)
    _choice("compile_backend", c.compile_backend, COMPILE_BACKENDS)
    _choice("profile", c.profile, PROFILES)
    for field, low in (("loops", 1), ("seq_len", 1), ("batch", 1), ("new_tokens", 1),
                       ("repeats", 0), ("warmup", 0), ("chunk_size", 1)):
        value = getattr(c, field)
        if value is not None and value < low:
            raise _bad(field, f"got {value}", f"an integer >= {low}")
    if c.mem_limit_mib is not None and c.mem_limit_mib <= 0:
        raise _bad("mem_limit_mib", f"got {c.mem_limit_mib}", "a positive number of MiB")
    _check_speed_settings(c)

    remote = launcher in REMOTE_LAUNCHERS
    if c.device == "cuda" and not remote and not torch.cuda.is_available():
        raise _bad("device", "cuda asked for, but this machine has no CUDA GPU", "auto | cpu")
    device = "cuda" if runs_on_gpu(c.device, launcher) else "cpu"
    if c.probe == "cuda" and device != "cuda":
        raise _bad("probe", f"cuda needs device=cuda (device is {device})", "auto | tracked | fake")
    if c.dtype == "bfloat16" and device == "cuda" and not remote and not torch.cuda.is_bf16_supported():
        raise _bad("dtype", f"bfloat16 is not supported by {torch.cuda.get_device_name()}",
                   "auto | float32")
    probe = c.probe if c.probe != "auto" else ("cuda" if device == "cuda" else "tracked")
    if c.scenario in ("decode", "generate") and c.repeats > 0 and probe != "fake" and c.new_tokens < 2:
        raise _bad("new_tokens", f"{c.new_tokens} leaves no decode step to time (each step is timed "
                   "from the end of the one before, so the first is not)", "an integer >= 2, or repeats=0")

    model_cfg, stored_dtype = model_config(c)
    dtype = c.dtype if c.dtype != "auto" else (
        str(stored_dtype).removeprefix("torch.") if stored_dtype in (torch.float32, torch.bfloat16)
        else "bfloat16" if device == "cuda" else "float32")
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
    options["chunk_size"] = c.chunk_size or model_cfg.chunk_size  # every model's prefill chunk
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
    # generate's stopping checks read tensor values (a fake tensor has none); the prefill is the
    # model's forward into its DynamicCache, which runs on fake tensors as on real ones (the same
    # bytes as the tracked probe; tests/test_bench_probes.py).
    if c.model in PEER_NAMES and c.probe == "fake" and c.scenario != "prefill":
        raise _bad("probe", f"fake cannot run {c.model}'s {c.scenario} (transformers' generate reads "
                   "tensor values to decide when to stop)", "auto | tracked | cuda, or scenario=prefill")
    if c.model in PEER_NAMES and c.checkpoint is not None:
        raise _bad("checkpoint", f"{c.model} is built with random weights from the size preset",
                   "unset (checkpoints are for standard | ouro | melt)")
    if c.scenario == "score":
        _check_score_settings(c)
    elif c.text is not None:
        raise _bad("text", "set without scenario=score", "unset, or scenario=score (experiment=policy_quality)")
    if c.budget_gb is not None and c.budget_gb <= 0:
        raise _bad("budget_gb", f"got {c.budget_gb}", "a positive number of GB (1e9 bytes)")
    if c.budget_gb is not None and not c.capacity:
        raise _bad("budget_gb", "set without capacity=true", "with capacity=true (or use mem_limit_mib)")
    if c.capacity and c.scenario == "prefill":
        raise _bad("scenario", "prefill has no decode throughput to report at capacity", "decode | generate")
    if c.capacity and c.mem_limit_mib is not None:
        raise _bad("mem_limit_mib", "the capacity search sets the limit itself", "unset; use budget_gb")


def _check_score_settings(c: BenchConfig) -> None:
    """scenario=score: a text and a checkpoint (whose tokenizer reads it), one sequence, real tensors."""
    from pathlib import Path

    if c.text is None:
        raise _bad("text", "scenario=score needs a text to score", "a UTF-8 text file, e.g. text=docs/models.md")
    if not Path(c.text).is_file():
        raise _bad("text", f"{c.text}: no such file", "a UTF-8 text file")
    if c.checkpoint is None:
        raise _bad("checkpoint", "scenario=score needs a checkpoint (its tokenizer reads the text)",
                   "a checkpoint folder with a tokenizer, or a Hugging Face hub id")
    if c.model in PEER_NAMES:
        raise _bad("model", f"{c.model} has no decode step to score through", "standard | ouro | melt | loopcoder")
    if c.probe == "fake":
        raise _bad("probe", "fake tensors hold no values to score", "auto | tracked | cuda")
    if c.batch != 1:
        raise _bad("batch", f"{c.batch}: a text is one sequence", "1")
    if c.capacity:
        raise _bad("capacity", "a capacity search times decoding, not scoring", "false")


def model_config(c: BenchConfig):
    """(the models.LoopConfig a point builds: its size preset with its loops and options, or its
    checkpoint's config with those on top; the dtype the checkpoint stores, or None)."""
    try:
        if c.checkpoint is None:
            return make_config(c.model, size=c.size, loops=c.loops, **c.model_options()), None
        from models.checkpoints import locate, read_config

        return read_config(locate(c.checkpoint, weights=False), c.model, loops=c.loops, **c.model_options())
    except ValueError as e:  # the models package names the field and what is allowed
        raise ConfigError(str(e)) from None


def _choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise _bad(field, f"unknown value {value!r}", " | ".join(allowed))
