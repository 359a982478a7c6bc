"""The LoopLM's cache policies (models/cache_policies.py) against cache-policies.md: an independent,
token-by-token float64 reference of what each policy reads and stores (its slot for every loop
written out by hand below, never read from the code under test), every identity of the spec's
"Exactness" list, and the KV bytes of each policy's formula."""

from __future__ import annotations

import pytest
import torch

from bench.config import BenchConfig, resolve
from bench.measure.point import measure
from models import build_model
from models.layers import Attention
from test_models import TOL, SpecOps, tokens


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


# Each setting as cache-policies.md describes it, written out by hand: for loop t = 0 .. T-1 the
# slot group it reads and writes while the prompt goes in (loops sharing a number share the slot),
# whether it writes its K/V, and how the groups become one when the prefill ends (decode then
# reads and writes that one; None: decode uses the prefill's groups). ring (K): t mod K; anchor
# (A, K): t < A its own, else A + (t - A) mod K; first_writes: loop 0 writes, later loops only read.
Spec = tuple  # (policy, options, loops, groups by loop, writes by loop, merge)
ALL, FIRST = (True,) * 5, (True, False, False, False, False)
SPEC: list[Spec] = [
    ("per_loop", {}, 3, (0, 1, 2), ALL, None),
    ("last_loop", {}, 3, (0, 1, 2), ALL, "last"),
    ("first_loop", {}, 3, (0, 1, 2), ALL, "first"),
    ("mean_loops", {}, 3, (0, 1, 2), ALL, "mean"),
    ("mean_loops", {}, 5, (0, 1, 2, 3, 4), ALL, "mean"),
    ("ring", {"kv_ring": 1}, 3, (0, 0, 0), ALL, None),
    ("ring", {"kv_ring": 2}, 3, (0, 1, 0), ALL, None),
    ("ring", {"kv_ring": 2}, 5, (0, 1, 0, 1, 0), ALL, None),
    ("ring", {"kv_ring": 3}, 5, (0, 1, 2, 0, 1), ALL, None),
    ("anchor", {"kv_anchor": 1, "kv_ring": 1}, 3, (0, 1, 1), ALL, None),
    ("anchor", {"kv_anchor": 1, "kv_ring": 2}, 3, (0, 1, 2), ALL, None),
    ("anchor", {"kv_anchor": 1, "kv_ring": 2}, 5, (0, 1, 2, 1, 2), ALL, None),
    ("anchor", {"kv_anchor": 2, "kv_ring": 2}, 5, (0, 1, 2, 3, 2), ALL, None),
    ("anchor", {"kv_anchor": 2, "kv_ring": 1}, 5, (0, 1, 2, 2, 2), ALL, None),
    ("first_writes", {}, 3, (0, 0, 0), FIRST, None),
    ("first_writes", {}, 5, (0, 0, 0, 0, 0), FIRST, None),
]
SPEC_IDS = [f"{p}{''.join(f'-{k[3:]}{v}' for k, v in o.items())}-T{T}" for p, o, T, *_ in SPEC]


def spec_of(model) -> Spec:
    c = model.config
    options = {k: getattr(c, k) for k in ("kv_ring", "kv_anchor") if k in {o for _, opts, *_ in SPEC for o in opts}}
    for spec in SPEC:
        if spec[0] == c.kv_sharing and spec[2] == c.loops and all(options[k] == v for k, v in spec[1].items()):
            return spec
    raise LookupError(f"no hand-written spec for {c.kv_sharing} at {c.loops} loops, {options}")


