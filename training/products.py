"""The depth task (data=products): products of words in the symmetric group S3, block by block.

Vocabulary: the 6 elements of S3 (ids 0-5, 0 the identity), SEP, EQ, BOS, PAD. One sequence:

    BOS PAD .. PAD   SEP a1 .. am EQ r   SEP a1 .. am EQ r   ...        r = a1 a2 .. am in S3

Each block has m elements, m drawn uniformly from 1..max_hops, except the last, evaluated block,
which has max_hops (the earlier ones are the curriculum, as in task.py); blocks are right-aligned and the left is padded, so every sequence has the same length and the
evaluated answer r is its last token. The loss is on r (predicted at EQ). Evaluation prefills all
but the last max_hops + 3 tokens and feeds the rest (the evaluated block, at its longest) through
decode steps, so a decode-time cache policy is what composes the block (settings.Setting.quality).

Why it needs depth: S3 is not commutative, so r depends on the order of the elements, and no
shortcut through counts exists. A position can hold the product of the elements from its block's
SEP up to itself; one attention step to the previous token (read its product so far) and one lookup
in the fixed 6 x 6 table (compose with one's own element) extend that product by one element. SEP
stands for the identity, so the same step repeated is right at every loop count past m: a looped
model needs no loop counter, and after t loops it can answer blocks of up to t elements (EQ adds
no element). A model run once can gather a few elements with one head each and compose them in
its MLP, a table of 6^k entries for k elements: the task is meant to outgrow that within max_hops.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .task import TaskData

_PERMS = list(itertools.permutations(range(3)))      # S3 as permutations of (0, 1, 2); index 0 = identity
# TABLE[a, b] = the element a∘b: apply b, then a
TABLE = torch.tensor([[_PERMS.index(tuple(a[b[i]] for i in range(3))) for b in _PERMS] for a in _PERMS])


@dataclass(frozen=True)
class ProductsSpec:
    blocks: int = 8           # blocks per sequence; the last is evaluated
    max_hops: int = 4         # M: elements per block, drawn from 1..M

    SEP, EQ, BOS, PAD = 6, 7, 8, 9             # token ids after the 6 elements

    @property
    def vocab_size(self) -> int:
        return 10

    @property
    def seq_len(self) -> int:
        return 1 + self.blocks * (self.max_hops + 3)    # BOS, then blocks at their longest

    @property
    def answer_len(self) -> int:
        return self.max_hops + 3                          # decoded in evaluation; r is the last

    @property
    def prompt_len(self) -> int:
        return self.seq_len - self.answer_len


def product(elems: torch.Tensor) -> torch.Tensor:
    """elems [..., m] -> their product in S3 [...] (the left-most element applied last)."""
    out = elems[..., 0]
    for j in range(1, elems.shape[-1]):
        out = TABLE[out, elems[..., j]]
    return out


def make_batch(spec: ProductsSpec, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (tokens [B, L] int64, loss_mask [B, L] bool: the EQ positions, which predict r)."""
    B, K, M, L = batch_size, spec.blocks, spec.max_hops, spec.seq_len
    m = torch.randint(1, M + 1, (B, K), generator=generator)                    # elements per block
    m[:, -1] = M                                                                 # the evaluated block: the longest
    elems = torch.randint(6, (B, K, M), generator=generator)
    slot = torch.arange(M)
    # r: the product of the first m elements, with the unused slots as the identity (element 0)
    r = product(torch.where(slot < m[..., None], elems, 0))                      # [B, K]
    # a block as M + 3 slots: SEP, a1 .. aM, EQ, r; slots past the block's own end are dropped
    body = torch.cat([torch.full((B, K, 1), spec.SEP), elems, torch.full((B, K, 2), spec.EQ)], 2)
    j = torch.arange(M + 3)
    body = torch.where(j == m[..., None] + 1, spec.EQ, body)                     # EQ right after a_m
    body = torch.where(j == m[..., None] + 2, r[..., None], body)                # then r
    keep = j <= m[..., None] + 2                                                 # [B, K, M + 3]
    size = m + 3                                                                 # tokens per block
    start = L - size.flip(1).cumsum(1).flip(1)                                  # right-aligned blocks [B, K]
    pos = start[..., None] + j                                                   # [B, K, M + 3]
    tokens = torch.full((B, L), spec.PAD, dtype=torch.long)
    tokens[:, 0] = spec.BOS
    rows = torch.arange(B)[:, None, None].expand_as(pos)
    tokens[rows[keep], pos[keep]] = body[keep]
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[torch.arange(B)[:, None].expand(B, K), start + m + 1] = True           # EQ predicts r
    return tokens, mask


def last_block_size(spec: ProductsSpec, tokens: torch.Tensor) -> torch.Tensor:
    """Elements in each sequence's last block [B] (the depth the evaluated answer needs)."""
    last_sep = spec.seq_len - 1 - (tokens == spec.SEP).flip(1).long().argmax(1)
    return spec.seq_len - 3 - last_sep


class ProductsData(TaskData):
    """task.TaskData over products: the same seeded stream and held-out set, this task's batches."""

    make_batch = staticmethod(make_batch)
