"""The fast decode path: the static-shape step equals the checked forward path, torch.compile
captures it whole and gives the same logits, and MELT's fused gate is the paper's two matrices."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from models.melt import LatentGate
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
    cache = model.new_cache(ids.shape[0], ids.shape[1]).mark_static()  # a no-op for eager code
    model(ids[:, :prompt_len], cache=cache)
    pos = torch.tensor([prompt_len])
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


@pytest.mark.parametrize("name, options", CASES)
def test_compiled_step_captures_whole_and_matches_eager(name, options):
    """fullgraph=True: a graph break (data-dependent Python, .item()) fails here. aot_eager traces
    the step as inductor does, without its slow C++ build."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = _model(name, **options)
    ids = tokens(1, batch=2, length=12)
    eager = _decode(model, ids, 5, model.decode_step)
    compiled = Engine(model, compile=True, backend="aot_eager").compiled_step()
    torch.testing.assert_close(_decode(model, ids, 5, compiled), eager, **TOL[torch.float32])
    # one graph for all 7 steps: the position is a tensor, so no step recompiles
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow  # a cold inductor compile takes ~30 s on 2 cores
def test_inductor_compiled_step_matches_eager():
    """The real compiler (inductor: C++ kernels on CPU), on one model (a cold compile takes tens of
    seconds on 2 cores; the aot_eager test above covers every model's capture)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = _model("standard")
    ids = tokens(2, batch=1, length=8)
    eager = _decode(model, ids, 6, model.decode_step)
    compiled = _decode(model, ids, 6, Engine(model, compile=True).compiled_step())
    torch.testing.assert_close(compiled, eager, **TOL[torch.float32])


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
