"""TrainConfig: the settings of train_melt.py (a Hydra structured config) and their checks.

Every bad value raises models.ConfigError, whose message is one line:
'<field>: <what was wrong>; allowed: <what is>'. resolve() runs before anything is trained.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from models.config import ConfigError

# The MELT runs of the results table: name -> (cache_update, phase 1?, alignment?, chunk-wise?).
VARIANTS = {
    "melt": ("gated", True, True, True),
    "melt_last": ("last", True, True, True),
    "melt_mean": ("mean", True, True, True),
    "melt_ema": ("ema", True, True, True),
    "melt_scalar": ("scalar", True, True, True),
    "melt_no_interpolation": ("gated", False, True, True),
    "melt_no_alignment": ("gated", True, False, True),
    "melt_no_chunkwise": ("gated", True, True, False),
}


# Teacher sets of the policies pipeline (pipeline=policies): name -> (the settings in which the
# teacher differs from the config's own, what it stands for). Each set trains its own teacher and
# standard model; its rows are every cache policy on that teacher.
TEACHERS = {
    "ouro": ({"model.num_hidden_layers": 2, "teacher.exit_loss": "mean"},
             "trained like Ouro: the loss at every loop exit, so every loop is a usable model; 2 layers"),
    "last_exit": ({"model.num_hidden_layers": 1, "teacher.exit_loss": "last"},
                  "train_melt.py's teacher: 1 layer, the loss at the last exit only"),
    "depth": ({"data": "products", "task.max_hops": 4, "task.blocks": 8, "model.num_hidden_layers": 1,
               "model.num_attention_heads": 2, "teacher.exit_loss": "mean", "teacher.steps": 1500,
               "policies.window": 4},
              "products of words in S3 (training/products.py), blocks of 1-4 elements, trained like Ouro (the loss "
              "at every exit); 1 layer, 2 heads: run once it composes at most two elements"),
    "text": ({"data": "text", "batch_size": 16, "model.num_hidden_layers": 2, "model.hidden_size": 128,
              "model.intermediate_size": 512, "model.num_attention_heads": 4, "teacher.exit_loss": "mean",
              "teacher.steps": 1000, "teacher.lr": 2e-3, "teacher.warmup": 100, "teacher.init_std": 0.02,
              "teacher.save_every": 100, "melt.chunk_size": 64, "melt.phase1_steps": 50, "melt.phase2_steps": 100,
              "melt.lr_pretrained": 1e-3, "melt.lr_gate": 1e-2, "eval.eval_size": 128, "policies.window": 64},
             "stdlib Python source, byte-level, trained like Ouro (the loss at every exit); 2 layers, d = 128"),
}
# What a pipeline trains and scores its models on (TrainConfig.data).
DATA = {
    "hops": "training/task.py: multi-hop lookups in a random permutation (the task settings)",
    "products": "training/products.py: products of words in S3, blocks of 1..task.max_hops elements",
    "text": "training/corpus.py: Python source of the interpreter's standard library, byte-level",
}
# The policies that are post-trained like MELT (distilled from the teacher), beside MELT itself.
POST_TRAINED = ("melt", "first_writes", "loopcoder")


@dataclass
class TaskSettings:
    num_symbols: int = 8      # bindings per sequence (a random permutation of this many symbols)
    chain: int = 3            # generated symbols per query block, each max_hops hops from the last
    blocks: int = 8           # query blocks per sequence (the last is evaluated)
    max_hops: int = 2         # hops of the evaluated block (earlier blocks draw 1..max_hops)


@dataclass
class TextSettings:
    """The text setting (data=text): windows of the stdlib corpus (training/corpus.py)."""
    seq_len: int = 256        # bytes per training window and per held-out window
    prompt_len: int = 128     # held-out scoring: bytes prefilled; the rest go through decode steps
    files: int = 0            # 0: every listed file; n: the first n of each split (the CI variant)


@dataclass
class ModelSettings:
    num_hidden_layers: int = 1   # one layer per loop: the 1-loop model can do one lookup, not two
    hidden_size: int = 64
    intermediate_size: int = 128
    num_attention_heads: int = 4
    loops: int = 4
    max_position_embeddings: int = 2048


@dataclass
class TeacherSettings:
    steps: int = 2000
    lr: float = 5e-3
    warmup: int = 50
    # N(0, init_std) init of the teacher's and the standard model's matrices. With the models'
    # default 0.02 (made for d = 2048) a 2-layer, 3-hop teacher kept its loss flat for 600 steps at
    # lr 1e-2, presumably near-zero attention scores; 0.125 (about 1/sqrt(d)) moved it within 200
    # at lr 3e-3.
    init_std: float = 0.125
    exit_loss: str = "last"       # last | mean: which loop exits the pretraining loss covers
    save_every: int = 0           # steps between saved training states (resumed by a rerun); 0: none


@dataclass
class MeltSettings:
    chunk_size: int = 16          # chunk C for training, and the MELT checkpoint's prefill chunk
    phase1_steps: int = 200       # interpolated transition, alpha 0 -> 1
    phase2_steps: int = 400       # attention-aligned distillation
    # The paper's 8e-6 / 5e-4 are for 1.4B parameters and 800 steps of 320K tokens; this model has
    # ~50K and 600 steps of ~1.8K tokens (not tried here). Tried (all with the default teacher):
    # 3e-3 / 3e-2 with 200 + 400 steps gave MELT accuracy 0.992 (teacher 1.000), 1e-3 / 1e-2 gave
    # 0.988, and 1e-3 / 1e-2 with 150 + 150 steps 0.871.
    lr_pretrained: float = 3e-3   # the LoopLM's weights
    lr_gate: float = 3e-2         # the latent gates
    align_weight: float = 0.1
    warmup: int = 10


@dataclass
class EvalSettings:
    eval_size: int = 256          # held-out sequences
    long_prompt_len: int = 1024   # prompt of the peak-memory generation


@dataclass
class PolicySettings:
    """The policies pipeline (pipeline=policies): every cache policy on each teacher set."""
    teachers: List[str] = field(default_factory=lambda: ["ouro", "last_exit"])   # names: TEACHERS
    # Teacher sets whose rows include the post-trained policies (POST_TRAINED); the others get the
    # zero-shot rows and the standard model only.
    post_train: List[str] = field(default_factory=lambda: ["ouro", "last_exit"])
    ring: int = 2             # ring: K slots per layer (loop t writes slot t mod K)
    anchor: int = 1           # anchor: A loops with a slot of their own ...
    anchor_ring: int = 1      # ... and K ring slots for the rest
    window: int = 8           # loopcoder: the local window W, below the task's sequence length
    drift_size: int = 64      # held-out prompts the K/V drift is measured on
    # Per teacher set, settings that replace the set's own (TEACHERS) and the config's, as nested
    # groups: {text: {teacher: {steps: 20}}} (policies.overrides.text.teacher.steps=20). The quick
    # presets shrink every set this way.
    overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    out_dir: str = "results/training"
    pipeline: str = "melt"        # melt: MELT and its ablations; policies: every cache policy (PolicySettings)
    data: str = "hops"            # what the models learn and are scored on: DATA
    seed: int = 0
    device: str = "cpu"
    threads: int = 1              # torch CPU threads; 1 is fastest for these tiny models on a shared CPU
    batch_size: int = 32
    log_every: int = 50
    reuse_teacher: bool = True    # a teacher checkpoint trained with the same settings is reused
    # MELT runs of the table (names: VARIANTS). The default runs the main one only, which keeps the
    # default pipeline well under 20 minutes on a 2-core CPU; preset=ablations runs all of them.
    variants: List[str] = field(default_factory=lambda: ["melt"])
    task: TaskSettings = field(default_factory=TaskSettings)
    text: TextSettings = field(default_factory=TextSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    melt: MeltSettings = field(default_factory=MeltSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    policies: PolicySettings = field(default_factory=PolicySettings)


def register() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def _positive(name: str, value, allow_zero: bool = False, prefix: str = "") -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(name, f"{prefix}got {value!r}", f"an integer >= {low}")


def _positive_float(name: str, value, prefix: str = "") -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ConfigError(name, f"{prefix}got {value!r}", "a number > 0")


def resolve(cfg: DictConfig | TrainConfig) -> TrainConfig:
    """Check every setting; return the TrainConfig object. Raises ConfigError on the first bad one.
    pipeline=policies: every teacher set's own config (teacher_config) is checked the same way."""
    import torch

    c = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg

    if c.device not in ("cpu", "cuda"):
        raise ConfigError("device", f"unknown value {c.device!r}", "cpu | cuda")
    if c.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda asked for, but this machine has no CUDA GPU", "cpu")
    unknown = [v for v in c.variants if v not in VARIANTS]
    if unknown:
        raise ConfigError("variants", f"unknown variant {unknown[0]!r}", " | ".join(VARIANTS))
    if c.pipeline not in ("melt", "policies"):
        raise ConfigError("pipeline", f"unknown value {c.pipeline!r}", "melt | policies")
    _check_values(c)
    p = c.policies
    for name, names in (("policies.teachers", p.teachers), ("policies.post_train", p.post_train),
                        ("policies.overrides", list(p.overrides))):
        unknown = [t for t in names if t not in TEACHERS]
        if unknown:
            raise ConfigError(name, f"unknown teacher set {unknown[0]!r}", " | ".join(TEACHERS))
    if c.pipeline == "policies":
        if not p.teachers:
            raise ConfigError("policies.teachers", "empty", f"a list of {' | '.join(TEACHERS)}")
        if [t for t in p.post_train if t not in p.teachers]:
            raise ConfigError("policies.post_train", f"{p.post_train} names a set not in policies.teachers "
                              f"{p.teachers}", "a subset of policies.teachers")
        for t in p.teachers:  # each set's own settings, checked like the config's
            tc = teacher_config(c, t)
            _check_values(tc, prefix=f"{t} teacher set: ")
            _check_sizes(tc, prefix=f"{t} teacher set: ")
            length = sequence_spec(tc).seq_len
            if tc.policies.window >= length:
                raise ConfigError("policies.window", f"{tc.policies.window} covers a whole sequence of the {t} teacher set "
                                  f"({length} tokens), so loopcoder would be per_loop",
                                  f"an integer in 1..{length - 1}")
    else:
        if c.data != "hops":
            raise ConfigError("data", f"{c.data!r} with pipeline=melt", "hops (the other data run with pipeline=policies)")
        _check_sizes(c)
    if os.path.exists(c.out_dir) and not os.path.isdir(c.out_dir):
        raise ConfigError("out_dir", f"{c.out_dir} is a file", "a folder (created if missing)")
    return c


