"""The synthetic task: multi-hop lookups in a random permutation given in the prompt.

Vocabulary: n symbols s, n*n binding tokens [k->v] (one token per binding, so one lookup is one
attention step), BOS, END and hop tokens H1..H{max_hops}. One sequence (all have the same length,
so batches need no padding):

    BOS [k1->v1] ... [kn->vn]           the bindings of a random permutation f, in random order
    Hh x y1 .. yq END                   a query block: h hops, a start symbol x, then the chain
    ...                                 y1 = f^h(x), y_j = f^h(y_{j-1})
    H{max_hops} x y1 .. yq END          the last block always asks max_hops hops

Every y_j needs h chained lookups from the token before it: a model cannot spread the hops over
generated tokens, it has to do them in depth (one attention step per lookup). A 1-layer model run
once (the default model's first exit) has one attention step; 4 loops have four. Caveat, seen in
the runs: with 8 symbols the 64 binding tokens fit in d = 64 dimensions, and a trained 1-layer
standard model still reaches about 0.9 exact match on 2 hops, presumably by gathering the whole
table in one attention step and composing in its MLP. Larger tables (12, 16 symbols) would close
that route, but the teacher did not learn them within a CPU budget of 2,000 steps.
Blocks before the last draw h from 1..max_hops, which gives the training signal a curriculum.

The evaluation prompt is a held-out sequence up to and including the last block's start symbol x;
the model must generate `y1 .. yq END` (exact match). y1 comes from the prefill, y2.. from the
decode steps, so both cache paths are exercised. Losses use only the chain positions (x .. yq,
predicting y1 .. END): bindings and starts are random, there is nothing to learn about them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TaskSpec:
    num_symbols: int = 16     # n: symbols, and bindings per sequence (a permutation of all of them)
    chain: int = 3            # q: generated symbols per query block
    blocks: int = 8           # query blocks per sequence; the last is the evaluated one
    max_hops: int = 3         # hops of the last block; earlier blocks draw 1..max_hops

    # Token ids: symbols, bindings, then the specials.
    def binding(self, key, value):
        return self.num_symbols + key * self.num_symbols + value

    @property
    def bos(self) -> int:
        return self.num_symbols * (self.num_symbols + 1)

    @property
    def end(self) -> int:
        return self.bos + 1

    def hop_token(self, hops):
        return self.bos + 1 + hops                  # H1 .. H{max_hops}

    @property
    def vocab_size(self) -> int:
        return self.bos + 2 + self.max_hops

    @property
    def block_len(self) -> int:
        return self.chain + 3                       # H, x, y1 .. yq, END

    @property
    def seq_len(self) -> int:
        return 1 + self.num_symbols + self.blocks * self.block_len

    @property
    def prompt_len(self) -> int:
        """Tokens up to and including the last block's start symbol."""
        return self.seq_len - self.answer_len

    @property
    def answer_len(self) -> int:
        return self.chain + 1                       # y1 .. yq and END


def make_batch(spec: TaskSpec, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (tokens [B, L] int64, loss_mask [B, L] bool). loss_mask marks the positions whose next
    token is a chain symbol or END, i.e. the positions that predict them (see `targets`)."""
    n, q = spec.num_symbols, spec.chain
    B, L = batch_size, spec.seq_len
    tokens = torch.empty(B, L, dtype=torch.long)
    predicts = torch.zeros(B, L, dtype=torch.bool)
    rows = torch.arange(B)[:, None]
    perm = torch.argsort(torch.rand(B, n, generator=generator), dim=1)          # f: [B, n]
    order = torch.argsort(torch.rand(B, n, generator=generator), dim=1)         # binding order
    tokens[:, 0] = spec.bos
    tokens[:, 1:1 + n] = spec.binding(order, perm[rows, order])
    pos = 1 + n
    for block in range(spec.blocks):
        if block == spec.blocks - 1:
            hops = torch.full((B,), spec.max_hops)
        else:
            hops = torch.randint(1, spec.max_hops + 1, (B,), generator=generator)
        symbol = torch.randint(n, (B,), generator=generator)                    # x
        tokens[:, pos] = spec.hop_token(hops)
        tokens[:, pos + 1] = symbol
        for j in range(q):                                                      # y_j = f^hops(y_{j-1})
            for h in range(1, spec.max_hops + 1):
                symbol = torch.where(hops >= h, perm[torch.arange(B), symbol], symbol)
            tokens[:, pos + 2 + j] = symbol
        tokens[:, pos + 2 + q] = spec.end
        predicts[:, pos + 1:pos + 2 + q] = True                                 # x .. y_q predict y_1 .. END
        pos += spec.block_len
    assert pos == L
    return tokens, predicts


def targets(tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Next-token targets [B, L] with -100 where no loss is taken (cross_entropy's ignore_index)."""
    out = torch.full_like(tokens, -100)
    out[:, :-1] = tokens[:, 1:]
    return out.masked_fill(~loss_mask, -100)


class TaskData:
    """Deterministic training batches (a stream seeded by `seed`, restartable with reset) and a
    fixed held-out set from its own generator (seed + 1,000,003). Another task's data is this class
    with its own `make_batch(spec, batch_size, generator) -> (tokens, loss_mask)`."""

    make_batch = staticmethod(make_batch)

    def __init__(self, spec, seed: int, batch_size: int, eval_size: int):
        self.spec, self.batch_size = spec, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.eval_tokens, self.eval_mask = self.make_batch(spec, eval_size,
                                                           torch.Generator().manual_seed(seed + 1_000_003))

    def reset(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.make_batch(self.spec, self.batch_size, self.generator)
