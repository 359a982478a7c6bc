"""MELT post-training: the training forward against the real models, the losses, checkpoints, the
bench's checkpoint option and the quick pipeline end to end."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_random_looplm
from hydra import compose, initialize_config_dir

from bench.config import BenchConfig, ConfigError, resolve as bench_resolve
from bench.measure.point import measure
from models import MeltLM, OuroLM, build_from_config, make_config
from training import config as train_config
from training.student import loop_forward
from training.task import TaskData, TaskSpec, make_batch, targets
from training.trainer import distill_loss, exits_ce, param_groups

ROOT = Path(__file__).resolve().parents[2]
SPEC = TaskSpec(num_symbols=6, chain=2, blocks=3, max_hops=2)   # 34 tokens
train_config.register()


def _config(arch, **kw):
    return make_config(arch, "tiny", loops=3, vocab_size=SPEC.vocab_size, **kw)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A random LoopLM, saved."""
    return save_random_looplm(tmp_path_factory.mktemp("teacher"), _config("ouro"))


def _batch(n=3, seed=0):
    return make_batch(SPEC, n, torch.Generator().manual_seed(seed))


def _student(teacher_dir, **kw):
    torch.manual_seed(1)
    student = MeltLM.from_pretrained(teacher_dir, chunk_size=8, **kw)
    with torch.no_grad():  # gates far from their init, so a test cannot pass by z being ~0.5
        for p in student.model.latent_gates.parameters():
            p.normal_(0, 0.3)
    return student


def test_task_answers_are_the_hops_of_the_permutation():
    tokens, mask = _batch(4)
    n = SPEC.num_symbols
    for row, m in zip(tokens.tolist(), mask.tolist()):
        f = {}
        for b in row[1:1 + n]:
            key, value = divmod(b - n, n)
            f[key] = value
        assert sorted(f) == sorted(f.values()) == list(range(n))           # a permutation
        last = SPEC.seq_len - SPEC.block_len
        hops, y = row[last] - SPEC.hop_token(0), row[last + 1]
        assert hops == SPEC.max_hops
        for j in range(SPEC.chain):
            for _ in range(hops):
                y = f[y]
            assert row[last + 2 + j] == y
        assert sum(m) == SPEC.blocks * (SPEC.chain + 1)
    again, _ = _batch(4)
    assert torch.equal(tokens, again)                                         # deterministic


def test_alpha_0_equals_the_teacher(teacher_dir):
    """At alpha = 0 the student is exactly the LoopLM: every exit, every attention output, in any
    chunks, whatever the gates."""
    teacher = OuroLM.from_pretrained(teacher_dir)
    student = _student(teacher_dir)
    tokens, _ = _batch()
    with torch.no_grad():
        ref = teacher(tokens)
        t_out = loop_forward(teacher, tokens, alpha=0.0, capture=True)
        s_out = loop_forward(student, tokens, chunk_size=8, alpha=0.0, capture=True)
        melt = loop_forward(student, tokens, chunk_size=8, alpha=1.0)
    torch.testing.assert_close(t_out.exit_logits[-1], ref, rtol=0, atol=1e-5)
    for a, b in zip(s_out.exit_logits + s_out.attn_outputs, t_out.exit_logits + t_out.attn_outputs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)  # fp32: chunked vs one SDPA call
    assert (melt.exit_logits[-1] - ref).abs().max() > 1e-2                    # alpha = 1 is not the teacher


@pytest.mark.parametrize("cache_update", ["gated", "last", "mean", "ema", "scalar"])
def test_alpha_1_equals_melt_inference(teacher_dir, cache_update):
    """At alpha = 1 the training forward is MeltLM's chunked forward, and its cached generation's
    prefill, with the same chunks."""
    student = _student(teacher_dir, cache_update=cache_update)
    tokens, _ = _batch()
    with torch.no_grad():
        out = loop_forward(student, tokens, chunk_size=8, alpha=1.0)
        ref = student(tokens, chunk_size=8)
        cache = student.new_cache(tokens.shape[0], tokens.shape[1])
        cached = student(tokens, cache=cache, chunk_size=8)
    torch.testing.assert_close(out.exit_logits[-1], ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.exit_logits[-1], cached, rtol=0, atol=1e-5)


