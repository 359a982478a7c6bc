"""Every shipped config composes and resolves; the config checks catch bad values."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from bench.config import BenchConfig, ConfigError, register, resolve

CONF = Path(__file__).resolve().parent.parent / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
CPU_ONLY = ("ci", "ci_policies")  # the memory gates `make test` runs: fixed sizes, CPU
# What an experiment needs from the command line (policy_quality scores a text through a checkpoint).
NEEDS = {"policy_quality": (f"text={CONF.parent / 'docs' / 'models.md'}",
                            f"checkpoint={CONF.parent / 'results' / 'reference' / 'training' / 'checkpoints' / 'teacher'}")}
LAUNCHERS = sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml"))

register()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_the_shipped_experiments_and_launchers_exist():
    assert set(EXPERIMENTS) >= {"default", "memory_vs_depth", "memory_vs_seq_len", "throughput"}
    assert set(LAUNCHERS) >= {"isolated", "slurm"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_each_of_its_points_resolves(experiment):
    extra = NEEDS.get(experiment, ())
    cfg = _compose(f"experiment={experiment}", *extra)
    assert cfg.name == experiment
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    assert {"model", "preset", "policy"} & set(params)
    # Each swept value resolves on this (CPU) machine; the measuring sweeps use the CPU size.
    for key, values in params.items():
        for value in str(values).split(","):
            point = resolve(_without_hydra(_compose(f"experiment={experiment}", *extra, f"{key}={value}")))
            assert point.device == "cpu"
            if experiment not in CPU_ONLY + ("paper_table2",):
                assert point.size == "small" and point.probe == "tracked"


def test_paper_table2_points_are_the_papers_models():
    points = [resolve(_without_hydra(_compose("experiment=paper_table2", f"preset={p}")))
              for p in ("melt-1.6b", "ouro-1.4b", "qwen3-1.7b")]
    assert [(p.model, p.size, p.loops) for p in points] == [
        ("melt", "ouro-1.4b", 4), ("ouro", "ouro-1.4b", 4), ("standard", "qwen3-1.7b", 1)]
    assert {(p.dtype, p.seq_len, p.probe) for p in points} == {("bfloat16", 32000, "fake")}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_launcher_composes(launcher):
    cfg = _compose(f"hydra/launcher={launcher}", "experiment=default")
    target = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)["_target_"]
    # the Slurm launchers are ours (hydra_plugins/meltbench_launcher.py), on submitit's
    assert target == ("hydra_plugins.meltbench_launcher.MeltbenchSlurmLauncher" if launcher.startswith("slurm")
                      else "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher")
    batch = cfg.hydra.sweeper.max_batch_size  # isolated: one point at a time
    assert batch == (1 if launcher == "isolated" else None)


def test_defaults_resolve_to_the_cpu_choices():
    point = resolve(_without_hydra(_compose()))
    assert (point.model, point.size, point.device, point.dtype, point.probe) == \
        ("melt", "small", "cpu", "float32", "tracked")


def _without_hydra(cfg):
    """The config as the task function gets it."""
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _point(**kw) -> BenchConfig:
    return resolve(BenchConfig(**{"size": "tiny", "seq_len": 32, "new_tokens": 4, **kw}))


def test_resolve_reports_the_point_as_it_runs():
    assert _point(model="standard", loops=8).loops == 1  # the standard model runs once
    assert _point(scenario="prefill").new_tokens == 0
    melt = _point(model="melt", cache_update="mean")
    assert (melt.cache_update, melt.init_latent, melt.kv_sharing) == ("mean", "input", None)
    # A model option is only passed to the models that have it (so sweeps across models work).
    ouro = _point(model="ouro", cache_update="mean", kv_sharing="last_loop")
    assert (ouro.cache_update, ouro.kv_sharing) == (None, "last_loop")


@pytest.mark.parametrize("kw, field", [
    (dict(loops=0), "loops"), (dict(seq_len=2000), "seq_len"), (dict(model="gpt"), "model"),
    (dict(size="huge"), "size"), (dict(scenario="train"), "scenario"), (dict(probe="x"), "probe"),
    (dict(probe="cuda"), "probe"), (dict(device="cuda"), "device"), (dict(dtype="int8"), "dtype"),
    (dict(batch=0), "batch"), (dict(cache_update="median"), "cache_update"),
    (dict(model="ouro", exit_step=9), "exit_step"), (dict(mem_limit_mib=0), "mem_limit_mib"),
])
def test_bad_values_name_field_and_allowed(kw, field):
    with pytest.raises(ConfigError) as e:
        _point(**kw)
    message = str(e.value)
    assert message.startswith(f"{field}: ") and "; allowed: " in message and "\n" not in message


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e not in CPU_ONLY])
def test_gpu_choices_of_every_experiment_fit_ouro_1_4b(experiment):
    """What a GPU machine would run (checked here without one): Ouro-1.4B sizes and lengths that
    the model's positions allow."""
    from models import make_config

    cfg = _compose(f"experiment={experiment}", "device=cuda")
    assert cfg.size == "ouro-1.4b"
    limit = make_config("ouro", size=cfg.size).max_position_embeddings
    seq_lens = [int(v) for v in str(cfg.hydra.sweeper.params.get("seq_len", cfg.seq_len)).split(",")]
    assert max(seq_lens) + cfg.new_tokens <= limit