def _check_values(c: TrainConfig, prefix: str = "") -> None:
    """The value checks of one (teacher set's) config; prefix names the set in the message."""
    def fail(name, problem, allowed):
        raise ConfigError(name, prefix + problem, allowed)

    _positive("seed", c.seed, allow_zero=True, prefix=prefix)
    for name in ("threads", "batch_size", "log_every"):
        _positive(name, getattr(c, name), prefix=prefix)
    for group in ("task", "text", "model", "teacher", "melt", "eval", "policies"):
        for f in dataclasses.fields(getattr(c, group)):
            value, name = getattr(getattr(c, group), f.name), f"{group}.{f.name}"
            if f.type in ("str", str) or group == "policies" and f.name in ("teachers", "post_train", "overrides"):
                continue
            if f.type in ("int", int):
                _positive(name, value, f.name in ("warmup", "phase1_steps", "phase2_steps", "files", "save_every"), prefix)
            elif f.name == "align_weight":
                if not isinstance(value, (int, float)) or value < 0:
                    fail(name, f"got {value!r}", "a number >= 0")
            else:
                _positive_float(name, value, prefix)
    if c.data not in DATA:
        fail("data", f"unknown value {c.data!r}", " | ".join(DATA))
    if c.teacher.exit_loss not in ("last", "mean"):
        fail("teacher.exit_loss", f"unknown value {c.teacher.exit_loss!r}", "last | mean")
    if c.task.num_symbols < 2:
        fail("task.num_symbols", f"got {c.task.num_symbols}", "an integer >= 2")
    if c.text.prompt_len >= c.text.seq_len:
        fail("text.prompt_len", f"{c.text.prompt_len} leaves nothing of a {c.text.seq_len}-byte window to score",
             f"an integer in 1..{c.text.seq_len - 1}")
    if c.model.hidden_size % c.model.num_attention_heads or (c.model.hidden_size // c.model.num_attention_heads) % 2:
        fail("model.num_attention_heads", f"{c.model.num_attention_heads} heads for hidden_size "
             f"{c.model.hidden_size}", "a divisor of hidden_size leaving an even head size")


def teacher_config(c: TrainConfig, name: str) -> TrainConfig:
    """The config of teacher set `name`: c with the set's settings (TEACHERS), then the config's
    own overrides for the set (policies.overrides[name])."""
    out = copy.deepcopy(c)
    settings = dict(TEACHERS[name][0])
    for group, values in c.policies.overrides.get(name, {}).items():
        for field_name, value in (values.items() if isinstance(values, dict) else [(None, values)]):
            settings[group if field_name is None else f"{group}.{field_name}"] = value
    for key, value in settings.items():
        group, _, field_name = key.rpartition(".")
        target = getattr(out, group) if group else out
        if not hasattr(target, field_name) or field_name == "policies":
            raise ConfigError(f"policies.overrides.{name}.{key}", "not a setting of train_melt.py",
                              "a field of training/config.py TrainConfig, e.g. teacher.steps")
        setattr(target, field_name, value)
    return out


def _check_sizes(c: TrainConfig, prefix: str = "") -> None:
    spec = sequence_spec(c)
    answer = spec.answer_len if c.data != "text" else 1
    if max(spec.seq_len, c.eval.long_prompt_len + answer) > c.model.max_position_embeddings:
        raise ConfigError("model.max_position_embeddings", f"{prefix}{c.model.max_position_embeddings} is shorter than "
                          f"a sequence ({spec.seq_len}) or the long prompt ({c.eval.long_prompt_len} + "
                          f"{answer})", f">= {max(spec.seq_len, c.eval.long_prompt_len + answer)}")


def task_spec(c: TrainConfig) -> "TaskSpec":
    """The task of the config's `task` settings (training.task.TaskSpec)."""
    from .task import TaskSpec

    return TaskSpec(**dataclasses.asdict(c.task))


def sequence_spec(c: TrainConfig):
    """The shape of the config's sequences: task_spec(c), products.ProductsSpec or corpus.TextSpec."""
    if c.data == "text":
        from .corpus import TextSpec

        return TextSpec(seq_len=c.text.seq_len, prompt_len=c.text.prompt_len)
    if c.data == "products":
        from .products import ProductsSpec

        return ProductsSpec(blocks=c.task.blocks, max_hops=c.task.max_hops)
    return task_spec(c)
