"""The byte-level tokenizer of the text setting: token id = byte value (0..255), plus one special
token, END_OF_TEXT (256), that separates files.

Saved beside a checkpoint as `tokenizer.json` (the `tokenizers` library's format), so transformers'
PreTrainedTokenizerFast, and with it `run_bench.py scenario=score text=...`, reads text into the
same ids the model was trained on. The `tokenizers` byte-level pipeline maps every byte to a
printable character (GPT-2's table) before its model looks ids up; with a vocabulary of those 256
characters and no merges, one byte is one token, whose id is the byte's value.
"""

from __future__ import annotations

import json
from pathlib import Path

END_OF_TEXT = 256
END_OF_TEXT_STR = "<|endoftext|>"
VOCAB_SIZE = 257


def _byte_chars() -> list[str]:
    """The character the byte-level pre-tokenizer writes for each byte value, index = byte.
    Printable Latin-1 bytes stand for themselves; the others (controls, space, DEL, ...) take the
    code points 256, 257, ... in byte order (the table of GPT-2, which `tokenizers` implements)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build():
    """-> tokenizers.Tokenizer: bytes -> ids 0..255, END_OF_TEXT as a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in enumerate(_byte_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no splitting into words, so nothing but the byte mapping happens
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([END_OF_TEXT_STR])
    assert tok.token_to_id(END_OF_TEXT_STR) == END_OF_TEXT
    return tok


def save(folder: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build().save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000_000,
              "bos_token": None, "eos_token": END_OF_TEXT_STR, "unk_token": None, "pad_token": None,
              "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": END_OF_TEXT_STR}, indent=1) + "\n")
