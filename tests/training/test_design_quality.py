"""The cache policies post-trained like MELT (first_writes, loopcoder): their training forward
against the inference models, a distillation step, and the policies pipeline end to end."""

import pytest
import torch
from conftest import compose_train, save_random_looplm

from models import LoopCoderLM, OuroLM, make_config
from training.student import loop_forward, policy_forward
from training.task import TaskSpec, make_batch
from training.trainer import distill_loss, param_groups

SPEC = TaskSpec(num_symbols=6, chain=2, blocks=3, max_hops=2)   # 34 tokens


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A random 2-layer LoopLM of 3 loops, saved."""
    config = make_config("ouro", "tiny", loops=3, vocab_size=SPEC.vocab_size)
    return save_random_looplm(tmp_path_factory.mktemp("teacher"), config)


def _batch(n=3, seed=0):
    return make_batch(SPEC, n, torch.Generator().manual_seed(seed))


def _student(teacher_dir, policy):
    if policy == "first_writes":
        return OuroLM.from_pretrained(teacher_dir, kv_sharing="first_writes")
    student = LoopCoderLM.from_pretrained(teacher_dir, kv_window=5)
    with torch.no_grad():  # gates away from 0.5, so a wrong mix shows
        for gate in student.model.window_gates:
            gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
            gate.bias.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    return student


@pytest.mark.parametrize("policy", ["first_writes", "loopcoder"])
def test_training_forward_is_the_inference_model(teacher_dir, policy):
    """At alpha = 1 the training forward's last exit is the model's uncached forward, its chunked
    cached prefill and every exit is the model cut at that loop; at alpha = 0 it is the teacher,
    exit by exit and attention output by attention output."""
    student = _student(teacher_dir, policy)
    teacher = OuroLM.from_pretrained(teacher_dir)
    tokens, _ = _batch()
    with torch.no_grad():
        out = policy_forward(student, tokens, alpha=1.0)
        cache = student.new_cache(tokens.shape[0], tokens.shape[1])
        cached = student(tokens, cache=cache, chunk_size=7)
        torch.testing.assert_close(out.exit_logits[-1], student(tokens), rtol=0, atol=1e-5)
        torch.testing.assert_close(out.exit_logits[-1], cached, rtol=1e-5, atol=1e-4)  # fp32: chunks vs one call
        for loops in (1, 2):
            cut = type(student).from_pretrained(teacher_dir, loops=loops, **(
                {"kv_sharing": "first_writes"} if policy == "first_writes" else {"kv_window": 5}))
            cut.load_state_dict(student.state_dict())
            torch.testing.assert_close(out.exit_logits[loops - 1], cut(tokens), rtol=0, atol=1e-5)
        as_teacher = policy_forward(student, tokens, alpha=0.0, capture=True)
        ref = loop_forward(teacher, tokens, alpha=0.0, capture=True)
        for a, b in zip(as_teacher.exit_logits + as_teacher.attn_outputs, ref.exit_logits + ref.attn_outputs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert (out.exit_logits[-1] - ref.exit_logits[-1]).abs().max() > 1e-2   # alpha = 1 is not the teacher
        half = policy_forward(student, tokens, alpha=0.5).exit_logits[-1]
        assert (half - out.exit_logits[-1]).abs().max() > 1e-3 and (half - ref.exit_logits[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("policy", ["first_writes", "loopcoder"])
def test_a_distillation_step_lowers_the_loss(teacher_dir, policy):
    student = _student(teacher_dir, policy)
    teacher = OuroLM.from_pretrained(teacher_dir)
    groups = param_groups(student, 1e-3, 1e-2, 0.0)
    assert [g["name"] for g in groups] == (["pretrained"] if policy == "first_writes" else ["pretrained", "gate"])
    if policy == "loopcoder":
        assert {id(p) for p in groups[1]["params"]} == {id(p) for p in student.model.window_gates.parameters()}
    opt = torch.optim.AdamW(groups)
    tokens, mask = _batch(8)
    losses = []
    for _ in range(2):
        loss, parts = distill_loss(student, teacher, tokens, mask, alpha=1.0, chunk_size=None, align_weight=0.1)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(parts) == {"kd", "align"} and losses[1] < losses[0]


# -- the policies pipeline ------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("policies.teachers=[ouro,nope]", "policies.teachers: unknown teacher set 'nope'; allowed: ouro | last_exit"),
    ("policies.post_train=[last_exit]", "policies.post_train: ['last_exit'] names a set not in policies.teachers"),
    ("policies.window=57", "policies.window: 57 covers a whole sequence of the ouro teacher set (57 tokens)"),
    ("policies.ring=0", "policies.ring: got 0; allowed: an integer >= 1"),
    ("pipeline=nope", "pipeline: unknown value 'nope'; allowed: melt | policies"),
])
def test_bad_policies_settings_are_one_line(override, message):
    extra = ["policies.teachers=[ouro]"] if "post_train" in override else []
    with pytest.raises(ValueError) as e:
        compose_train("preset=policies", override, *extra)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_quick_policies_pipeline_end_to_end(tmp_path):
    """preset=policies_quick: every policy on both teacher sets, the post-trained ones on one, the
    exits, the drift and the run's settings written; a saved student is what was measured."""
    import json

    import pandas as pd

    from models.cache_policies import KV_SHARINGS
    from training.design_quality import COLUMNS, run

    c = compose_train("preset=policies_quick", f"out_dir={tmp_path}")
    run(c)
    df = pd.read_csv(tmp_path / "quality.csv")
    assert list(df.columns) == COLUMNS
    for teacher in ("ouro", "last_exit"):
        rows = df[df.teacher == teacher]
        zero = rows[rows.training == "zero-shot"]
        assert set(zero.policy) == set(KV_SHARINGS) - {"per_loop"} | {"loopcoder", "melt"}
        teacher_row = rows[rows.policy == "per_loop"].iloc[0]
        assert teacher_row.training == "pretrained" and teacher_row.accuracy_vs_teacher == 1.0
        by = {p: r for p, r in zero.set_index("policy").iterrows()}
        s = by["last_loop"].kv_bytes_per_token
        assert teacher_row.kv_bytes_per_token == c.model.loops * s == by["last_loop"].prefill_kv_bytes_per_token
        assert (by["ring"].kv_bytes_per_token, by["anchor"].kv_bytes_per_token) == (2 * s, 2 * s)
        assert by["loopcoder"].kv_fixed_bytes == (c.model.loops - 1) * c.policies.window * s
        assert set(rows[rows.training == "post-trained"].policy) == (
            {"melt", "first_writes", "loopcoder"} if teacher == "ouro" else set())
    exits = pd.read_csv(tmp_path / "exits.csv")
    assert len(exits) == 2 * c.model.loops
    drift = pd.read_csv(tmp_path / "drift.csv")
    assert set(drift.teacher) == {"ouro", "last_exit"} and set(drift.layer[drift.teacher == "ouro"]) == {0, 1}
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["pipeline_wall_s"] > 0 and info["config"]["pipeline"] == "policies"
    first_writes = df[(df.policy == "first_writes") & (df.training == "post-trained")].iloc[0]
    student = OuroLM.from_pretrained(first_writes.checkpoint)
    assert student.config.kv_sharing == "first_writes"
    from training.config import task_spec, teacher_config
    from training.design_quality import quality
    from training.task import TaskData

    spec = task_spec(teacher_config(c, "ouro"))
    data = TaskData(spec, c.seed, c.batch_size, c.eval.eval_size)
    assert quality(student, spec, data.eval_tokens)["accuracy"] == first_writes.accuracy
