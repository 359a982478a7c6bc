"""The text scenario=score reads: a UTF-8 file, tokenized by the checkpoint's own tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch


def encode(checkpoint: str, path: str, tokens: int) -> torch.Tensor:
    """The first `tokens` token ids of the text at `path`, as the checkpoint's tokenizer (its
    folder's tokenizer files, transformers' AutoTokenizer) reads it -> [1, tokens] int64.
    Raises ValueError naming the setting when the text is shorter or there is no tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from models.checkpoints import locate

    folder = locate(checkpoint)
    try:  # a fast tokenizer's own file when there is one: AutoTokenizer would read the model's config too
        if (folder / "tokenizer.json").is_file():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint: {checkpoint} has no tokenizer transformers can load ({str(e).splitlines()[0]}); "
                         "allowed: a checkpoint folder with tokenizer files (tokenizer.json, ...)") from None
    ids = tokenizer(Path(path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise ValueError(f"text: {path} is {len(ids)} tokens, fewer than seq_len + new_tokens = {tokens}; "
                         f"allowed: a longer text, or seq_len + new_tokens <= {len(ids)}")
    return torch.tensor([ids[:tokens]], dtype=torch.long)