def policy_reference(model, ids: torch.Tensor, prompt_len: int, chunk_size: int | None = None) -> torch.Tensor:
    """Logits of every position, the slow and obvious way in float64: the prompt in chunks (every
    loop of a chunk, then the next), then one token at a time, each (loop, layer) reading and
    writing the K/V store its setting in SPEC names, from the model's weights."""
    c = model.config
    _, _, _, groups_by_loop, writes_by_loop, merge = spec_of(model)
    ops = SpecOps(model)
    N, T, H, Hkv, D = c.num_hidden_layers, c.loops, ops.H, ops.Hkv, ops.D
    W, lin, norm, rope = ops.W, ops.lin, ops.norm, ops.rope

    out = []
    for row in ids:
        store: dict = {}                           # (group, layer) -> {position: (k, v)}
        logits = []

        def run(block, decoding):
            """All loops over positions `block`, K/V by the policy; -> the final states."""
            x = {i: W["model.embed_tokens.weight"][row[i]] for i in block}
            own: dict = {}                         # (layer, i) -> [(k, v) of each loop]
            for t in range(T):
                group = 0 if decoding and merge else groups_by_loop[t]
                for l in range(N):
                    p = f"model.layers.{l}"
                    u = {i: norm(x[i], f"{p}.input_layernorm") for i in block}
                    for i in block:                # every loop computes K/V; a policy may not store them
                        kv = (rope(lin(u[i], f"{p}.self_attn.k_proj").view(Hkv, D), i),
                              lin(u[i], f"{p}.self_attn.v_proj").view(Hkv, D))
                        own.setdefault((l, i), []).append(kv)
                        if writes_by_loop[t]:
                            store.setdefault((group, l), {})[i] = kv
                    for i in block:
                        rows = [store[(group, l)][j] for j in range(i + 1)]
                        q = rope(lin(u[i], f"{p}.self_attn.q_proj").view(H, D), i)
                        heads = ops.attend(q, torch.stack([k for k, _ in rows]), torch.stack([v for _, v in rows]))
                        x[i] = ops.attention_out(x[i], heads, p)
                    for i in block:
                        x[i] = ops.mlp_block(x[i], p)
                x = {i: norm(x[i], "model.norm") for i in block}
            if decoding and merge in ("first", "mean"):   # what a decoded token's row keeps
                for (l, i), kvs in own.items():
                    store[(0, l)][i] = kvs[0] if merge == "first" else tuple(
                        torch.stack(parts).mean(0) for parts in zip(*kvs))
            return x

        size = chunk_size or prompt_len
        for begin in range(0, prompt_len, size):
            x = run(range(begin, min(begin + size, prompt_len)), decoding=False)
            logits += [lin(x[i], "lm_head") for i in sorted(x)]
        if merge:                                   # the prompt is in: one store per layer
            groups = sorted({g for g, _ in store})
            for l in range(N):
                rows = [store[(g, l)] for g in groups]
                merged = {j: (rows[-1][j] if merge == "last" else rows[0][j] if merge == "first"
                              else tuple(torch.stack(p).mean(0) for p in zip(*(r[j] for r in rows))))
                          for j in rows[0]}
                for g in groups:
                    del store[(g, l)]
                store[(0, l)] = merged
        for i in range(prompt_len, ids.shape[1]):
            logits.append(lin(run([i], decoding=True)[i], "lm_head"))
        out.append(torch.stack(logits))
    return torch.stack(out)


