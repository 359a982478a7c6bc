"""The depth task (training/products.py): the S3 table is a group's, and every generated block is
what the docstring says."""

import itertools

import torch

from training.products import TABLE, ProductsData, ProductsSpec, last_block_size, make_batch, product

SPEC = ProductsSpec(blocks=5, max_hops=4)


def test_the_table_is_s3():
    e = 0
    assert all(TABLE[e, a] == a and TABLE[a, e] == a for a in range(6))           # identity
    for a, b, c in itertools.product(range(6), repeat=3):                           # associative
        assert TABLE[TABLE[a, b], c] == TABLE[a, TABLE[b, c]]
    assert all(sorted(row.tolist()) == list(range(6)) for row in TABLE)            # every a has an inverse
    assert not torch.equal(TABLE, TABLE.T)                                          # not commutative


def _blocks(seq):
    """-> [(elements, answer, EQ position)] parsed from one sequence's token list."""
    out, i = [], seq.index(SPEC.SEP)
    while i < len(seq):
        assert seq[i] == SPEC.SEP
        eq = seq.index(SPEC.EQ, i)
        out.append((seq[i + 1:eq], seq[eq + 1], eq))
        i = eq + 2
    return out


def test_every_block_is_a_word_and_its_product():
    tokens, mask = make_batch(SPEC, 300, torch.Generator().manual_seed(3))
    assert tokens.shape == (300, SPEC.seq_len) and mask.dtype == torch.bool
    sizes, earlier = [], set()
    for row, m in zip(tokens.tolist(), mask):
        first = row.index(SPEC.SEP)
        assert row[0] == SPEC.BOS and set(row[1:first]) <= {SPEC.PAD}               # left padding only
        blocks = _blocks(row)
        assert len(blocks) == SPEC.blocks
        assert m.nonzero().flatten().tolist() == [eq for _, _, eq in blocks]      # the loss is at each EQ
        for elements, answer, _ in blocks:
            assert 1 <= len(elements) <= SPEC.max_hops and all(0 <= a < 6 for a in elements)
            assert answer == product(torch.tensor(elements)).item()
        sizes.append(len(blocks[-1][0]))
        earlier |= {len(b[0]) for b in blocks[:-1]}
        assert row[-1] == blocks[-1][1]                                              # the answer ends the sequence
    assert last_block_size(SPEC, tokens).tolist() == sizes == [SPEC.max_hops] * 300  # the evaluated block: the longest
    assert earlier == set(range(1, SPEC.max_hops + 1))                              # the curriculum: every size


def test_order_matters_and_the_answer_is_not_a_count():
    a, b = 1, 2
    assert TABLE[a, b] != TABLE[b, a]
    assert product(torch.tensor([a, b])) != product(torch.tensor([b, a]))


def test_batches_are_deterministic_and_held_out_is_its_own():
    data = ProductsData(SPEC, seed=0, batch_size=8, eval_size=16)
    first, _ = data.next_batch()
    data.reset(0)
    again, _ = data.next_batch()
    assert torch.equal(first, again)
    assert data.eval_tokens.shape == (16, SPEC.seq_len)
    assert not torch.equal(data.eval_tokens[:8], first)
    assert SPEC.prompt_len == SPEC.seq_len - SPEC.answer_len and SPEC.vocab_size == 10


def test_quick_depth_pipeline_end_to_end(tmp_path):
    """preset=depth_quick: every design on the products teacher; the evaluated block goes through
    decode steps, so the decode-time policies score differently from the per-loop cache."""
    from pathlib import Path

    import pandas as pd
    from hydra import compose, initialize_config_dir

    from training import config as train_config
    from training.design_quality import run

    train_config.register()
    root = Path(__file__).resolve().parents[2]
    with initialize_config_dir(config_dir=str(root / "conf" / "train"), version_base="1.3"):
        c = train_config.resolve(compose("config", overrides=["preset=depth_quick", f"out_dir={tmp_path}"]))
    run(c)
    df = pd.read_csv(tmp_path / "quality.csv").set_index(["policy", "training"])
    teacher = df.loc[("per_loop", "pretrained")]
    assert teacher.model == "ouro" and teacher.layers == 1 and pd.isna(teacher.kv_window)
    for policy in ("last_loop", "first_loop", "mean_loops"):
        assert df.loc[(policy, "zero-shot")].heldout_loss != teacher.heldout_loss
    assert {"melt", "first_writes", "loopcoder"} <= {p for p, t in df.index if t == "post-trained"}
    exits = pd.read_csv(tmp_path / "exits.csv")
    assert list(exits.exit) == [1, 2, 3, 4]
    assert exits.accuracy.iloc[-1] == teacher.accuracy                      # exit 4 is the teacher
