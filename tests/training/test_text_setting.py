"""The natural-text setting: the stdlib file list and its split, the byte tokenizer saved with
checkpoints, bits per byte, and resuming a pretraining from its saved state."""

import math

import pytest
import torch
from conftest import compose_train

from models import build_from_config, make_config
from training import byte_tokenizer
from training.corpus import LIST_FILE, TextData, TextSpec, byte_mask, join, load, read_list, split_of, stdlib_dir
from training.scoring import cached_quality, exit_bits_per_byte, summarize


def test_the_file_list_is_sorted_split_by_its_rule_and_present():
    entries = read_list()
    names = [e.name for e in entries]
    assert names == sorted(set(names)) and len(names) > 100
    assert all(e.split == split_of(e.name) for e in entries)              # the split is the rule's, reproducible
    assert all(e.size > 0 and "/" not in e.name and e.name.endswith(".py") for e in entries)
    held = [e for e in entries if e.split == "heldout"]
    assert 0.05 < sum(e.size for e in held) / sum(e.size for e in entries) < 0.25
    assert all((stdlib_dir() / n).is_file() for n in names)               # every file is in this Python
    assert LIST_FILE.read_text().startswith("#")


def test_the_split_is_by_file():
    train, held = load("train", limit=3), load("heldout", limit=2)
    entries = read_list()
    first = {s: [e.name for e in entries if e.split == s] for s in ("train", "heldout")}
    assert not set(first["train"]) & set(first["heldout"])
    assert train == [(stdlib_dir() / n).read_bytes() for n in first["train"][:3]]
    assert held == [(stdlib_dir() / n).read_bytes() for n in first["heldout"][:2]]
    stream = join(held)                                                    # EOT file1 EOT file2
    assert stream.tolist() == [256, *held[0], 256, *held[1]]


def test_text_data_windows_and_mask():
    spec = TextSpec(seq_len=32, prompt_len=20)
    data = TextData(spec, seed=0, batch_size=4, eval_size=5, limit=2)
    tokens, mask = data.next_batch()
    assert tokens.shape == (4, 32) and mask.dtype == torch.bool and not mask[:, -1].any()
    assert data.eval_tokens.shape == (5, 32)
    assert data.eval_tokens[0].tolist() == data.heldout[:32].tolist()    # the first window opens the stream
    assert data.eval_tokens[-1].tolist() == data.heldout[-32:].tolist()  # the last closes it
    data.reset(0)
    again, _ = data.next_batch()
    assert torch.equal(tokens, again)
    t = torch.tensor([[256, 65, 66, 256, 67]])
    assert byte_mask(t).tolist() == [[True, True, False, True, False]]    # END_OF_TEXT targets do not count


def test_byte_tokenizer_round_trip(tmp_path):
    from transformers import PreTrainedTokenizerFast

    byte_tokenizer.save(tmp_path)
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    text = "def f(x):\n\treturn x  # \u00e9 \u2211 \u65e5\u672c \x00\x7f\r\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok("a<|endoftext|>b", add_special_tokens=False)["input_ids"] == [97, byte_tokenizer.END_OF_TEXT, 98]
    assert len(tok) == byte_tokenizer.VOCAB_SIZE == 257
    source = (stdlib_dir() / read_list()[0].name).read_text(encoding="utf-8")
    assert tok(source, add_special_tokens=False)["input_ids"] == list(source.encode("utf-8"))


def test_bits_per_byte_by_hand():
    # targets with p = 1/2, 1/4, 1/8 (1, 2, 3 bits); the third is not a byte and does not count
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.125]]))
    hit = torch.tensor([[True, False, True]])
    mask = torch.tensor([[True, True, False]])
    out = summarize(logp, hit, mask)
    assert out["bits_per_byte"] == pytest.approx(1.5)
    assert out["heldout_loss"] == pytest.approx(1.5 * math.log(2))
    assert out["accuracy"] == 0.5