def cached_logits(model, ids: torch.Tensor, prompt_len: int, chunk_size: int | None = None,
                  step: str = "decode_step") -> torch.Tensor:
    """The model's own path: prefill (in chunks), then the fast decode step (or forward) per token."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    logits = [model(ids[:, :prompt_len], cache=cache, chunk_size=chunk_size)]
    pos = torch.tensor([prompt_len])
    for i in range(prompt_len, ids.shape[1]):
        if step == "decode_step":
            logits.append(model.decode_step(ids[:, i:i + 1], cache, pos).clone())
            pos += 1
        else:
            logits.append(model(ids[:, i:i + 1], cache=cache, start_pos=i))
    return torch.cat(logits, dim=1)


SETTINGS = [("per_loop", {}), ("last_loop", {}), ("first_loop", {}), ("mean_loops", {}),
            ("ring", {"kv_ring": 1}), ("ring", {"kv_ring": 2}), ("anchor", {"kv_anchor": 1, "kv_ring": 1}),
            ("anchor", {"kv_anchor": 1, "kv_ring": 2}), ("first_writes", {})]


def _ouro(policy: str, loops: int = 3, seed: int = 0, dtype=torch.float32, **sizes):
    torch.manual_seed(seed)
    return build_model("ouro", "tiny", loops=loops, kv_sharing=policy, dtype=dtype, **sizes)


@pytest.mark.parametrize("chunk_size", [None, 5], ids=["one pass", "chunks of 5"])
@pytest.mark.parametrize("spec", SPEC, ids=SPEC_IDS)
def test_each_policy_reads_and_stores_what_the_spec_says(spec, chunk_size):
    policy, options, loops, *_ = spec
    model = _ouro(policy, loops=loops, **options)
    ids = tokens(1, batch=2, length=14)
    expected = policy_reference(model, ids, prompt_len=10, chunk_size=chunk_size)
    for step in ("decode_step", "forward"):
        torch.testing.assert_close(cached_logits(model, ids, 10, chunk_size, step).double(), expected,
                                   **TOL[torch.float64])


@pytest.mark.parametrize("spec", SPEC, ids=SPEC_IDS)
def test_each_policy_holds_the_slots_the_spec_says(spec):
    """Slots per layer: the distinct groups of its loops while the prompt goes in, one after a
    merge, and the bytes of exactly that many slots."""
    policy, options, loops, groups_by_loop, _, merge = spec
    model = _ouro(policy, loops=loops, **options)
    N = model.config.num_hidden_layers
    assert model.num_cache_slots() == N * len(set(groups_by_loop))
    assert model.num_decode_slots() == N * (1 if merge else len(set(groups_by_loop)))


# -- the identities of the spec's "Exactness" list ------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_ring_of_t_slots_is_per_loop(dtype, chunk_size):
    ids = tokens(2, batch=2, length=14)
    ring, per_loop = _ouro("ring", kv_ring=3, dtype=dtype), _ouro("per_loop", dtype=dtype)
    torch.testing.assert_close(cached_logits(ring, ids, 10, chunk_size), cached_logits(per_loop, ids, 10, chunk_size),
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ring_of_one_slot_is_last_loop_sharing_after_a_one_pass_prefill(dtype):
    """Token for token, prefill and decode, while holding one slot per layer from the start."""
    ids = tokens(3, batch=2, length=14)
    ring, last = _ouro("ring", kv_ring=1, dtype=dtype), _ouro("last_loop", dtype=dtype)
    torch.testing.assert_close(cached_logits(ring, ids, 10), cached_logits(last, ids, 10), **TOL[dtype])
    N = ring.config.num_hidden_layers
    assert ring.num_cache_slots() == N and last.num_cache_slots() == 3 * N and last.num_decode_slots() == N
    # chunked, they differ from the second chunk on: ring reads earlier chunks' last-loop rows
    assert not torch.allclose(cached_logits(ring, ids, 10, chunk_size=4), cached_logits(last, ids, 10, chunk_size=4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [None, 4, 1])
def test_melt_with_last_updates_is_a_ring_of_one(dtype, chunk_size):
    torch.manual_seed(0)
    ring = build_model("ouro", "tiny", loops=3, kv_sharing="ring", kv_ring=1, dtype=dtype)
    melt = build_model("melt", "tiny", loops=3, cache_update="last", dtype=dtype, chunk_size=chunk_size or 10)
    missing, _ = melt.load_state_dict(ring.state_dict(), strict=False)
    assert all(k.startswith("model.latent_gates.") for k in missing)
    ids = tokens(4, batch=2, length=14)
    torch.testing.assert_close(cached_logits(melt, ids, 10, chunk_size or 10), cached_logits(ring, ids, 10, chunk_size),
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("policy, sizes", SETTINGS, ids=[f"{p}{s or ''}" for p, s in SETTINGS])
def test_one_loop_of_every_policy_is_the_standard_model(policy, sizes, dtype):
    looped = _ouro(policy, loops=1, dtype=dtype, **sizes)
    standard = build_model("standard", "tiny", dtype=dtype)
    standard.load_state_dict({k: v for k, v in looped.state_dict().items() if "early_exit_gate" not in k})
    ids = tokens(5, batch=2, length=14)
    torch.testing.assert_close(cached_logits(looped, ids, 10, 4), cached_logits(standard, ids, 10, 4), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_first_writes_skips_later_loops_kv_and_that_changes_nothing(dtype, monkeypatch):
    """Loops >= 1 compute no K/V (MoR computes them and throws them away): the projections run
    only at loop 0, and the logits are those of a model that computes and discards them (the
    float64 reference computes every loop's K/V)."""
    model = _ouro("first_writes", dtype=dtype)
    calls = []
    keys_values = Attention.keys_values
    monkeypatch.setattr(Attention, "keys_values", lambda self, x, pos: calls.append(self) or keys_values(self, x, pos))
    ids = tokens(6, batch=2, length=14)
    cached_logits(model, ids, 10, 4)
    attentions = {id(layer.self_attn) for layer in model.model.layers}
    assert sum(id(m) in attentions for m in calls) == 2 * (3 + 4)  # 2 layers x (3 chunks + 4 decoded tokens) x loop 0
    if dtype == torch.float32:
        torch.testing.assert_close(cached_logits(model, ids, 10, 4).double(), policy_reference(model, ids, 10, 4),
                                   **TOL[torch.float64])


# -- bytes ----------------------------------------------------------------------------------------

def formula(policy: str, N: int, T: int, s: int, K: int = 1, A: int = 1) -> tuple[int, int]:
    """KV bytes per token (prefill, decode) as cache-policies.md gives them (K, A at most T)."""
    anchors = min(A, T)
    return {"per_loop": (N * T * s, N * T * s), "last_loop": (N * T * s, N * s), "first_loop": (N * T * s, N * s),
            "mean_loops": (N * T * s, N * s), "ring": (N * min(K, T) * s,) * 2,
            "anchor": (N * (anchors + min(K, T - anchors)) * s,) * 2, "first_writes": (N * s, N * s)}[policy]


@pytest.mark.parametrize("policy, sizes", SETTINGS + [("ring", {"kv_ring": 4}), ("anchor", {"kv_anchor": 2, "kv_ring": 3})],
                         ids=[f"{p}{s or ''}" for p, s in SETTINGS] + ["ring4", "anchor2x3"])
def test_kv_bytes_per_token_are_the_formula_at_every_depth(policy, sizes):
    standard = build_model("standard", "ouro-1.4b", dtype=torch.bfloat16, device="meta")
    s = standard.kv_bytes_per_token() // standard.config.num_hidden_layers
    for loops in range(1, 17):
        model = build_model("ouro", "ouro-1.4b", loops=loops, kv_sharing=policy, dtype=torch.bfloat16,
                            device="meta", **sizes)
        want = formula(policy, 24, loops, s, sizes.get("kv_ring", 1), sizes.get("kv_anchor", 1))
        assert (model.kv_bytes_per_token(), model.kv_decode_bytes(1, 1)) == want, loops


@pytest.mark.parametrize("policy, sizes", SETTINGS, ids=[f"{p}{s or ''}" for p, s in SETTINGS])
def test_the_cache_holds_what_the_formula_says(policy, sizes):
    model = _ouro(policy, loops=4, **sizes)
    cache = model.new_cache(2, 20)
    assert cache.nbytes() == model.kv_cache_bytes(2, 20)
    model(tokens(0, batch=2, length=12), cache=cache, chunk_size=5)
    assert cache.nbytes() == model.kv_decode_bytes(2, 20)


@pytest.mark.parametrize("seq_len", [64, 300])
def test_a_ring_of_one_prefills_below_last_loop_sharing_by_its_extra_slots(seq_len):
    """Same logits, but last-loop sharing keeps every loop's slot until the prompt is in: its
    prefill peak is above the ring's by exactly (T - 1) N slots (tracked probe, bytes)."""
    point = dict(size="tiny", model="ouro", loops=4, seq_len=seq_len, new_tokens=4, repeats=0, warmup=0,
                 prefill="one_pass")
    ring = measure(resolve(BenchConfig(**point, kv_sharing="ring", kv_ring=1)))
    last = measure(resolve(BenchConfig(**point, kv_sharing="last_loop")))
    model = build_model("standard", "tiny")
    slot = model.kv_cache_bytes(1, seq_len + 4) // model.config.num_hidden_layers
    assert last["peak_prefill_bytes"] - ring["peak_prefill_bytes"] == 3 * 2 * slot
    assert last["peak_decode_bytes"] == ring["peak_decode_bytes"]


# -- LoopCoder: a shared loop-0 cache and gated sliding-window attention -------------------------------

def loopcoder_reference(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of every position in float64, one token at a time (causal: the same whatever the
    schedule): loop 0 stores its K/V globally; loop t >= 1 mixes attention over loop 0's K/V of
    tokens <= i and over its own K/V of tokens i-W+1..i, per head by sigmoid(q . w + b)."""
    c = model.config
    ops = SpecOps(model)
    N, T, H, Hkv, D, window = c.num_hidden_layers, c.loops, ops.H, ops.Hkv, ops.D, c.kv_window
    W, lin, norm, rope = ops.W, ops.lin, ops.norm, ops.rope

    def heads(q, kvs):  # q [H, D]; kvs [(k, v) [Hkv, D]] -> [H, D]
        return ops.attend(q, torch.stack([a for a, _ in kvs]), torch.stack([b for _, b in kvs]))

    out = []
    for row in ids:
        store: dict = {}                                   # (loop, layer) -> {position: (k, v)}
        logits = []
        for i in range(ids.shape[1]):
            x = W["model.embed_tokens.weight"][row[i]]
            for t in range(T):
                for l in range(N):
                    p = f"model.layers.{l}"
                    u = norm(x, f"{p}.input_layernorm")
                    q = rope(lin(u, f"{p}.self_attn.q_proj").view(H, D), i)
                    store.setdefault((t, l), {})[i] = (rope(lin(u, f"{p}.self_attn.k_proj").view(Hkv, D), i),
                                                       lin(u, f"{p}.self_attn.v_proj").view(Hkv, D))
                    glob = heads(q, [store[(0, l)][j] for j in range(i + 1)])
                    if t == 0:
                        mixed = glob
                    else:
                        local = heads(q, [store[(t, l)][j] for j in range(max(0, i - window + 1), i + 1)])
                        g = torch.sigmoid((q * W[f"model.window_gates.{l}.weight"]).sum(-1)
                                          + W[f"model.window_gates.{l}.bias"])[:, None]
                        mixed = g * glob + (1 - g) * local
                    x = ops.mlp_block(ops.attention_out(x, mixed, p), p)
                x = norm(x, "model.norm")
            logits.append(lin(x, "lm_head"))
        out.append(torch.stack(logits))
    return torch.stack(out)


def _loopcoder(window: int, loops: int = 3, dtype=torch.float32):
    torch.manual_seed(0)
    model = build_model("loopcoder", "tiny", loops=loops, kv_window=window, dtype=dtype)
    with torch.no_grad():  # gates away from 0.5, so a wrong mix shows
        for gate in model.model.window_gates:
            gate.weight.normal_(0, 0.5)
            gate.bias.normal_(0, 1)
    return model


@pytest.mark.parametrize("window", [3, 6, 64])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_loopcoder_is_the_spec(window, chunk_size):
    model = _loopcoder(window)
    ids = tokens(7, batch=2, length=14)
    expected = loopcoder_reference(model, ids)
    for step in ("decode_step", "forward"):
        torch.testing.assert_close(cached_logits(model, ids, 10, chunk_size, step).double(), expected,
                                   **TOL[torch.float64])
    torch.testing.assert_close(model(ids).double(), expected, **TOL[torch.float64])   # uncached


def test_loopcoder_bytes_and_its_one_loop():
    model = _loopcoder(window=4, loops=3)
    N, s = model.config.num_hidden_layers, build_model("standard", "tiny").kv_bytes_per_token() // 2
    cache = model.new_cache(2, 20)
    assert cache.nbytes() == model.kv_cache_bytes(2, 20) == 2 * (N * 20 + 2 * N * 4) * s
    assert model.kv_bytes_per_token() == N * s  # per token; the rings are a constant per sequence
    assert model.kv_cache_bytes(1, 1000) - model.kv_cache_bytes(1, 900) == 100 * N * s
    one = _loopcoder(window=4, loops=1)
    standard = build_model("standard", "tiny")
    standard.load_state_dict({k: v for k, v in one.state_dict().items()
                              if not k.startswith(("model.window_gates", "model.early_exit_gate"))})
    ids = tokens(8, batch=2, length=14)
    torch.testing.assert_close(cached_logits(one, ids, 10, 4), cached_logits(standard, ids, 10, 4), rtol=0, atol=0)


# -- scoring text through a policy's cached path, and the K/V drift between loops ----------------------

def test_score_is_the_uncached_log_likelihood_for_exact_policies_and_differs_for_sharing():
    from models.runtime import score

    ids = tokens(9, batch=2, length=20)
    per_loop = _ouro("per_loop")
    with torch.inference_mode():
        full = torch.log_softmax(per_loop(ids).float(), -1)[:, 11:-1].gather(2, ids[:, 12:, None]).squeeze(-1)
    torch.testing.assert_close(score(per_loop, ids, 12, chunk_size=5), full, atol=1e-5, rtol=1e-5)
    last = _ouro("last_loop")                       # the same weights: sharing changes decoded tokens only
    shared = score(last, ids, 12, chunk_size=5)
    assert torch.equal(shared[:, 0], score(per_loop, ids, 12, chunk_size=5)[:, 0])  # the prefill's prediction
    assert not torch.allclose(shared[:, 1:], full[:, 1:])


def test_kv_drift_measures_loops_against_the_last_and_the_first():
    from bench.measure.drift import kv_drift

    table = kv_drift(_ouro("last_loop", loops=3), tokens(10, batch=2, length=16))
    assert len(table) == 2 * 2 * 3   # layers x (keys, values) x loops
    last, first = table[table.loop == 2], table[table.loop == 0]
    assert (last.cos_vs_last.round(5) == 1).all() and (last.rel_vs_last == 0).all()
    assert (first.cos_vs_first.round(5) == 1).all() and (first.rel_vs_first == 0).all()
    assert (table[table.loop == 1].rel_vs_last > 0).all()
    with pytest.raises(ValueError, match="^model: MeltLM"):
        kv_drift(build_model("melt", "tiny"), tokens(10))
