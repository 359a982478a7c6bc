"""The fast decode path: the static-shape step equals the checked forward path; its compiled
layers give the same logits, each compiled once whatever the depth; the captured step (one CUDA
graph) replays it; fused projections load the checkpoints' separate matrices; MELT's fused gate is
the paper's two matrices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.melt import LatentGate
from models.layers import attend_one
from models.compiled import CapturedStep
from models.runtime import Engine

from test_models import TOL, tokens


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


def _model(name: str, seed: int = 0, loops: int = 3, **options):
    torch.manual_seed(seed)
    model = build_model(name, "tiny", loops=1 if name == "standard" else loops, **options)
    if name == "melt" and model.config.cache_update == "gated":  # gates away from z = 0.5, so a wrong gate shows in the logits
        with torch.no_grad():
            for gate in model.model.latent_gates:
                gate.input_proj.bias.normal_(0, 2)
    return model


CASES = [("standard", {}), ("ouro", {}), ("ouro", dict(kv_sharing="last_loop")),
         ("ouro", dict(exit_policy="threshold", exit_threshold=0.5)), ("melt", dict(chunk_size=4)),
         ("melt", dict(cache_update="mean"))]


def _decode(model, ids, prompt_len, step):
    """Prefill ids[:, :prompt_len] through forward, then `step` for every later token (fed the
    true next token, so two paths see the same inputs) -> logits of the decoded positions."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    model(ids[:, :prompt_len], cache=cache)
    pos = torch.tensor([prompt_len], device=ids.device)
    out = []
    for i in range(prompt_len, ids.shape[1]):
        if step is None:  # the checked path: forward with an int start_pos
            out.append(model(ids[:, i:i + 1], cache=cache, start_pos=i, last_only=True))
        else:
            out.append(step(ids[:, i:i + 1], cache, pos).clone())
            pos += 1
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name, options", CASES)
def test_decode_step_equals_forward(name, options):
    model = _model(name, **options)
    ids = tokens(0, batch=2, length=12)
    expected = _decode(model, ids, 5, None)
    torch.testing.assert_close(_decode(model, ids, 5, model.decode_step), expected, **TOL[torch.float32])


# Every looped design, and how many distinct layer applications its step has (so how many graphs
# its compiled layers make), counted from its description, not from the code: one per kind of
# (layer, loop) application, none per layer, loop or position.
DESIGNS = [
    ("standard", {}, 1),
    ("ouro", {}, 1),                                                 # per-loop slots: one layer kind
    ("ouro", dict(kv_sharing="last_loop"), 1),                       # after the merge: one slot per layer
    ("ouro", dict(kv_sharing="first_loop"), 1),                      # keeps loop 0's rows: copies outside the layer
    ("ouro", dict(kv_sharing="mean_loops"), 1),
    ("ouro", dict(kv_sharing="ring", kv_ring=2), 1),
    ("ouro", dict(kv_sharing="anchor", kv_anchor=1, kv_ring=2), 1),
    ("ouro", dict(kv_sharing="first_writes"), 2),                    # loop 0 writes, later loops only read
    ("ouro", dict(exit_policy="threshold", exit_threshold=0.5), 1),  # the exit gate runs outside the layers
    ("melt", dict(chunk_size=4), 2),                                 # loop 0 (no h_prev); the later loops
    ("melt", dict(cache_update="mean"), 2),                          # the loop index is a tensor: no graph per loop
    ("melt", dict(init_latent="zero"), 2),
    ("loopcoder", dict(kv_window=3), 2),                             # loop 0; the gated window loops
]


def _graphs_and_logits(name: str, options: dict, loops: int, backend: str = "aot_eager"):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = _model(name, loops=loops, **options)
    ids = tokens(1, batch=2, length=12)
    eager = _decode(model, ids, 5, model.decode_step)
    compiled = _decode(model, ids, 5, Engine(model, compile=True, backend=backend).compiled_step())
    return torch._dynamo.utils.counters["stats"]["unique_graphs"], compiled, eager


