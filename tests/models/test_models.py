"""The invariants of melt-spec section 4, parameter counts, checkpoints and input checks.

Every comparison goes through `assert_logits_close`, which records the largest logit difference per
invariant; set MELTBENCH_INVARIANT_LOG=path.json to have them written out at the end of the run.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from models import (CACHE_UPDATES, ConfigError, KVCache, MeltLM, OuroLM, StandardLM, build_model,
                    make_config)
from models.layers import chunk_bounds
from models.ouro import exit_loops_by_threshold, exit_probabilities

SEEDS = [0, 1, 2]
# Tolerances: fp32 differences come only from summation order (chunked vs whole attention);
# bf16 rounds every activation, so whole-model outputs agree to about a bf16 ulp of the logits.
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
       torch.float64: dict(atol=2e-5, rtol=1e-4)}  # float64: an fp32 model against the reference
MAX_DIFF: dict[str, float] = {}


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, label: str) -> None:
    diff = (actual.float() - expected.float()).abs().max().item()
    label = f"{label} [{str(actual.dtype).removeprefix('torch.')}]"
    MAX_DIFF[label] = max(MAX_DIFF.get(label, 0.0), diff)
    torch.testing.assert_close(actual, expected, **TOL[actual.dtype])


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module", autouse=True)
def _write_invariant_log():
    yield
    if path := os.environ.get("MELTBENCH_INVARIANT_LOG"):
        with open(path, "w") as f:
            json.dump(MAX_DIFF, f, indent=2, sort_keys=True)


def models_sharing_weights(seed: int, loops: int, dtype=torch.float32, **melt_options):
    """(standard, ouro, melt) of size tiny with identical backbone weights (MELT's gates random)."""
    torch.manual_seed(seed)
    ouro = build_model("ouro", "tiny", loops=loops, dtype=dtype)
    standard = build_model("standard", "tiny", dtype=dtype)
    melt = build_model("melt", "tiny", loops=loops, dtype=dtype, **melt_options)
    state = ouro.state_dict()
    standard.load_state_dict({k: v for k, v in state.items() if not k.startswith("model.early_exit_gate")})
    missing, unexpected = melt.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("model.latent_gates.") for k in missing)
    return standard, ouro, melt


def tokens(seed: int, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed + 100))


