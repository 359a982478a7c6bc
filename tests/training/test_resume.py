"""Resuming: a pretraining continued from its saved state equals an uninterrupted one, and the
policies pipeline reuses every checkpoint it already trained with the same settings."""

import pytest
import torch

from models import build_from_config, make_config
from training.task import TaskData, TaskSpec
from training.trainer import Resume, Schedule, train_lm

SPEC = TaskSpec(num_symbols=4, chain=2, blocks=2, max_hops=1)


def _model():
    torch.manual_seed(0)
    model = build_from_config(make_config("ouro", "tiny", loops=2, vocab_size=SPEC.vocab_size, hidden_size=32,
                                          intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=2))
    with torch.no_grad():
        model.init_weights(std=0.1)
    return model


class Interrupted(Exception):
    pass


class StopAfter(TaskData):
    """A data stream that fails at batch `stop` (a killed run)."""

    def __init__(self, stop):
        super().__init__(SPEC, 0, 4, 4)
        self.stop, self.calls = stop, 0

    def next_batch(self):
        self.calls += 1
        if self.calls == self.stop:
            raise Interrupted
        return super().next_batch()


def test_a_resumed_pretraining_equals_an_uninterrupted_one(tmp_path):
    sched = Schedule(steps=6, warmup=2, log_every=100)
    straight = _model()
    train_lm(straight, TaskData(SPEC, 0, 4, 4), sched, 1e-2, exit_loss="mean")

    path, ident = tmp_path / "partial.pt", {"run": 1}
    with pytest.raises(Interrupted):                      # killed during step 5, after the save at step 3
        train_lm(_model(), StopAfter(5), sched, 1e-2, exit_loss="mean", resume=Resume(path, ident, every=3))
    assert path.exists()
    other = Resume(path, {"run": 2})                      # other settings: starts afresh
    train_lm(_model(), TaskData(SPEC, 0, 4, 4), sched, 1e-2, exit_loss="mean", resume=other)
    assert other.wall_before == 0
    resumed, resume = _model(), Resume(path, ident, every=3)
    losses = train_lm(resumed, TaskData(SPEC, 0, 4, 4), sched, 1e-2, exit_loss="mean", resume=resume)
    assert len(losses) == 6 and resume.wall_before > 0
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    resume.done()
    assert not path.exists()