@pytest.mark.parametrize("name, options, kinds", DESIGNS)
def test_compiled_layers_match_eager_and_compile_once_at_any_depth(name, options, kinds):
    """fullgraph=True: a graph break (data-dependent Python, .item()) fails here. aot_eager traces
    as inductor does, without its slow C++ build. 7 decoded steps at 3 and at 6 loops: the same
    number of graphs, one per kind of layer application."""
    for loops in (3, 6):
        graphs, compiled, eager = _graphs_and_logits(name, options, loops)
        torch.testing.assert_close(compiled, eager, **TOL[torch.float32])
        assert graphs == kinds, (loops, graphs)


@pytest.mark.slow  # a cold inductor compile takes ~20 s on 2 cores
def test_inductor_compiled_layers_match_eager():
    """The real compiler (inductor: C++ kernels on CPU), with the fused projections it alone takes
    (Attention.fused_qkv, MLP.forward), on MELT (its two graphs: loop 0, the later loops; the
    aot_eager test above covers every design's capture); and the GPU's decode attention, attend_one,
    through inductor's kernels."""
    graphs, compiled, eager = _graphs_and_logits("melt", dict(chunk_size=4), 3, backend="inductor")
    torch.testing.assert_close(compiled, eager, **TOL[torch.float32])
    assert graphs == 2
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    mask = torch.arange(40)[None, :] <= 30
    torch.testing.assert_close(torch.compile(attend_one, fullgraph=True)(q, k, v, mask), attend_one(q, k, v, mask))


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_decode_attention_for_the_compiler_equals_sdpa(backend):
    """attend_one (a compiled step's attention on a GPU) against SDPA's masked attention, grouped
    and not, with rows past the position masked: as written, and as the compiler traces it."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    run = attend_one if backend is None else torch.compile(attend_one, backend=backend, fullgraph=True)
    for heads, kv_heads in ((4, 2), (4, 4)):
        q, k, v = torch.randn(2, heads, 1, 8), torch.randn(2, kv_heads, 10, 8), torch.randn(2, kv_heads, 10, 8)
        mask = torch.arange(10)[None, :] <= 6
        expected = F.scaled_dot_product_attention(q, k.repeat_interleave(heads // kv_heads, 1),
                                                  v.repeat_interleave(heads // kv_heads, 1), attn_mask=mask)
        torch.testing.assert_close(run(q, k, v, mask), expected)


# -- the captured step: everything but the CUDA capture itself, on CPU --------------------------------

class ReplayByRerun(CapturedStep):
    """CapturedStep with the capture replaced: 'replaying' re-runs the step on the static buffers,
    which is what a CUDA graph of it does."""

    @staticmethod
    def record(run):
        out = [run()]
        return (lambda: out.__setitem__(0, run())), _Latest(out)


class _Latest:
    """Stands for the graph's output buffer: whatever the last replay wrote."""

    def __init__(self, box):
        self.box = box

    def __getattr__(self, name):
        return getattr(self.box[0], name)


@pytest.mark.parametrize("name, options", [("ouro", dict(kv_sharing="mean_loops")), ("melt", {}),
                                           ("loopcoder", dict(kv_window=3))])
def test_a_decode_step_run_twice_at_one_position_changes_nothing(name, options):
    """What capturing relies on: its warm-up runs the step at the real token and position before
    the replay runs it again. The second run must give the same logits and leave the same cache."""
    model = _model(name, **options)
    ids = tokens(3, batch=2, length=9)
    once, twice = model.new_cache(2, 9), model.new_cache(2, 9)
    for cache in (once, twice):
        model(ids[:, :6], cache=cache)
    pos = torch.tensor([6])
    expected = model.decode_step(ids[:, 6:7], once, pos)
    model.decode_step(ids[:, 6:7], twice, pos)
    torch.testing.assert_close(model.decode_step(ids[:, 6:7], twice, pos), expected, rtol=0, atol=0)
    for a, b in zip(once.buffers(), twice.buffers()):
        assert torch.equal(a, b)