def decode_token_by_token(model, ids: torch.Tensor, prompt_len: int, **kwargs) -> torch.Tensor:
    """Prefill ids[:, :prompt_len] then feed the rest one token at a time; logits of every position."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    logits = [model(ids[:, :prompt_len], cache=cache, start_pos=0, **kwargs)]
    for pos in range(prompt_len, ids.shape[1]):
        logits.append(model(ids[:, pos:pos + 1], cache=cache, start_pos=pos))
    return torch.cat(logits, dim=1)


# -- an independent reference, straight from melt-spec ----------------------------------------------
class SpecOps:
    """The shared layer's pieces the slow, obvious way, in float64 from a model's weights (melt-spec
    section 1): x is one token's vector, p a layer's prefix ("model.layers.3")."""

    def __init__(self, model):
        c = self.config = model.config
        self.W = {k: v.double() for k, v in model.state_dict().items()}
        self.H, self.Hkv, self.D, self.eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps

    def lin(self, x, name):
        y = x @ self.W[f"{name}.weight"].T
        return y + self.W[f"{name}.bias"] if f"{name}.bias" in self.W else y

    def norm(self, x, name):
        return self.W[f"{name}.weight"] * x / torch.sqrt(x.pow(2).mean() + self.eps)

    def rope(self, x, pos):  # x [heads, D]
        D = self.D
        angle = pos / self.config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
        cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
        return x * cos + torch.cat([-x[:, D // 2:], x[:, :D // 2]], dim=-1) * sin

    def attend(self, q, keys, values):  # q [H, D]; keys, values [n, Hkv, D] -> [H, D]
        group = self.H // self.Hkv
        return torch.stack([torch.softmax(keys[:, h // group] @ q[h] / self.D**0.5, dim=0) @ values[:, h // group]
                            for h in range(self.H)])

    def attention_out(self, x, heads, p):  # x + the attention sublayer's normed output
        return x + self.norm(self.lin(heads.reshape(-1), f"{p}.self_attn.o_proj"), f"{p}.input_layernorm_2")

    def mlp_block(self, x, p):  # x + the MLP sublayer's normed output
        m = self.norm(x, f"{p}.post_attention_layernorm")
        mlp = self.lin(torch.nn.functional.silu(self.lin(m, f"{p}.mlp.gate_proj")) * self.lin(m, f"{p}.mlp.up_proj"),
                       f"{p}.mlp.down_proj")
        return x + self.norm(mlp, f"{p}.post_attention_layernorm_2")


def reference_logits(model, ids: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Logits computed the slow, obvious way in float64 from the model's weights: one token at a
    time, explicit RMSNorm, RoPE, softmax and per-slot caches, following melt-spec sections 1-4
    (LoopLM: slot per (loop, layer); MELT: one slot per layer, rows overwritten loop by loop in
    chunks, gate z = sigmoid(u W_z + h_prev U_z + b_z), h_prev = u at loop 1)."""
    c = model.config
    ops = SpecOps(model)
    W, lin, norm, rope = ops.W, ops.lin, ops.norm, ops.rope
    H, Hkv, D = ops.H, ops.Hkv, ops.D

    loops = c.loops
    L = ids.shape[1]
    size = L if c.arch != "melt" else chunk_size or c.chunk_size
    out = []
    for row in ids:
        keys, values = {}, {}                                   # slot -> {position: [Hkv, D]}
        final = [None] * L
        for begin in range(0, L, size):
            chunk = range(begin, min(begin + size, L))
            x = {i: W["model.embed_tokens.weight"][row[i]] for i in chunk}
            latent = {}                                         # (layer, i) -> h
            for t in range(loops):
                for l in range(c.num_hidden_layers):
                    p = f"model.layers.{l}"
                    slot = l if c.arch == "melt" else t * c.num_hidden_layers + l
                    u = {i: norm(x[i], f"{p}.input_layernorm") for i in chunk}
                    for i in chunk:                             # K/V rows of this loop
                        h = u[i]
                        if c.arch == "melt":
                            h_prev = latent.get((l, i), u[i])
                            g = f"model.latent_gates.{l}"
                            z = torch.sigmoid(lin(u[i], f"{g}.input_proj") + lin(h_prev, f"{g}.state_proj"))
                            h = latent[(l, i)] = z * h_prev + (1 - z) * u[i]
                        keys.setdefault(slot, {})[i] = rope(lin(h, f"{p}.self_attn.k_proj").view(Hkv, D), i)
                        values.setdefault(slot, {})[i] = lin(h, f"{p}.self_attn.v_proj").view(Hkv, D)
                    for i in chunk:                             # attention over positions 0..i
                        q = rope(lin(u[i], f"{p}.self_attn.q_proj").view(H, D), i)
                        k = torch.stack([keys[slot][j] for j in range(i + 1)])      # [i+1, Hkv, D]
                        v = torch.stack([values[slot][j] for j in range(i + 1)])
                        x[i] = ops.attention_out(x[i], ops.attend(q, k, v), p)
                    for i in chunk:
                        x[i] = ops.mlp_block(x[i], p)
                x = {i: norm(x[i], "model.norm") for i in chunk}   # s_t: exit t, input of loop t+1
            for i in chunk:
                final[i] = lin(x[i], "lm_head")
        out.append(torch.stack(final))
    return torch.stack(out)


@pytest.mark.parametrize("name, loops, chunk_size", [
    ("standard", 1, None), ("ouro", 1, None), ("ouro", 3, None),
    ("melt", 1, 4), ("melt", 3, 1), ("melt", 3, 5), ("melt", 3, 12),
])
def test_models_match_the_spec_reference(name, loops, chunk_size):
    torch.manual_seed(3)
    model = build_model(name, "tiny", loops=loops, **({"chunk_size": chunk_size} if chunk_size else {}))
    if name == "melt":  # gates far from z = 0.5 everywhere, so a wrong formula shows
        with torch.no_grad():
            for gate in model.model.latent_gates:
                gate.input_proj.bias.normal_(0, 2)
    ids = tokens(0, batch=2, length=12)
    expected = reference_logits(model, ids)
    assert_logits_close(model(ids).double(), expected, "spec reference vs model")
    if name == "ouro":  # and through the cache, token by token
        assert_logits_close(decode_token_by_token(model, ids, prompt_len=4).double(), expected,
                            "spec reference vs model")
    if name == "melt":  # and through a cache held across chunks
        assert_logits_close(model(ids, cache=model.new_cache(2, 12)).double(), expected,
                            "spec reference vs model")


