"""What a teacher set's models learn and are scored on (TrainConfig.data): one interface for the
synthetic task and the stdlib text, so the policies pipeline runs either.

    hops      training/task.py: multi-hop lookups in a random permutation; quality = exact match
              of the generated answer block and the answer's NLL, through the model's own cache
    products  training/products.py: products of words in S3; quality = the answer's accuracy and
              NLL after its block went through decode steps
    text      training/corpus.py: stdlib Python source, byte-level; quality = next-byte accuracy,
              NLL and bits per byte of each held-out window's second part, through decode steps
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.causal_lm import CausalLM
from models.runtime import score

from .config import TrainConfig, sequence_spec
from .evaluate import accuracy


@torch.no_grad()
def task_quality(model: CausalLM, spec, tokens: torch.Tensor) -> dict:
    """Accuracy (exact match of the generated answer block) and held-out loss (mean negative
    log-likelihood of the answer tokens, teacher-forced through the model's own cached path: the
    prompt prefilled, every answer token fed through the decode step)."""
    nll = -score(model, tokens.to(model.device), spec.prompt_len).mean().item()
    return {"accuracy": accuracy(model, spec, tokens), "heldout_loss": nll}


def products_quality(model: CausalLM, spec, tokens: torch.Tensor) -> dict:
    """products: the answer r (the last token) predicted at EQ after the evaluated block went
    through the decode steps (scoring.cached_scores): its accuracy and NLL."""
    from .scoring import cached_scores

    logp, hit = cached_scores(model, tokens, spec.prompt_len)
    return {"accuracy": hit[:, -1].float().mean().item(), "heldout_loss": -logp[:, -1].mean().item()}


@dataclass
class Setting:
    kind: str                 # a key of config.DATA
    spec: object              # task.TaskSpec | corpus.TextSpec: seq_len, prompt_len, vocab_size
    data: object              # task.TaskData | corpus.TextData: training batches, eval_tokens [n, L]

    def quality(self, model: CausalLM) -> dict:
        """accuracy, heldout_loss (nats per scored token) and, on text, bits_per_byte."""
        if self.kind == "text":
            from .scoring import cached_quality

            return cached_quality(model, self.data.eval_tokens, self.spec.prompt_len)
        if self.kind == "products":
            return products_quality(model, self.spec, self.data.eval_tokens)
        return task_quality(model, self.spec, self.data.eval_tokens)

    def prompts(self, count: int) -> torch.Tensor:
        """The first `count` held-out prompts [count, prompt_len] (the K/V drift's input)."""
        return self.data.eval_tokens[:count, :self.spec.prompt_len]

    def save_tokenizer(self, folder) -> None:
        """Text checkpoints carry their tokenizer (scenario=score reads text with it)."""
        if self.kind == "text":
            from . import byte_tokenizer

            byte_tokenizer.save(folder)


def make_setting(c: TrainConfig) -> Setting:
    """The setting of config c (a teacher set's config, see config.teacher_config)."""
    spec = sequence_spec(c)
    if c.data == "text":
        from .corpus import TextData

        data = TextData(spec, c.seed, c.batch_size, c.eval.eval_size, limit=c.text.files or None)
    elif c.data == "products":
        from .products import ProductsData

        data = ProductsData(spec, c.seed, c.batch_size, c.eval.eval_size)
    else:
        from .task import TaskData

        data = TaskData(spec, c.seed, c.batch_size, c.eval.eval_size)
    return Setting(c.data, spec, data)
