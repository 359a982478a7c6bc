"""Real checkpoints as users download them (models/checkpoints.py): Ouro's config.json with every
kind of value it holds, hub ids from the local Hugging Face cache in offline mode, sharded weights,
the stored dtype and loop count, and a tied head that is stored anyway. Every case either loads
the model exactly or is refused with one line naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.config import BenchConfig
from bench.config import ConfigError as BenchConfigError
from bench.config import resolve
from bench.measure.point import measure
from models import ConfigError, MeltLM, OuroLM, StandardLM, build_model
from models.checkpoints import INDEX_NAME, WEIGHTS_NAME, locate

from conftest import save_ouro_checkpoint


def _same_logits(a, b):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        torch.testing.assert_close(a(ids), b(ids), rtol=0, atol=0)


def test_an_ouro_config_loads_exactly(tmp_path):
    saved = save_ouro_checkpoint(tmp_path)
    loaded = OuroLM.from_pretrained(tmp_path)
    assert loaded.config.loops == 3 and loaded.config.exit_policy == "last" and loaded.dtype == torch.float32
    _same_logits(loaded, saved)
    melt = MeltLM.from_pretrained(tmp_path)  # zero-shot MELT: the LoopLM's weights, fresh gates
    assert torch.equal(melt.model.layers[0].mlp.up_proj.weight, saved.model.layers[0].mlp.up_proj.weight)
    assert StandardLM.from_pretrained(tmp_path).config.loops == 1


def test_nulls_mean_the_default(tmp_path):
    """Ouro's own config class writes early_exit_threshold: null."""
    save_ouro_checkpoint(tmp_path, early_exit_threshold=None, rope_scaling=None, sliding_window=None)
    assert OuroLM.from_pretrained(tmp_path).config.exit_policy == "last"


def test_the_stored_dtype_and_loop_count_are_the_defaults(tmp_path):
    saved = save_ouro_checkpoint(tmp_path, torch_dtype="bfloat16", total_ut_steps=2)
    loaded = OuroLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16 and loaded.config.loops == 2
    assert OuroLM.from_pretrained(tmp_path, loops=4, dtype=torch.float32).config.loops == 4
    point = resolve(BenchConfig(size="tiny", model="ouro", checkpoint=str(tmp_path), seq_len=32, new_tokens=2))
    assert (point.dtype, point.loops) == ("bfloat16", 2)
    point = resolve(BenchConfig(size="tiny", model="ouro", checkpoint=str(tmp_path), seq_len=32, new_tokens=2, loops=3,
                                dtype="float32"))
    assert (point.dtype, point.loops) == ("float32", 3)
    assert saved.config.loops == 3


def test_ouro_s_zero_based_exit_step_is_honoured(tmp_path):
    save_ouro_checkpoint(tmp_path, early_exit_step=1)
    loaded = OuroLM.from_pretrained(tmp_path)
    assert (loaded.config.exit_policy, loaded.config.exit_step) == ("fixed", 2)
    _same_logits(loaded, OuroLM.from_pretrained(tmp_path, exit_policy="fixed", exit_step=2))


def test_an_early_exit_threshold_below_one_exits_early(tmp_path):
    save_ouro_checkpoint(tmp_path, early_exit_threshold=0.5)
    loaded = OuroLM.from_pretrained(tmp_path)
    assert (loaded.config.exit_policy, loaded.config.exit_threshold) == ("threshold", 0.5)


def test_rope_parameters_of_the_default_type_are_honoured(tmp_path):
    save_ouro_checkpoint(tmp_path, rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert OuroLM.from_pretrained(tmp_path).config.rope_theta == 10000.0


@pytest.mark.parametrize("changes, field", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e6}), "rope_parameters"),
    (dict(use_sliding_window=True, sliding_window=64), "use_sliding_window"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    (dict(early_exit_step=3), "early_exit_step"),   # 0-based: 3 loops have steps 0, 1, 2
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(torch_dtype="int8"), "dtype"),
])
def test_values_it_does_not_implement_are_refused_naming_the_field(tmp_path, changes, field):
    save_ouro_checkpoint(tmp_path, **changes)
    with pytest.raises(ConfigError, match=rf"^{field}: .*; allowed: "):
        OuroLM.from_pretrained(tmp_path)
    with pytest.raises(BenchConfigError, match=rf"^{field}: .*; allowed: "):
        resolve(BenchConfig(size="tiny", model="ouro", checkpoint=str(tmp_path)))


def test_sharded_weights_load(tmp_path):
    """model.safetensors.index.json and its shards (Ouro-2.6B in bf16 is over 5 GB)."""
    saved = save_ouro_checkpoint(tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    (tmp_path / WEIGHTS_NAME).unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / shard)
    (tmp_path / INDEX_NAME).write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    _same_logits(OuroLM.from_pretrained(tmp_path), saved)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConfigError, match="^checkpoint: .*shard model-00002-of-00002.safetensors"):
        OuroLM.from_pretrained(tmp_path)


def test_a_tied_checkpoint_that_stores_its_head_loads(tmp_path):
    torch.manual_seed(0)
    model = build_model("standard", "tiny", tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, tmp_path / WEIGHTS_NAME)
    loaded = StandardLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    _same_logits(loaded, model)


# -- hub ids: huggingface_hub's cache, offline ------------------------------------------------------

@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding one tiny Ouro-format checkpoint, meltbench/tiny-ouro."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--meltbench--tiny-ouro" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    model = save_ouro_checkpoint(snapshot)
    (cache / "models--meltbench--tiny-ouro" / "refs").mkdir()
    (cache / "models--meltbench--tiny-ouro" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return model


def test_a_hub_id_loads_from_the_local_cache_offline(hub_cache):
    assert locate("meltbench/tiny-ouro").name == "0" * 40
    _same_logits(OuroLM.from_pretrained("meltbench/tiny-ouro"), hub_cache)
    point = resolve(BenchConfig(size="tiny", model="melt", checkpoint="meltbench/tiny-ouro", seq_len=32, new_tokens=2, repeats=0))
    assert point.loops == 3
    row = measure(point)
    assert row["status"] == "ok", row["error"]


def test_a_hub_id_not_in_the_cache_offline_is_one_clear_line(hub_cache):
    with pytest.raises(BenchConfigError, match=r"^checkpoint: meltbench/other: not in the local Hugging Face "
                                               r"cache, and the hub cannot be reached .*; allowed: "):
        resolve(BenchConfig(size="tiny", model="ouro", checkpoint="meltbench/other"))


@pytest.mark.parametrize("value, problem", [("no/such/folder", "no such folder"),
                                            ("./missing", "no such folder")])
def test_a_path_that_is_neither_folder_nor_hub_id(value, problem):
    with pytest.raises(ConfigError, match=f"^checkpoint: {value}: {problem}; allowed: "):
        locate(value)