def test_one_chunk_equals_full_sequence_training(teacher_dir):
    """Chunk-wise training with one chunk gives the loss and gradients of a full-sequence pass
    (MeltLM's own forward over the whole sequence), while smaller chunks do not."""
    tokens, mask = _batch()
    target = targets(tokens, mask)

    def grads(fn):
        student = _student(teacher_dir)
        loss = torch.nn.functional.cross_entropy(fn(student).flatten(0, 1), target.flatten(), ignore_index=-100)
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in student.named_parameters()}

    full_loss, full = grads(lambda m: m(tokens, chunk_size=tokens.shape[1]))
    one_loss, one = grads(lambda m: loop_forward(m, tokens, chunk_size=tokens.shape[1]).exit_logits[-1])
    torch.testing.assert_close(one_loss, full_loss, rtol=0, atol=1e-6)
    for k in full:
        torch.testing.assert_close(one[k], full[k], rtol=1e-4, atol=1e-6, msg=k)
    chunked_loss, _ = grads(lambda m: loop_forward(m, tokens, chunk_size=8).exit_logits[-1])
    assert abs(chunked_loss - full_loss) > 1e-4


def test_interpolation_moves_from_the_teacher_to_melt(teacher_dir):
    """alpha * KV_MELT + (1 - alpha) * KV_LoopLM off the end points: a small alpha is the teacher
    (alpha = 0) up to O(alpha), an alpha near 1 is MELT, and halfway is neither. A swapped mix
    (alpha on the LoopLM's rows) would put alpha = 1e-4 next to MELT instead."""
    student = _student(teacher_dir)
    tokens, _ = _batch()
    with torch.no_grad():
        out = {a: loop_forward(student, tokens, chunk_size=8, alpha=a).exit_logits[-1]
               for a in (0.0, 1e-4, 0.5, 1 - 1e-4, 1.0)}
    apart = (out[1.0] - out[0.0]).abs().max()
    assert apart > 1e-2
    assert (out[1e-4] - out[0.0]).abs().max() < 1e-2 * apart
    assert (out[1 - 1e-4] - out[1.0]).abs().max() < 1e-2 * apart
    assert (out[0.5] - out[0.0]).abs().max() > 0.1 * apart and (out[0.5] - out[1.0]).abs().max() > 0.1 * apart


def test_one_training_step_lowers_the_loss(teacher_dir):
    teacher = OuroLM.from_pretrained(teacher_dir)
    student = _student(teacher_dir)
    tokens, mask = _batch(8)
    groups = param_groups(student, 1e-3, 1e-2, 0.0)
    assert [g["name"] for g in groups] == ["pretrained", "gate"]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in student.model.latent_gates.parameters()}
    opt = torch.optim.AdamW(groups)
    losses = []
    for _ in range(2):
        loss, parts = distill_loss(student, teacher, tokens, mask, alpha=1.0, chunk_size=8, align_weight=0.1)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(parts) == {"kd", "align"}
    assert losses[1] < losses[0]
    # The teacher's own pretraining step, too.
    teacher.train()
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-3)
    ce = [exits_ce(loop_forward(teacher, tokens, alpha=0.0), targets(tokens, mask)) for _ in range(1)]
    opt.zero_grad()
    ce[0].backward()
    opt.step()
    assert exits_ce(loop_forward(teacher, tokens, alpha=0.0), targets(tokens, mask)) < ce[0]