def test_the_captured_step_replays_with_static_inputs_and_recaptures_on_a_new_cache():
    model = _model("ouro", kv_sharing="last_loop")
    ids = tokens(4, batch=2, length=12)
    step = ReplayByRerun(model.decode_step)
    eager = _decode(model, ids, 5, model.decode_step)
    assert step.captures == 0
    torch.testing.assert_close(_decode(model, ids, 5, step), eager, rtol=0, atol=0)
    assert step.captures == 1                     # 7 steps, one capture: token and position are copied in
    torch.testing.assert_close(_decode(model, ids, 5, step), eager, rtol=0, atol=0)
    assert step.captures == 2                     # a new cache: new addresses, so a new capture
    cache = model.new_cache(2, 12)
    for repeat in range(2):                       # a timed repeat: reset, prefill, decode on the same cache
        cache.reset()
        model(ids[:, :5], cache=cache)
        step(ids[:, 5:6], cache, torch.tensor([5]))
    assert step.captures == 3                     # the merged slots keep their addresses across reset()


def test_the_engine_captures_on_cuda_only():
    model = _model("standard")
    step = Engine(model, compile=True, backend="aot_eager").compiled_step()
    assert not isinstance(step, CapturedStep)     # on CPU the compiled layers run as they are


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_of_the_whole_step_equals_eager():
    """On a GPU: the step is one CUDA graph over inductor's kernels, for a looped design with
    every kind of layer application (MELT), and its greedy tokens are the eager step's."""
    torch._dynamo.reset()
    model = _model("melt", chunk_size=4).cuda()
    ids = tokens(5, batch=2, length=12).cuda()
    engine = Engine(model, compile=True)
    step = engine.compiled_step()
    assert isinstance(step, CapturedStep)
    eager = _decode(model, ids, 5, model.decode_step)
    torch.testing.assert_close(_decode(model, ids, 5, step), eager, **TOL[torch.float32])
    assert step.captures == 1
    cache = engine.new_cache(2, 12)
    logits = engine.prefill(ids[:, :5], cache)
    compiled = engine.decode(logits, cache, 5, 6)
    cache.reset()
    logits = engine.prefill(ids[:, :5], cache)
    assert torch.equal(engine.decode(logits, cache, 5, 6, eager=True), compiled)


def test_generate_uses_the_fast_step():
    model = _model("melt", chunk_size=4)
    prompt = tokens(0, batch=2, length=6)
    calls = []
    step = model.decode_step
    model.decode_step = lambda *a: calls.append(1) or step(*a)
    out = model.generate(prompt, max_new_tokens=4)
    assert out.shape == (2, 10) and len(calls) == 3


# -- MELT's fused gate ------------------------------------------------------------------------------
def test_fused_gate_is_the_papers_two_matrices(tmp_path):
    model = _model("melt")
    gate: LatentGate = model.model.latent_gates[0]
    d = model.config.hidden_size
    assert gate.proj.weight.shape == (d, 2 * d)
    assert sum(p.numel() for p in gate.parameters()) == 2 * d * d + d
    # state_dict and checkpoints keep W_z, b_z, U_z under the paper's names
    state = model.state_dict()
    keys = {k for k in state if k.startswith("model.latent_gates.0.")}
    assert keys == {f"model.latent_gates.0.{n}" for n in ("input_proj.weight", "input_proj.bias",
                                                          "state_proj.weight")}
    w_z, b_z, u_z = (state[f"model.latent_gates.0.{n}"] for n in ("input_proj.weight", "input_proj.bias",
                                                                  "state_proj.weight"))
    u, h_prev = torch.randn(2, 3, d), torch.randn(2, 3, d)
    z = torch.sigmoid(u @ w_z.T + b_z + h_prev @ u_z.T)
    torch.testing.assert_close(gate(u, h_prev, loop=1), z * h_prev + (1 - z) * u)
    # a checkpoint in the two-matrix layout loads into the fused gate exactly
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert torch.equal(loaded.model.latent_gates[0].proj.weight, gate.proj.weight)
    ids = tokens(0)
    assert torch.equal(loaded(ids), model(ids))
    # a partial gate is refused, not silently half-loaded
    state.pop("model.latent_gates.0.state_proj.weight")
    with pytest.raises(RuntimeError, match="latent_gates.0"):
        model.load_state_dict(state)


def test_parameter_count_unchanged_by_fusion():
    assert build_model("melt", "ouro-1.4b", device="meta").num_parameters() == 1_636_028_417
