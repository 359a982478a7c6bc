"""experiment=policy_quality on a tiny Ouro-format checkpoint with a tokenizer saved here and a text
from the repository: every training-free policy scores the text through its own cache path, the
per-loop LoopLM's score is the uncached model's, and the report gives the quality table, its plot
and the K/V drift."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter

import pandas as pd
import pytest
import torch

from conftest import ROOT
from models import OuroLM
from conftest import save_ouro_checkpoint

TEXT = ROOT / "docs" / "models.md"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny LoopLM in Ouro's format, with a word-level tokenizer of 256 words (the tiny size's
    vocabulary) made from the text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-ouro")
    save_ouro_checkpoint(folder)
    vocab = {"[UNK]": 0}
    for word, _ in Counter(TEXT.read_text().split()).most_common(255):
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sweep(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("policy_quality")
    run = subprocess.run([sys.executable, str(ROOT / "run_bench.py"), "-m", "experiment=policy_quality",
                          f"checkpoint={checkpoint}", f"text={TEXT}", "seq_len=48", "new_tokens=8",
                          f"hydra.sweep.dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return out, pd.read_csv(out / "table.csv")


def test_every_policy_scores_the_text(sweep):
    _, table = sweep
    assert set(table.policy) == {"standard", "per_loop", "last_loop", "first_loop", "mean_loops", "ring", "anchor",
                                 "first_writes"}
    assert (table.status == "ok").all() and (table.scored_tokens == 8).all()
    assert ((table.perplexity - table.nll.map(math.exp)).abs() < 1e-9).all()
    # the memory model predicts the scoring runs too
    assert (table.peak_decode_bytes == table.predicted_decode_bytes).all()
    assert (table.peak_prefill_bytes == table.predicted_prefill_bytes).all()


def test_the_per_loop_score_is_the_uncached_model_s_and_sharing_changes_it(sweep, checkpoint):
    from bench.measure.scored_text import encode

    _, table = sweep
    model = OuroLM.from_pretrained(checkpoint)
    ids = encode(str(checkpoint), str(TEXT), 56)
    with torch.inference_mode():
        log_p = torch.log_softmax(model(ids).float(), -1)[:, 47:-1].gather(2, ids[:, 48:, None])
    nll = table.set_index("policy").nll
    assert nll["per_loop"] == pytest.approx(-log_p.mean().item(), abs=1e-5)
    assert nll["last_loop"] != pytest.approx(nll["per_loop"], abs=1e-6)


def test_the_report_gives_quality_plot_and_drift(sweep):
    out, _ = sweep
    text = (out / "report.md").read_text()
    assert "## Quality on a text (scenario=score)" in text and "LoopLM first_writes" in text
    assert "How far each loop's K/V are from the last loop's and the first's" in text
    assert (out / "policy_quality.png").stat().st_size > 0
    drift = pd.concat(pd.read_csv(p) for p in out.rglob("drift.csv"))
    assert len(drift) == 2 * 2 * 3  # layers x (keys, values) x loops, for the per-loop LoopLM only


@pytest.mark.parametrize("args, message", [
    (["scenario=score"], "text: scenario=score needs a text to score"),
    (["scenario=score", "text=no/such.txt"], "text: no/such.txt: no such file"),
    ([f"text={TEXT}"], "text: set without scenario=score"),
    (["scenario=score", f"text={TEXT}"], "checkpoint: scenario=score needs a checkpoint"),
])
def test_bad_score_settings_are_one_line(args, message, capsys):
    from bench import config
    from bench.sweep import preflight

    config.register()
    with pytest.raises(SystemExit):
        preflight.preflight(["size=tiny", *args], str(ROOT / "conf"), "config")
    assert capsys.readouterr().err.startswith(f"run_bench.py: error: {message}")