def test_checkpoint_round_trip_and_bench_loads_it(teacher_dir, tmp_path):
    student = _student(teacher_dir, cache_update="gated")
    student.save_pretrained(tmp_path / "melt")
    loaded = MeltLM.from_pretrained(tmp_path / "melt")
    assert loaded.config.chunk_size == 8 and loaded.config.cache_update == "gated"
    for (k, a), (k2, b) in zip(student.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    tokens, _ = _batch()
    with torch.no_grad():
        assert torch.equal(student.generate(tokens[:, :20], 4), loaded.generate(tokens[:, :20], 4))
    # run_bench's checkpoint=PATH: the row measures these weights.
    point = bench_resolve(BenchConfig(model="melt", size="tiny", loops=3, seq_len=40, new_tokens=2, repeats=1,
                                      warmup=0, checkpoint=str(tmp_path / "melt")))
    assert point.checkpoint == str(tmp_path / "melt")
    row = measure(point)
    assert row["status"] == "ok", row["error"]
    assert row["checkpoint"] == str(tmp_path / "melt")
    assert (row["chunk_size"], row["cache_update"], row["loops"]) == (8, "gated", 3)  # the checkpoint's
    assert row["weights_bytes"] == loaded.weights_bytes()


@pytest.mark.parametrize("value, problem", [("/nonexistent", "no such folder"), ("EMPTY", "has no config.json")])
def test_bench_refuses_a_bad_checkpoint(value, problem, tmp_path):
    with pytest.raises(ConfigError, match=f"^checkpoint: .*{problem}; allowed: "):
        bench_resolve(BenchConfig(model="melt", size="tiny", checkpoint=str(tmp_path) if value == "EMPTY" else value))


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "train"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("override, field", [
    ("variants=[melt,nope]", "variants"), ("task.num_symbols=1", "task.num_symbols"),
    ("melt.lr_gate=0", "melt.lr_gate"), ("device=tpu", "device"), ("teacher.steps=0", "teacher.steps"),
    ("eval.long_prompt_len=5000", "model.max_position_embeddings"),
])
def test_bad_settings_are_one_line_naming_the_field(override, field):
    with pytest.raises(ValueError) as e:
        train_config.resolve(_compose(override))
    assert str(e.value).startswith(f"{field}: ") and "; allowed: " in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "train_melt.py"), "preset=quick", f"out_dir={out}",
                           "melt.chunk_size=0", f"hydra.run.dir={tmp_path / 'hydra'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == "train_melt.py: error: melt.chunk_size: got 0; allowed: an integer >= 1\n"
    assert not out.exists() and not (tmp_path / "hydra").exists()


@pytest.mark.parametrize("bad, line", [
    ("melt.chunk_size=abc", "melt.chunk_size: Value 'abc' of type 'str' could not be converted to Integer; allowed: "),
    ("nosuch=1", "nosuch: not a setting of train_melt.py; allowed: out_dir, "),
    ("preset=nope", "preset: unknown value 'nope'; allowed: ablations | depth | depth_quick | policies | policies_quick | quality | quick | text | text_quick"),
])
def test_preflight_makes_hydra_errors_one_line(capsys, bad, line):
    sys.path.insert(0, str(ROOT))
    try:
        import train_melt
    finally:
        sys.path.remove(str(ROOT))
    with pytest.raises(SystemExit) as e:
        train_melt.preflight([bad])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"train_melt.py: error: {line}")


def test_quick_pipeline_end_to_end(tmp_path):
    """The quick preset runs the whole pipeline; its MELT beats a randomly initialised MELT."""
    from training.evaluate import evaluate
    from training.pipeline import model_config, run

    c = train_config.resolve(_compose("preset=quick", f"out_dir={tmp_path}"))
    rows = {r["row"]: r for r in run(c)}
    for name in ("table.csv", "table.md", "accuracy.png", "run.json"):
        assert (tmp_path / name).stat().st_size > 0
    melt = rows["melt"]
    assert melt["kv_bytes_per_token"] * c.model.loops == rows["teacher"]["kv_bytes_per_token"]
    trained = MeltLM.from_pretrained(melt["checkpoint"])
    torch.manual_seed(0)
    random = build_from_config(model_config(c, "melt", trained.config.vocab_size))
    data = TaskData(train_config.task_spec(c), c.seed, c.batch_size, c.eval.eval_size)
    chance = evaluate(random, data.spec, data.eval_tokens, data.eval_mask, 16)
    again = evaluate(trained, data.spec, data.eval_tokens, data.eval_mask, 16)
    assert again["accuracy"] == melt["accuracy"]                              # the checkpoint is what was measured
    assert melt["heldout_loss"] < chance["heldout_loss"] - 0.1
    assert melt["accuracy"] > chance["accuracy"]


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "conf" / "train" / "preset").glob("*.yaml")))
def test_every_preset_composes_and_resolves(preset):
    c = train_config.resolve(_compose(f"preset={preset}"))
    assert c.variants and c.teacher.steps >= 1


def test_default_config_resolves_to_the_documented_pipeline():
    c = train_config.resolve(_compose())
    assert c.variants == ["melt"] and c.model.loops == 4 and c.device == "cpu"
    assert set(train_config.resolve(_compose("preset=ablations")).variants) == set(train_config.VARIANTS)


def test_ceilings_read_tables_written_before_the_checkpoint_column(tmp_path):
    """results/reference/cpu/table.csv predates the checkpoint identity column: still a results table."""
    from bench.gate.ceilings import load_results

    df = load_results(ROOT / "results" / "reference" / "cpu" / "table.csv")
    assert "checkpoint" in df.columns and df["checkpoint"].isna().all()
