"""Losses, parameter groups and the three training loops: the teacher (or the standard model),
phase 1 (interpolated transition) and phase 2 (attention-aligned distillation).

Losses (positions: those that predict an answer or END; see task.targets):
  teacher / standard: cross-entropy of the last loop's exit (exit_loss=last), or averaged over
      all exits (exit_loss=mean, Ouro-like). With shared weights the mean asks every loop to
      give the answer already, which on this task keeps the teacher from using its depth (all
      exits end up equal); with `last` the exits improve loop by loop      (choice)
  KD:    KL(teacher || student) at every loop exit, averaged over exits and positions
  align: mean over (layer, loop) of the mean squared error between the student's and the frozen
         teacher's attention sub-layer outputs (all positions)
  phase 1: KD;  phase 2: KD + align_weight * align  (align_weight 0.1 as in the paper)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from models.causal_lm import CausalLM

from .student import LoopOutputs, loop_forward, training_forward
from .task import TaskData, targets

log = logging.getLogger("train")


EXIT_LOSSES = ("last", "mean")


def exits_ce(out: LoopOutputs, target: torch.Tensor, exit_loss: str = "mean") -> torch.Tensor:
    """Cross-entropy at the answer positions (target -100 elsewhere) of the last exit, or the mean
    over all loop exits."""
    exits = out.exit_logits[-1:] if exit_loss == "last" else out.exit_logits
    return torch.stack([F.cross_entropy(lg.flatten(0, 1), target.flatten(), ignore_index=-100)
                        for lg in exits]).mean()


def kd_loss(student: LoopOutputs, teacher: LoopOutputs, mask: torch.Tensor) -> torch.Tensor:
    """Mean over exits of KL(teacher || student) over the vocabulary, averaged over mask [B, L]."""
    losses = []
    for s, t in zip(student.exit_logits, teacher.exit_logits):
        log_q, log_p = F.log_softmax(s[mask].float(), -1), F.log_softmax(t[mask].float(), -1)   # [M, V]
        losses.append(F.kl_div(log_q, log_p, log_target=True, reduction="batchmean"))
    return torch.stack(losses).mean()


def align_loss(student: LoopOutputs, teacher: LoopOutputs) -> torch.Tensor:
    """Mean over (layer, loop) of MSE(o_student, stopgrad(o_teacher)), o [B, L, d]."""
    return torch.stack([F.mse_loss(s.float(), t.detach().float())
                        for s, t in zip(student.attn_outputs, teacher.attn_outputs)]).mean()


GATES = ("latent_gates", "window_gates")   # parameters a post-trained model adds to the LoopLM's


def param_groups(model: CausalLM, lr_pretrained: float, lr_gate: float, weight_decay: float) -> list[dict]:
    """Two groups: the LoopLM's weights (pretrained) and the new gates' (MELT's latent gates,
    LoopCoder's window gates), each its own lr; one group for a model without gates."""
    gate_ids = {id(p) for name in GATES if hasattr(model.model, name)
                for p in getattr(model.model, name).parameters()}
    pretrained = [p for p in model.parameters() if id(p) not in gate_ids]
    gate = [p for p in model.parameters() if id(p) in gate_ids]
    groups = [{"params": pretrained, "lr": lr_pretrained, "weight_decay": weight_decay, "name": "pretrained"}]
    if gate:
        groups.append({"params": gate, "lr": lr_gate, "weight_decay": 0.0, "name": "gate"})
    return groups


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Schedule:
    steps: int
    warmup: int = 0
    log_every: int = 50
    grad_clip: float = 1.0


def _optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, betas=(0.9, 0.95))


def _step(opt: torch.optim.Optimizer, model: CausalLM, loss: torch.Tensor, sched: Schedule, step: int) -> None:
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * lr_factor(step, sched.steps, sched.warmup)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), sched.grad_clip)
    opt.step()


def _progress(what: str, step: int, sched: Schedule, start: float, **values: float) -> None:
    if (step + 1) % sched.log_every and step + 1 != sched.steps and step != 0:
        return
    figures = " ".join(f"{k} {v:.4f}" for k, v in values.items())
    log.info("%s step %d/%d | %s | %.0f s", what, step + 1, sched.steps, figures, time.perf_counter() - start)


