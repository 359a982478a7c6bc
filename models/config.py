"""One config class for all three models, size presets, and input validation.

The config is a transformers `PretrainedConfig`, so it saves/loads as `config.json` and reads Ouro's
own checkpoints: Ouro's keys (`total_ut_steps`, `early_exit_threshold`) are the stored names, with
`loops` and `exit_threshold` as aliases.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from .cache_policies import KV_SHARINGS  # the LoopLM's cache policies

MODEL_NAMES = ("standard", "ouro", "melt", "loopcoder")
# Peers: other libraries' models built from the same size presets, benchmarked beside ours
# (models/hf_llama.py). They run once (loops = 1) and take none of MODEL_OPTIONS.
PEER_NAMES = ("hf_llama",)
ALL_MODEL_NAMES = MODEL_NAMES + PEER_NAMES
CACHE_UPDATES = ("gated", "last", "mean", "ema", "scalar")
INIT_LATENTS = ("input", "zero")
EXIT_POLICIES = ("last", "threshold", "fixed")

# Options that only one model has; make_config refuses them for the others.
MODEL_OPTIONS = {
    "chunk_size": "melt", "cache_update": "melt", "init_latent": "melt", "ema_alpha": "melt",
    "kv_sharing": "ouro", "kv_ring": "ouro", "kv_anchor": "ouro", "kv_window": "loopcoder",
    "exit_policy": "ouro", "exit_threshold": "ouro", "exit_step": "ouro",
}

_OURO_COMMON = dict(
    hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
    head_dim=128, vocab_size=49152, max_position_embeddings=65536, loops=4,
)

# Size presets. `tiny` is for tests (GQA on purpose, to exercise it); `small` for CPU sweeps.
SIZES: dict[str, dict] = {
    "tiny": dict(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=1024, loops=4,
    ),
    "small": dict(
        num_hidden_layers=4, hidden_size=256, intermediate_size=704, num_attention_heads=8,
        num_key_value_heads=8, head_dim=32, vocab_size=4096, max_position_embeddings=8192, loops=4,
    ),
    "ouro-1.4b": dict(num_hidden_layers=24, **_OURO_COMMON),
    "ouro-2.6b": dict(num_hidden_layers=48, **_OURO_COMMON),
    # The standard LLM of comparable size (paper Table 2). QK-norm is left out.
    "qwen3-1.7b": dict(
        num_hidden_layers=28, hidden_size=2048, intermediate_size=6144, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        tie_word_embeddings=True, loops=1,
    ),
}


class ConfigError(ValueError):
    """Bad user input, reported as '<field>: <what was wrong>; allowed: <what is>'."""

    def __init__(self, field: str, problem: str, allowed: str | None = None):
        self.field = field
        msg = f"{field}: {problem}"
        super().__init__(msg + (f"; allowed: {allowed}" if allowed else ""))


class LoopConfig(PretrainedConfig):
    model_type = "meltbench"
    attribute_map = {"loops": "total_ut_steps", "exit_threshold": "early_exit_threshold"}

    def __init__(
        self,
        arch: str = "ouro",
        vocab_size: int = 49152,
        hidden_size: int = 2048,
        intermediate_size: int = 5632,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 65536,
        rope_theta: float = 1e6,
        rms_norm_eps: float = 1e-6,
        total_ut_steps: int = 4,
        # LoopLM (Ouro) options
        kv_sharing: str = "per_loop",
        kv_ring: int = 1,
        kv_anchor: int = 1,
        # LoopCoder's option
        kv_window: int = 64,
        exit_policy: str = "last",
        early_exit_threshold: float = 1.0,
        exit_step: int | None = None,
        # MELT options
        chunk_size: int = 500,
        cache_update: str = "gated",
        init_latent: str = "input",
        ema_alpha: float = 0.2,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.arch = arch
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        # Ouro's config may carry the newer `rope_parameters` dict instead of `rope_theta`.
        rope_parameters = kwargs.pop("rope_parameters", None) or {}
        self.rope_theta = float(rope_parameters.get("rope_theta", rope_theta))
        self.rms_norm_eps = rms_norm_eps
        self.total_ut_steps = total_ut_steps
        self.kv_sharing = kv_sharing
        self.kv_ring = kv_ring
        self.kv_anchor = kv_anchor
        self.kv_window = kv_window
        self.exit_policy = exit_policy
        self.early_exit_threshold = early_exit_threshold
        self.exit_step = exit_step
        self.chunk_size = chunk_size
        self.cache_update = cache_update
        self.init_latent = init_latent
        self.ema_alpha = ema_alpha
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        if self.head_dim is None and self.num_attention_heads and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def validate(self) -> "LoopConfig":
        """Raise ConfigError naming the first bad field; return self when all is well."""
        _choice("arch", self.arch, ALL_MODEL_NAMES)
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads",
                      "max_position_embeddings", "loops", "chunk_size", "kv_ring", "kv_anchor", "kv_window"):
            _positive_int(field, getattr(self, field))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("num_attention_heads", f"{self.num_attention_heads} does not divide "
                              f"hidden_size {self.hidden_size}", "a divisor of hidden_size")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
                              f"num_attention_heads {self.num_attention_heads}",
                              "a divisor of num_attention_heads")
        _positive_int("head_dim", self.head_dim)
        _choice("kv_sharing", self.kv_sharing, KV_SHARINGS)
        _choice("exit_policy", self.exit_policy, EXIT_POLICIES)
        _choice("cache_update", self.cache_update, CACHE_UPDATES)
        _choice("init_latent", self.init_latent, INIT_LATENTS)
        if not 0.0 < float(self.exit_threshold) <= 1.0:
            raise ConfigError("exit_threshold", f"got {self.exit_threshold}", "a number in (0, 1]")
        if not 0.0 <= float(self.ema_alpha) <= 1.0:
            raise ConfigError("ema_alpha", f"got {self.ema_alpha}", "a number in [0, 1]")
        if self.exit_step is not None:
            _positive_int("exit_step", self.exit_step)
            if self.exit_step > self.loops:
                raise ConfigError("exit_step", f"{self.exit_step} is more than loops={self.loops}",
                                  f"1..{self.loops}")
        if self.exit_policy == "fixed" and self.exit_step is None:
            raise ConfigError("exit_step", "exit_policy=fixed needs exit_step", f"1..{self.loops}")
        return self


def _positive_int(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(field, f"got {value!r}", "an integer >= 1")


def _choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(field, f"unknown value {value!r}", " | ".join(allowed))


def make_config(name: str, size: str = "tiny", loops: int | None = None, **overrides) -> LoopConfig:
    """Validated config for model `name` at preset `size`; overrides take any LoopConfig field.

    The standard model accepts `loops` (so sweeps can pass it uniformly) but always runs once.
    """
    _choice("model", name, ALL_MODEL_NAMES)
    _choice("size", size, tuple(SIZES))
    known = set(LoopConfig().to_dict()) | set(LoopConfig.attribute_map)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(unknown[0], "unknown model option",
                          "fields of models.LoopConfig, e.g. chunk_size, cache_update, kv_sharing")
    for field in overrides:
        if MODEL_OPTIONS.get(field, name) != name:
            raise ConfigError(field, f"not an option of {name}", f"an option of {MODEL_OPTIONS[field]}")
    fields = {**SIZES[size], **overrides}
    if "head_dim" not in overrides and {"hidden_size", "num_attention_heads"} & set(overrides):
        fields.pop("head_dim")  # re-derived as hidden_size // num_attention_heads
    if loops is not None:
        _positive_int("loops", loops)
        fields["loops"] = loops
    if name == "standard" or name in PEER_NAMES:
        fields["loops"] = 1
    return LoopConfig(arch=name, **fields).validate()
