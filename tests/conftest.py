import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Test files that take longest, in that order: run first, so that with a worker per core (make test:
# pytest-xdist, --dist loadfile) the short ones fill in around them instead of one long file
# running alone at the end. Every other file keeps its place after these.
LONGEST_FIRST = ["gate/test_ci_ceilings.py", "test_docs.py", "gate/test_policy_ceilings.py", "sweep/test_cli.py", "models/test_runtime.py",
                 "measure/test_scored_text.py", "training/test_design_quality.py", "training/test_training.py",
                 "models/test_models.py", "models/test_cache_policies.py"]


def pytest_configure(config):
    """Under pytest-xdist a worker per core: one torch thread each, and for the processes they start,
    so that two workers never fight over the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    tests = Path(__file__).resolve().parent
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).relative_to(tests).as_posix(), len(rank)))


@pytest.fixture
def run_bench():
    """Run `python run_bench.py ARGS...` from the repository root; returns the CompletedProcess.
    Tests point hydra.run.dir / hydra.sweep.dir at a temporary folder."""

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "run_bench.py"), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    return run


def save_random_looplm(folder: Path, config) -> Path:
    """A LoopLM of `config` with a larger random init (so that loops and gates change the logits
    visibly), saved in the Hugging Face layout to `folder`."""
    import torch

    from models import build_from_config

    torch.manual_seed(0)
    teacher = build_from_config(config)
    with torch.no_grad():
        teacher.init_weights(std=0.2)
    teacher.save_pretrained(folder)
    return folder


# The keys of Ouro's released config.json (Ouro-1.4B: 24 layers; here the tiny size's shapes).
OURO_KEYS = {
    "architectures": ["OuroForCausalLM"], "model_type": "ouro", "auto_map": {
        "AutoConfig": "configuration_ouro.OuroConfig", "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"},
    "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None,
    "hidden_act": "silu", "initializer_range": 0.02, "max_window_layers": 28, "rope_scaling": None,
    "sliding_window": None, "use_sliding_window": False, "use_cache": True, "torch_dtype": "float32",
    "transformers_version": "4.55.0", "early_exit_threshold": 1.0, "total_ut_steps": 3,
}


def save_ouro_checkpoint(folder: Path, seed: int = 0, **changes):
    """A tiny LoopLM saved the way Ouro's checkpoints are: Ouro's config keys, model.safetensors."""
    import torch

    from models import build_model

    torch.manual_seed(seed)
    model = build_model("ouro", "tiny", loops=3)
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    for key in ("arch", "dtype", "chunk_size", "cache_update", "init_latent", "ema_alpha", "kv_sharing",
                "exit_policy", "exit_step"):
        config.pop(key, None)
    config.update(OURO_KEYS, layer_types=["full_attention"] * model.config.num_hidden_layers)
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return model


def compose_train(*overrides: str):
    """train_melt.py's resolved settings for these overrides, as its command line composes them."""
    from hydra import compose, initialize_config_dir

    from training import config as train_config

    train_config.register()
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "train"), version_base="1.3"):
        return train_config.resolve(compose("config", overrides=list(overrides)))