# -- invariant 1: T = 1 gives identical logits ---------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cache_update", CACHE_UPDATES)
def test_invariant1_one_loop_models_agree(seed, dtype, cache_update):
    standard, ouro, melt = models_sharing_weights(seed, loops=1, dtype=dtype, cache_update=cache_update,
                                                  chunk_size=8)
    ids = tokens(seed)
    expected = standard(ids)
    assert_logits_close(ouro(ids), expected, "1: loops=1 ouro vs standard")
    assert_logits_close(melt(ids), expected, "1: loops=1 melt vs standard")
    # with caches as well, through a chunked prefill and decode
    assert_logits_close(decode_token_by_token(melt, ids, 16), expected, "1: loops=1 melt cached vs standard")


# -- invariant 2: MELT with z = 0 is the LoopLM -----------------------------------------------------
def force_gates_closed(melt: MeltLM) -> None:
    """Gate bias -> -inf so z = sigmoid(.) = 0 exactly and h = u, with the gate still computed."""
    with torch.no_grad():
        for gate in melt.model.latent_gates:
            gate.input_proj.bias.fill_(-1e4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("how", ["cache_update=last", "gated with z=0"])
def test_invariant2_zero_gate_melt_is_the_looplm(seed, dtype, how):
    loops, length = 4, 24
    options = dict(cache_update="last") if how == "cache_update=last" else {}
    _, ouro, melt = models_sharing_weights(seed, loops, dtype=dtype, chunk_size=length, **options)
    if how != "cache_update=last":
        force_gates_closed(melt)
    ids = tokens(seed, length=length)
    assert_logits_close(melt(ids), ouro(ids), "2: prefill melt(z=0, C>=L) vs ouro")

    # decode: MELT with z = 0 against the LoopLM with last-loop KV sharing (same prompt, same tokens)
    ouro.config.kv_sharing = "last_loop"
    expected = decode_token_by_token(ouro, ids, prompt_len=16)
    actual = decode_token_by_token(melt, ids, prompt_len=16)
    assert_logits_close(actual, expected, "2: decode melt(z=0) vs ouro last_loop")


def test_invariant2_is_not_vacuous():
    """The gated MELT with random gates does differ from the LoopLM beyond loop 1."""
    _, ouro, melt = models_sharing_weights(0, loops=4, chunk_size=24)
    ids = tokens(0)
    assert (melt(ids) - ouro(ids)).abs().max() > 1e-2


# -- invariant 3: cached decode equals the uncached forward ----------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["standard", "ouro"])
def test_invariant3_decode_equals_forward(seed, dtype, name):
    torch.manual_seed(seed)
    model = build_model(name, "tiny", loops=3, dtype=dtype)
    ids = tokens(seed)
    expected = model(ids)
    for prompt_len in (1, 10):
        assert_logits_close(decode_token_by_token(model, ids, prompt_len), expected,
                            f"3: {name} decode vs uncached forward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cache_update", CACHE_UPDATES)
@pytest.mark.parametrize("init_latent", ["input", "zero"])
def test_invariant3_melt_decode_equals_chunk1_prefill(seed, dtype, cache_update, init_latent):
    torch.manual_seed(seed)
    melt = build_model("melt", "tiny", loops=3, dtype=dtype, cache_update=cache_update, init_latent=init_latent)
    ids = tokens(seed)
    expected = melt(ids, chunk_size=1)
    assert_logits_close(decode_token_by_token(melt, ids, prompt_len=1), expected,
                        "3: melt decode vs prefill C=1")


@pytest.mark.parametrize("seed", SEEDS)
def test_invariant3_melt_chunked_prefill_then_decode(seed):
    """Prefill of 16 tokens in chunks of 8, then 8 decode steps == one call with chunks
    [8, 8, 1 x 8]; and a prefill split over calls == one call with the same chunk boundaries."""
    torch.manual_seed(seed)
    melt = build_model("melt", "tiny", loops=4, chunk_size=8)
    ids = tokens(seed)
    expected = melt(ids, chunk_size=[8, 8] + [1] * 8)
    assert_logits_close(decode_token_by_token(melt, ids, prompt_len=16), expected,
                        "3: melt chunked prefill + decode vs same chunks in one call")

    cache = melt.new_cache(2, 24)
    split = torch.cat([melt(ids[:, :8], cache=cache), melt(ids[:, 8:24], cache=cache, start_pos=8)], dim=1)
    assert_logits_close(split, melt(ids), "3: melt prefill split over calls vs one call")
    # chunk boundaries matter once loops > 1: C = 8 is not C = 24
    assert (melt(ids, chunk_size=24) - expected).abs().max() > 1e-3


# -- invariant 4: cache bytes ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loops", [1, 2, 4, 8])
def test_invariant4_cache_bytes(loops, dtype):
    batch, max_len = 2, 40
    caches, analytic = {}, {}
    for name in ("standard", "ouro", "melt"):
        model = build_model(name, "tiny", loops=loops, dtype=dtype)
        cache = model.new_cache(batch, max_len)
        caches[name] = cache.nbytes()
        analytic[name] = model.kv_cache_bytes(batch, max_len)
        tensors = [t for t in cache.keys + cache.values]
        assert caches[name] == sum(t.untyped_storage().nbytes() for t in tensors)  # real storage
        assert all(t.dtype == dtype for t in tensors)
    c = make_config("standard", "tiny")
    formula = 2 * c.num_hidden_layers * batch * c.num_key_value_heads * max_len * c.head_dim * dtype.itemsize
    assert caches == analytic
    assert caches["standard"] == formula
    assert caches["ouro"] == loops * caches["standard"]
    assert caches["melt"] == caches["standard"]


def test_cache_bytes_paper_table2():
    """KV bytes per token in bf16 (paper Table 2): MELT 0.197 MB, Ouro 0.786 MB, Qwen3 0.115 MB."""
    per_token = {name: build_model(name, size, device="meta", dtype="bfloat16").kv_bytes_per_token()
                 for name, size in [("melt", "ouro-1.4b"), ("ouro", "ouro-1.4b"), ("standard", "qwen3-1.7b")]}
    assert per_token == {"melt": 196_608, "ouro": 786_432, "standard": 114_688}


def test_last_loop_sharing_keeps_one_slot_per_layer():
    torch.manual_seed(0)
    ouro = build_model("ouro", "tiny", loops=4, kv_sharing="last_loop")
    cache = ouro.new_cache(1, 16)
    assert cache.nbytes() == 4 * build_model("standard", "tiny").kv_cache_bytes(1, 16)  # prefill: all loops
    ouro(tokens(0, 1, 8), cache=cache)
    assert cache.num_slots == ouro.config.num_hidden_layers
    assert cache.nbytes() == build_model("standard", "tiny").kv_cache_bytes(1, 16)


# -- parameter counts, on the meta device -------------------------------------------------------------
def test_parameter_counts():
    assert build_model("ouro", "ouro-1.4b", device="meta").num_parameters() == 1_434_652_673
    assert build_model("ouro", "ouro-2.6b", device="meta").num_parameters() == 2_667_974_657
    assert build_model("melt", "ouro-1.4b", device="meta").num_parameters() == 1_636_028_417
    melt_gates = 24 * (2 * 2048**2 + 2048)
    assert melt_gates == 201_375_744
    qwen = build_model("standard", "qwen3-1.7b", device="meta", dtype="bfloat16")
    assert qwen.lm_head.weight is qwen.model.embed_tokens.weight  # tied embeddings
    assert qwen.weights_bytes() == 2 * qwen.num_parameters()


# -- exits --------------------------------------------------------------------------------------------
def test_exit_distribution():
    gate_logits = torch.randn(4, 3, 5)
    p = exit_probabilities(gate_logits)
    torch.testing.assert_close(p.sum(0), torch.ones(3, 5))
    lam = torch.sigmoid(gate_logits)
    torch.testing.assert_close(p[1], lam[1] * (1 - lam[0]))
    torch.testing.assert_close(p[3], (1 - lam[:3]).prod(0))
    # certain exit at loop 2 (lambda ~ 1) with q = 0.5; q = 1 always runs to the last loop
    sure = torch.tensor([-30.0, 30.0, -30.0, -30.0]).view(4, 1)
    assert exit_loops_by_threshold(sure, 0.5).item() == 1
    assert exit_loops_by_threshold(torch.zeros(4, 1), 1.0).item() == 3


def test_exit_policies_pick_loop_logits():
    torch.manual_seed(0)
    ids = tokens(0)
    last = build_model("ouro", "tiny", loops=3)
    state = last.state_dict()
    fixed_3 = build_model("ouro", "tiny", loops=3, exit_policy="fixed", exit_step=3)
    fixed_1 = build_model("ouro", "tiny", loops=3, exit_policy="fixed", exit_step=1)
    one_loop = build_model("ouro", "tiny", loops=1)
    threshold = build_model("ouro", "tiny", loops=3, exit_policy="threshold", exit_threshold=0.5)
    for m in (fixed_3, fixed_1, one_loop, threshold):
        m.load_state_dict(state)
    torch.testing.assert_close(fixed_3(ids), last(ids))
    torch.testing.assert_close(fixed_1(ids), one_loop(ids))      # exit 1 is loop 1's logits
    with torch.no_grad():                                          # gate says "exit now" everywhere
        threshold.model.early_exit_gate.bias.fill_(30.0)
    torch.testing.assert_close(threshold(ids), one_loop(ids))
    torch.testing.assert_close(threshold(ids, last_only=True), one_loop(ids)[:, -1:])


# -- API behaviour ------------------------------------------------------------------------------------
def melt_options(name: str, **options) -> dict:
    return options if name == "melt" else {}


@pytest.mark.parametrize("name", ["standard", "ouro", "melt"])
def test_last_only_and_batch(name):
    torch.manual_seed(0)
    model = build_model(name, "tiny", loops=2, **melt_options(name, chunk_size=5))
    ids = tokens(0, batch=3)
    full = model(ids)
    assert full.shape == (3, 24, 256)
    torch.testing.assert_close(model(ids, last_only=True), full[:, -1:])
    # each batch row is independent of the others
    for row in range(3):
        torch.testing.assert_close(model(ids[row:row + 1]), full[row:row + 1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["standard", "ouro", "melt"])
def test_generate_is_greedy_over_the_cache(name):
    torch.manual_seed(0)
    model = build_model(name, "tiny", loops=2, **melt_options(name, chunk_size=4))
    prompt = tokens(0, batch=2, length=6)
    out = model.generate(prompt, max_new_tokens=5)
    assert out.shape == (2, 11) and torch.equal(out[:, :6], prompt)
    if name != "melt":  # uncached argmax rerun: the same tokens (MELT's chunking makes decode differ)
        ids = prompt
        for _ in range(5):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(out, ids)
    else:
        # MELT decodes each new token as its own chunk: rerun with those chunk boundaries
        expected = model(out[:, :-1], chunk_size=[4, 2, 1, 1, 1, 1])[:, 5:].argmax(-1)
        assert torch.equal(out[:, 6:], expected)


# -- checkpoints ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["standard", "ouro", "melt"])
def test_checkpoint_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, "tiny", loops=3, **melt_options(name, chunk_size=5))
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.config.loops == model.config.loops
    assert loaded.config.chunk_size == model.config.chunk_size
    ids = tokens(0)
    assert torch.equal(loaded(ids), model(ids))


def test_tied_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("standard", "tiny", tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    loaded = StandardLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded(tokens(0)), model(tokens(0)))


def write_ouro_checkpoint(path, seed=0):
    """An Ouro-layout checkpoint as Ouro's own code writes it: model_type "ouro", total_ut_steps."""
    torch.manual_seed(seed)
    ouro = build_model("ouro", "tiny", loops=3)
    ouro.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    for key in ("arch", "kv_sharing", "exit_policy", "exit_step", "chunk_size", "cache_update",
                "init_latent", "ema_alpha"):
        config.pop(key)
    config.update(model_type="ouro", architectures=["OuroForCausalLM"], hidden_act="silu",
                  rope_scaling=None, use_cache=True)
    (path / "config.json").write_text(json.dumps(config))
    return ouro


def test_ouro_checkpoint_loads_into_ouro_and_melt(tmp_path):
    ouro = write_ouro_checkpoint(tmp_path)
    keys = set(json.loads((tmp_path / "config.json").read_text()))
    assert "total_ut_steps" in keys and "loops" not in keys
    ids = tokens(0)
    loaded = OuroLM.from_pretrained(tmp_path)
    assert loaded.config.loops == 3
    assert torch.equal(loaded(ids), ouro(ids))

    melt = MeltLM.from_pretrained(tmp_path, chunk_size=24)
    assert melt.config.loops == 3
    gates = [p for n, p in melt.named_parameters() if n.startswith("model.latent_gates.")]
    assert gates and all(p.abs().sum() > 0 or p.dim() == 1 for p in gates)  # freshly initialised
    for name, tensor in ouro.state_dict().items():
        assert torch.equal(melt.state_dict()[name], tensor), name
    force_gates_closed(melt)
    assert_logits_close(melt(ids), ouro(ids), "2: prefill melt(z=0, C>=L) vs ouro")

    standard = StandardLM.from_pretrained(tmp_path)           # ignores the early-exit gate
    assert standard.config.loops == 1


def test_checkpoint_mismatch_is_reported(tmp_path):
    build_model("ouro", "tiny").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing .*model.layers.2"):
        OuroLM.from_pretrained(tmp_path)


def test_a_checkpoint_with_part_of_the_gates_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    build_model("melt", "tiny").save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if "latent_gates.1." not in k}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing .*model.latent_gates.1"):
        MeltLM.from_pretrained(tmp_path)