@dataclass
class Resume:
    """A long pretraining's state, saved every `every` steps to `path` (model, optimizer, step,
    losses, wall seconds so far and `identity`, the settings that made it). A run that finds a
    state with the same identity continues from it: the data stream is replayed to the same batch,
    so the result is the one an uninterrupted run gives. every = 0: never saved."""
    path: Path
    identity: dict
    every: int = 0
    wall_before: float = 0.0      # seconds of the run(s) the state came from, once loaded

    def load(self, model: CausalLM, opt: torch.optim.Optimizer) -> tuple[int, list[float]]:
        """-> (steps already done, their losses); (0, []) without a matching state."""
        if not self.path.exists():
            return 0, []
        state = torch.load(self.path, map_location=model.device, weights_only=False)
        if state["identity"] != self.identity:
            return 0, []
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        self.wall_before = state["wall_s"]
        log.info("resuming %s at step %d (%.0f s of training so far)", self.path.parent, state["step"], state["wall_s"])
        return state["step"], state["losses"]

    def save(self, model: CausalLM, opt: torch.optim.Optimizer, step: int, losses: list[float], wall: float) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save({"identity": self.identity, "step": step, "losses": losses, "wall_s": self.wall_before + wall,
                    "model": model.state_dict(), "optimizer": opt.state_dict()}, tmp)
        tmp.replace(self.path)

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


def train_lm(model: CausalLM, data: TaskData, sched: Schedule, lr: float, weight_decay: float = 0.0,
             exit_loss: str = "last", what: str = "teacher", resume: Resume | None = None) -> list[float]:
    """Pretrain a LoopLM (all loops in parallel over the full sequence) or the standard model on
    the task: CE averaged over loop exits. Returns the loss per step. With `resume`, continues a
    saved state of the same settings and saves its own every resume.every steps."""
    model.train()
    opt = _optimizer([{"params": list(model.parameters()), "lr": lr, "weight_decay": weight_decay}])
    first, losses = resume.load(model, opt) if resume else (0, [])
    for _ in range(first):                                  # replay the stream up to the saved step
        data.next_batch()
    start = time.perf_counter()
    for step in range(first, sched.steps):
        tokens, mask = (t.to(model.device) for t in data.next_batch())
        out = loop_forward(model, tokens, alpha=0.0)
        loss = exits_ce(out, targets(tokens, mask), exit_loss)
        _step(opt, model, loss, sched, step)
        losses.append(loss.item())
        _progress(what, step, sched, start, loss=losses[-1])
        if resume and resume.every and (step + 1) % resume.every == 0 and step + 1 < sched.steps:
            resume.save(model, opt, step + 1, losses, time.perf_counter() - start)
    model.eval()
    return losses


def distill_loss(student: CausalLM, teacher: CausalLM, tokens: torch.Tensor, mask: torch.Tensor, *,
                 alpha: float, chunk_size: int | None, align_weight: float) -> tuple[torch.Tensor, dict]:
    """The post-training loss on one batch: KD (+ align_weight * align when align_weight > 0).
    -> (loss, its parts as floats for the progress line)."""
    capture = align_weight > 0
    with torch.no_grad():
        t_out = loop_forward(teacher, tokens, alpha=0.0, capture=capture)
    s_out = training_forward(student, tokens, chunk_size=chunk_size, alpha=alpha, capture=capture)
    kd = kd_loss(s_out, t_out, mask)
    if not capture:
        return kd, {"kd": kd.item()}
    al = align_loss(s_out, t_out)
    return kd + align_weight * al, {"kd": kd.item(), "align": al.item()}


def distill(student: CausalLM, teacher: CausalLM, data: TaskData, sched: Schedule, *,
            lr_pretrained: float, lr_gate: float, chunk_size: int | None, phase: int,
            align_weight: float = 0.1, weight_decay: float = 0.0, what: str = "melt") -> list[float]:
    """One post-training phase (MELT, or a cache policy with a training forward: student.py).
    phase 1: alpha ramps linearly from 0 (first step) to 1 (last step), loss KD. phase 2: alpha = 1, loss KD + align_weight * align (align_weight 0 = the
    no-alignment ablation). chunk_size None: one chunk (the no-chunk-wise ablation)."""
    student.train()
    teacher.eval()
    opt = _optimizer(param_groups(student, lr_pretrained, lr_gate, weight_decay))
    start, losses = time.perf_counter(), []
    for step in range(sched.steps):
        tokens, mask = (t.to(student.device) for t in data.next_batch())
        alpha = step / max(1, sched.steps - 1) if phase == 1 else 1.0
        loss, parts = distill_loss(student, teacher, tokens, mask, alpha=alpha, chunk_size=chunk_size,
                                   align_weight=align_weight if phase == 2 else 0.0)
        _step(opt, student, loss, sched, step)
        losses.append(loss.item())
        _progress(f"{what} phase {phase}", step, sched, start, alpha=alpha, loss=losses[-1], **parts)
    student.eval()
    return losses
