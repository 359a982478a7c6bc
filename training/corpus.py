"""The natural-text setting: Python source of the interpreter's own standard library, byte-level.

Nothing is downloaded. training/data/stdlib_files.txt lists the files (names relative to
sysconfig's stdlib folder): the top-level `.py` files present in CPython 3.10, 3.11, 3.12 and 3.13
alike, minus the platform-specific `_sysconfigdata_*`. Each file is in the training or the
held-out split by a fixed rule on its name (SPLIT_RULE), so the split does not depend on which
files a Python has, and the list records it. Sizes in the list are CPython 3.11.7's; another
version's files differ a little in content (the loader says so, and the numbers move with them).

TextData serves the training stream and the held-out windows in the interface of task.TaskData
(next_batch, reset, eval_tokens, eval_mask, spec), so the trainers run on it unchanged:
    training: random windows of seq_len bytes from the train files, each file preceded by
              END_OF_TEXT (the files joined into one stream)
    held-out: eval_size windows spread evenly over the held-out files' stream (fixed)
Every target that is a byte counts in the loss and in bits per byte; END_OF_TEXT targets do not.
"""

from __future__ import annotations

import logging
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .byte_tokenizer import END_OF_TEXT, END_OF_TEXT_STR, VOCAB_SIZE

log = logging.getLogger("train")
LIST_FILE = Path(__file__).resolve().parent / "data" / "stdlib_files.txt"
HELDOUT_MODULUS = 10


def split_of(name: str) -> str:
    """SPLIT_RULE: a file is held out when the CRC-32 of its name is 0 mod 10 (about one in ten)."""
    return "heldout" if zlib.crc32(name.encode()) % HELDOUT_MODULUS == 0 else "train"


@dataclass(frozen=True)
class Entry:
    name: str      # relative to the stdlib folder
    size: int      # bytes in CPython 3.11.7
    split: str     # train | heldout


def read_list(path: Path = LIST_FILE) -> list[Entry]:
    """The committed list: one 'name size split' line per file; '#' lines are comments."""
    entries = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, size, split = line.split()
            entries.append(Entry(name, int(size), split))
    return entries


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def load(split: str, root: Path | None = None, limit: int | None = None) -> list[bytes]:
    """The bytes of every listed file of `split` (train | heldout), in list order; `limit` keeps
    the first that many files (the tiny CI variant). Raises FileNotFoundError naming a missing file."""
    root = root or stdlib_dir()
    entries = [e for e in read_list() if e.split == split][:limit]
    texts, differ = [], 0
    for e in entries:
        path = root / e.name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {LIST_FILE.name} but not in this Python's stdlib")
        texts.append(path.read_bytes())
        differ += len(texts[-1]) != e.size
    if differ:
        log.info("corpus: %d of %d %s files differ in size from the list's (CPython 3.11.7)", differ,
                 len(entries), split)
    return texts


def join(texts: list[bytes]) -> torch.Tensor:
    """Files -> one stream of token ids [n] (int64): END_OF_TEXT, file 1, END_OF_TEXT, file 2, ..."""
    parts = []
    for t in texts:
        parts += [torch.tensor([END_OF_TEXT]), torch.frombuffer(bytearray(t), dtype=torch.uint8).long()]
    return torch.cat(parts)


def write_split(split: str, path: str | Path) -> int:
    """One UTF-8 text of a split's files, each preceded by END_OF_TEXT's string, so that the byte
    tokenizer reads it back as join(load(split)): the file `run_bench.py scenario=score text=PATH`
    scores a checkpoint on. -> bytes written."""
    text = "".join(END_OF_TEXT_STR + t.decode("utf-8") for t in load(split))
    Path(path).write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))


@dataclass(frozen=True)
class TextSpec:
    """The shape of one sequence (the fields of task.TaskSpec the pipelines read)."""
    seq_len: int = 256
    prompt_len: int = 128          # cached scoring: prefill this many, decode-step the rest
    vocab_size: int = VOCAB_SIZE

    @property
    def answer_len(self) -> int:
        return self.seq_len - self.prompt_len


def byte_mask(tokens: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: positions whose next token is a byte (not END_OF_TEXT); the last position has
    no next token in the window and is False."""
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, :-1] = tokens[:, 1:] != END_OF_TEXT
    return mask


class TextData:
    """Training windows (a stream seeded by `seed`, restartable with reset) and fixed held-out
    windows, in task.TaskData's interface."""

    def __init__(self, spec: TextSpec, seed: int, batch_size: int, eval_size: int, limit: int | None = None):
        self.spec, self.batch_size = spec, batch_size
        self.train = join(load("train", limit=limit))                      # [n_train]
        self.heldout = join(load("heldout", limit=limit))                  # [n_heldout]
        if len(self.heldout) < spec.seq_len or len(self.train) < spec.seq_len:
            raise ValueError(f"text.seq_len: {spec.seq_len} is longer than the corpus' held-out stream "
                             f"({len(self.heldout)} tokens); allowed: a shorter window")
        self.generator = torch.Generator().manual_seed(seed)
        self.eval_tokens = self.windows(self.heldout, eval_size)          # [eval_size, L]
        self.eval_mask = byte_mask(self.eval_tokens)

    def windows(self, stream: torch.Tensor, count: int) -> torch.Tensor:
        """`count` windows of seq_len, starts spread evenly from the stream's start to its end."""
        L = self.spec.seq_len
        starts = torch.linspace(0, len(stream) - L, count).long()                  # [count]
        return stream[starts[:, None] + torch.arange(L)]                           # [count, L]

    def reset(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (tokens [B, L] int64, loss mask [B, L] bool), windows at uniform random starts."""
        L = self.spec.seq_len
        starts = torch.randint(len(self.train) - L + 1, (self.batch_size,), generator=self.generator)
        tokens = self.train[starts[:, None] + torch.arange(L)]
        return tokens, byte_mask(tokens)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a split of the stdlib corpus as one text file.")
    parser.add_argument("split", choices=["train", "heldout"])
    parser.add_argument("path")
    args = parser.parse_args()
    print(f"{args.path}: {write_split(args.split, args.path)} bytes")