# -- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, field", [
    (lambda: build_model("mamba"), "model"),
    (lambda: build_model("melt", size="huge"), "size"),
    (lambda: build_model("melt", loops=0), "loops"),
    (lambda: build_model("ouro", loops=2.5), "loops"),
    (lambda: build_model("melt", num_attention_heads=3), "num_attention_heads"),
    (lambda: build_model("melt", num_key_value_heads=3), "num_key_value_heads"),
    (lambda: build_model("melt", chunk_size=0), "chunk_size"),
    (lambda: build_model("melt", cache_update="max"), "cache_update"),
    (lambda: build_model("melt", init_latent="noise"), "init_latent"),
    (lambda: build_model("ouro", kv_sharing="second_loop"), "kv_sharing"),
    (lambda: build_model("ouro", kv_sharing="ring", kv_ring=0), "kv_ring"),
    (lambda: build_model("ouro", exit_policy="fixed"), "exit_step"),
    (lambda: build_model("ouro", exit_policy="fixed", exit_step=9), "exit_step"),
    (lambda: build_model("ouro", exit_threshold=1.5), "exit_threshold"),
    (lambda: build_model("ouro", dtype="int8"), "dtype"),
    (lambda: build_model("ouro", chunk_sise=4), "chunk_sise"),
    (lambda: build_model("ouro", chunk_size=4), "chunk_size"),
    (lambda: build_model("melt", exit_policy="fixed", exit_step=1), "exit_policy"),
    (lambda: build_model("standard", kv_sharing="last_loop"), "kv_sharing"),
    (lambda: build_model("melt").new_cache(1, 4096), "max_len"),
    (lambda: build_model("melt").new_cache(0, 16), "batch_size"),
    (lambda: build_model("melt")(torch.zeros(1, 2000, dtype=torch.long)), "max_len"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(ConfigError) as info:
        call()
    assert str(info.value).startswith(f"{field}: ")
    assert "allowed" in str(info.value)


def test_bad_positions_name_the_field():
    model = build_model("standard")
    cache = model.new_cache(2, 16)
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"^start_pos: start_pos 14 \+ length 4 is beyond the cache"):
        model(ids, cache=cache, start_pos=14)
    with pytest.raises(ConfigError, match=r"^input_ids: batch 1 but the cache holds 2"):
        model(ids[:1], cache=cache)
    with pytest.raises(ConfigError, match=r"^start_pos: "):
        model(ids, start_pos=3)
    with pytest.raises(ConfigError, match=r"^input_ids: "):
        model(torch.zeros(4))


def test_kvcache_merges_groups_and_refuses_a_dropped_slot():
    """Two layers, two groups (slots g * 2 + layer): merging keeps one slot per layer."""
    cache = KVCache(4, 1, 1, 4, 2, torch.float32, "cpu")
    for slot in range(4):
        cache.write(slot, 0, torch.full((1, 1, 4, 2), float(slot)), torch.full((1, 1, 4, 2), float(slot)))
    cache.merge_groups([[0, 2], [1, 3]], "mean")
    assert cache.merged and cache.num_slots == 2
    assert cache.read(0, 0, 4)[0].unique().tolist() == [1.0] and cache.read(1, 0, 4)[1].unique().tolist() == [2.0]
    assert cache.nbytes() == 2 * KVCache.slot_bytes(1, 1, 4, 2, torch.float32)
    cache.view = None  # as a model that did not know the cache was merged would address it
    with pytest.raises(RuntimeError, match="slot 2 was dropped"):
        cache.update(2, 0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    assert cache.reset().num_slots == 4 and not cache.merged


def test_chunk_bounds():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(3, 500) == [(0, 3)]
    assert chunk_bounds(5, [2, 1, 9]) == [(0, 2), (2, 3), (3, 5)]
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_bounds(5, [2, 1])