def test_cached_and_uncached_bits_per_byte_agree():
    """The per-loop LoopLM scored through prefill + decode steps gives the bits per byte of its
    uncached forward at the same positions; the exits' figures are each loop count's forward."""
    torch.manual_seed(0)
    config = make_config("ouro", "tiny", loops=3, vocab_size=257, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    model = build_from_config(config)
    with torch.no_grad():
        model.init_weights(std=0.2)
    tokens = torch.randint(256, (3, 24))
    tokens[1, 15] = byte_tokenizer.END_OF_TEXT
    p = 10
    cached = cached_quality(model, tokens, p, batch_size=2)
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).float(), -1)[:, p - 1:-1].gather(2, tokens[:, p:, None])[..., 0]
        hit = model(tokens)[:, p - 1:-1].argmax(-1) == tokens[:, p:]
    mask = byte_mask(tokens)[:, p - 1:-1]
    ref = summarize(logp, hit, mask)
    assert cached["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], rel=1e-5)
    assert cached["accuracy"] == ref["accuracy"]
    exits = exit_bits_per_byte(model, tokens, batch_size=2)
    for loops, e in enumerate(exits, start=1):                            # exit t: the model cut at t loops
        m = build_from_config(make_config("ouro", "tiny", loops=loops, **{k: getattr(config, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads")}))
        m.load_state_dict(model.state_dict())
        with torch.no_grad():
            lp = torch.log_softmax(m(tokens).float(), -1)[:, :-1].gather(2, tokens[:, 1:, None])[..., 0]
        full = summarize(lp, torch.ones_like(lp, dtype=torch.bool), byte_mask(tokens)[:, :-1])
        assert e["bits_per_byte"] == pytest.approx(full["bits_per_byte"], rel=1e-5)


# -- the text teacher set in the policies pipeline --------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("+policies.overrides.text.teacher.steps=0", "teacher.steps: text teacher set: got 0; allowed: an integer >= 1"),
    ("+policies.overrides.nope.teacher.steps=3", "policies.overrides: unknown teacher set 'nope'; allowed: "),
    ("+policies.overrides.text.teacher.nope=3", "policies.overrides.text.teacher.nope: not a setting of train_melt.py"),
    ("+policies.overrides.text.text.prompt_len=300", "text.prompt_len: text teacher set: 300 leaves nothing"),
    ("+policies.overrides.text.policies.window=256", "policies.window: 256 covers a whole sequence of the text"),
    ("data=nope", "data: unknown value 'nope'; allowed: hops | products | text"),
])
def test_bad_text_settings_are_one_line(override, message):
    with pytest.raises(ValueError) as e:
        compose_train("preset=text", override)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_text_quick_pipeline_end_to_end_and_resumed(tmp_path):
    """preset=text_quick: every design on the text teacher, bits per byte on every row, checkpoints
    that carry the byte tokenizer; a second run reuses every checkpoint and measures the same."""
    import json

    import pandas as pd
    from transformers import PreTrainedTokenizerFast

    from training.design_quality import run

    c = compose_train("preset=text_quick", f"out_dir={tmp_path}")
    run(c)
    df = pd.read_csv(tmp_path / "quality.csv")
    assert set(df.teacher) == {"text"} and df.bits_per_byte.notna().all()
    assert (df.bits_per_byte - df.heldout_loss / math.log(2)).abs().max() < 1e-9
    assert set(df[df.training == "post-trained"].policy) == {"melt", "first_writes", "loopcoder"}
    assert df[df.policy == "loopcoder"].kv_window.iloc[0] == 8                  # the set's own window
    for folder in sorted((tmp_path / "checkpoints" / "text").iterdir()):
        tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
        assert tok("x = 1\n", add_special_tokens=False)["input_ids"] == list(b"x = 1\n"), folder.name
        assert not (folder / "partial.pt").exists()
    exits = pd.read_csv(tmp_path / "exits.csv")
    assert list(exits.exit) == [1, 2, 3, 4] and exits.bits_per_byte.notna().all()
    run(c)
    info = json.loads((tmp_path / "run.json").read_text())
    assert sorted(info["reused"]) == sorted(f"text/{m}" for m in ("teacher", "standard", "melt", "first_writes",
                                                                   "loopcoder"))
    again = pd.read_csv(tmp_path / "quality.csv")
    pd.testing.assert_frame_equal(df.drop(columns="train_wall_s"), again.drop(columns="train_wall_s"))


def test_the_written_held_out_text_reads_back_as_the_held_out_stream(tmp_path):
    """python -m training.corpus heldout PATH: the text scenario=score reads, tokenized by the
    checkpoints' tokenizer, is exactly the stream the held-out windows come from."""
    from transformers import PreTrainedTokenizerFast

    from training.corpus import write_split

    byte_tokenizer.save(tmp_path / "tok")
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    size = write_split("heldout", tmp_path / "heldout.txt")
    text = (tmp_path / "heldout.txt").read_text(encoding="utf-8")
    assert size == len(text.encode("utf-8"))
    assert tok(text, add_special_tokens=False)["input_ids"] == join(load("heldout")).tolist()
