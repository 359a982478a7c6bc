"""The whole experiment: teacher -> MELT variants and baselines -> checkpoints, table and plot.

    out_dir/checkpoints/<row>/   config.json + model.safetensors (the models' Hugging Face layout;
                                 run_bench.py checkpoint=PATH loads them)
    out_dir/table.csv, table.md  one row per model (docs/post-training.md, "Results")
    out_dir/accuracy.png         accuracy and KV bytes per token of every row
    out_dir/run.json             the settings and the wall times

The teacher is cached: a checkpoint trained with the same task, model, teacher, batch and seed
settings is reused (reuse_teacher), so ablations only pay for the MELT phases.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from bench.rows.files import atomic_file
from models import MeltLM, OuroLM, StandardLM, build_from_config, make_config
from models.causal_lm import CausalLM

from .config import VARIANTS, TrainConfig, task_spec
from .evaluate import evaluate
from .task import TaskData
from .trainer import Resume, Schedule, distill, train_lm

log = logging.getLogger("train")
SETTINGS_FILE = "train_settings.json"  # beside a checkpoint: what made it, and how long it took
PARTIAL_FILE = "partial.pt"            # a pretraining in progress (teacher.save_every), removed when done


def model_config(c: TrainConfig, arch: str, vocab_size: int):
    m = c.model
    options = {"chunk_size": c.melt.chunk_size} if arch == "melt" else {}
    return make_config(arch, "tiny", loops=m.loops, vocab_size=vocab_size, hidden_size=m.hidden_size,
                       intermediate_size=m.intermediate_size, num_hidden_layers=m.num_hidden_layers,
                       num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_attention_heads,
                       max_position_embeddings=m.max_position_embeddings, **options)


def teacher_identity(c: TrainConfig) -> dict:
    """The settings a pretrained checkpoint depends on (save_every does not change it; the text
    settings are named only for data=text, so the task's checkpoints keep their identity)."""
    teacher = {k: v for k, v in dataclasses.asdict(c.teacher).items() if k != "save_every"}
    ident = {"task": dataclasses.asdict(c.task), "model": dataclasses.asdict(c.model),
             "teacher": teacher, "batch_size": c.batch_size, "seed": c.seed, "device": c.device}
    if c.data != "hops":
        ident.update(data=c.data, text=dataclasses.asdict(c.text))
    return ident


def save_checkpoint(model: CausalLM, folder: Path, settings: dict) -> None:
    model.save_pretrained(folder)
    with atomic_file(folder / SETTINGS_FILE) as tmp, open(tmp, "w") as f:
        json.dump(settings, f, indent=1)


def pretrain(c: TrainConfig, arch: str, data: TaskData, folder: Path) -> tuple[CausalLM, float, bool]:
    """Train (or reuse) the teacher LoopLM or the standard model on the task's training stream.
    -> (model, training wall seconds, reused?)"""
    ident = {**teacher_identity(c), "arch": arch}
    cls = {"ouro": OuroLM, "standard": StandardLM}[arch]
    settings_file = folder / SETTINGS_FILE
    if c.reuse_teacher and settings_file.exists():
        saved = json.loads(settings_file.read_text())
        if saved.get("identity") == ident:
            log.info("%s: reusing %s (trained with the same settings in %.0f s)", arch, folder, saved["train_wall_s"])
            return cls.from_pretrained(folder, device=c.device), saved["train_wall_s"], True
    torch.manual_seed(c.seed)
    model = build_from_config(model_config(c, arch, data.spec.vocab_size), device=c.device)
    with torch.no_grad():
        model.init_weights(std=c.teacher.init_std)
    data.reset(c.seed)
    folder.mkdir(parents=True, exist_ok=True)
    if not c.reuse_teacher:                                      # start afresh, whatever was saved
        (folder / PARTIAL_FILE).unlink(missing_ok=True)
    resume = Resume(folder / PARTIAL_FILE, ident, c.teacher.save_every)
    start = time.perf_counter()
    train_lm(model, data, Schedule(c.teacher.steps, c.teacher.warmup, c.log_every), c.teacher.lr,
             exit_loss=c.teacher.exit_loss, what="teacher" if arch == "ouro" else "standard", resume=resume)
    wall = resume.wall_before + time.perf_counter() - start
    save_checkpoint(model, folder, {"identity": ident, "train_wall_s": wall})
    resume.done()
    return model, wall, False


def train_variant(c: TrainConfig, name: str, teacher: CausalLM, teacher_dir: Path, data: TaskData) -> tuple[MeltLM, float]:
    """MELT from the teacher's weights (fresh gates), post-trained as the variant says."""
    cache_update, interpolate, align, chunkwise = VARIANTS[name]
    torch.manual_seed(c.seed)                                    # the fresh gates' init
    student = MeltLM.from_pretrained(teacher_dir, device=c.device, chunk_size=c.melt.chunk_size,
                                     cache_update=cache_update)
    m = c.melt
    common = dict(lr_pretrained=m.lr_pretrained, lr_gate=m.lr_gate,
                  chunk_size=m.chunk_size if chunkwise else None, what=name)
    data.reset(c.seed + 1)                                       # every variant sees the same batches
    start = time.perf_counter()
    phase2_steps = m.phase2_steps
    if interpolate and m.phase1_steps:
        distill(student, teacher, data, Schedule(m.phase1_steps, m.warmup, c.log_every), phase=1, **common)
    else:
        phase2_steps += m.phase1_steps                           # the same step budget without phase 1
    if phase2_steps:
        distill(student, teacher, data, Schedule(phase2_steps, m.warmup, c.log_every), phase=2,
                align_weight=m.align_weight if align else 0.0, **common)
    return student, time.perf_counter() - start


def describe(name: str) -> str:
    cache_update, interpolate, align, chunkwise = VARIANTS[name]
    parts = [f"cache_update={cache_update}"]
    parts += [] if interpolate else ["no phase 1 (phase 2 gets its steps)"]
    parts += [] if align else ["phase 2 without attention alignment"]
    parts += [] if chunkwise else ["trained as one chunk (inference stays chunked)"]
    return "; ".join(parts)


def run(c: TrainConfig) -> list[dict]:
    """Run the pipeline of TrainConfig c (already resolved); returns the table's rows."""
    torch.set_num_threads(c.threads)
    start = time.perf_counter()
    out, spec = Path(c.out_dir), task_spec(c)
    ckpt = out / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    data = TaskData(spec, c.seed, c.batch_size, c.eval.eval_size)
    log.info("task: %d tokens per sequence (prompt %d, answer %d), vocabulary %d; MELT chunk %d",
             spec.seq_len, spec.prompt_len, spec.answer_len, spec.vocab_size, c.melt.chunk_size)
    rows: list[dict] = []

    def add(row: str, model: CausalLM, wall: float | None, checkpoint: Path | None, kv_per_token=None, **info):
        result = evaluate(model, spec, data.eval_tokens, data.eval_mask, c.eval.long_prompt_len)
        if kv_per_token is not None:
            result["kv_bytes_per_token"] = kv_per_token
        cfg = model.config
        rows.append({"row": row, "model": cfg.arch, "loops": cfg.loops,
                     "cache_update": cfg.cache_update if cfg.arch == "melt" else None,
                     "kv_sharing": cfg.kv_sharing if cfg.arch == "ouro" else None, **result,
                     "train_wall_s": None if wall is None else round(wall, 1),
                     "checkpoint": None if checkpoint is None else str(checkpoint), **info})
        log.info("%s: accuracy %.3f, held-out loss %.4f, KV %d B/token, peak %.2f MiB",
                 row, result["accuracy"], result["heldout_loss"], result["kv_bytes_per_token"],
                 result["peak_gen_bytes"] / 2**20)

    teacher_dir = ckpt / "teacher"
    teacher, wall, reused = pretrain(c, "ouro", data, teacher_dir)
    add("teacher", teacher, wall, teacher_dir, reused=reused)
    one_loop = OuroLM.from_pretrained(teacher_dir, device=c.device, loops=1)
    add("teacher, 1-loop exit", one_loop, None, teacher_dir,
        note="loops=1 of the teacher's weights" + (" (an exit the loss did not train)"
                                                    if c.teacher.exit_loss == "last" else ""))
    sharing = OuroLM.from_pretrained(teacher_dir, device=c.device, kv_sharing="last_loop")
    add("teacher, zero-shot last_loop sharing", sharing, None, teacher_dir,
        kv_per_token=one_loop.kv_bytes_per_token(),
        note="decode keeps the last loop's slots (the prefill holds all)")
    standard_dir = ckpt / "standard"
    standard, wall, reused = pretrain(c, "standard", data, standard_dir)
    add("standard (same parameters)", standard, wall, standard_dir, reused=reused)
    torch.manual_seed(c.seed)
    zero_shot = MeltLM.from_pretrained(teacher_dir, device=c.device, chunk_size=c.melt.chunk_size)
    add("melt, zero-shot (fresh gates, no post-training)", zero_shot, None, None)
    torch.manual_seed(c.seed)
    add("melt, random weights", build_from_config(model_config(c, "melt", spec.vocab_size), device=c.device),
        None, None, note="chance level")

    for name in c.variants:
        student, wall = train_variant(c, name, teacher, teacher_dir, data)
        folder = ckpt / name
        save_checkpoint(student, folder, {"variant": name, "train_wall_s": wall, "melt": dataclasses.asdict(c.melt)})
        add(name, student, wall, folder, note=describe(name))

    teacher_acc, teacher_kv = rows[0]["accuracy"], rows[0]["kv_bytes_per_token"]
    for r in rows:
        r["accuracy_vs_teacher"] = r["accuracy"] / teacher_acc if teacher_acc else None
        r["kv_vs_teacher"] = r["kv_bytes_per_token"] / teacher_kv
    total = time.perf_counter() - start
    write_results(out, rows, {"config": dataclasses.asdict(c), "pipeline_wall_s": round(total, 1)})
    log.info("done in %.0f s: %s", total, out / "table.md")
    return rows


COLUMNS = ["row", "accuracy", "accuracy_vs_teacher", "heldout_loss", "kv_bytes_per_token", "kv_vs_teacher",
           "peak_gen_bytes", "train_wall_s", "model", "loops", "cache_update", "kv_sharing", "note", "checkpoint"]


def write_results(out: Path, rows: list[dict], run_info: dict) -> None:
    """table.csv, table.md, accuracy.png and run.json, each written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    with atomic_file(out / "table.csv") as tmp:
        df.to_csv(tmp, index=False)
    shown = df.drop(columns=["checkpoint"]).copy()
    shown["peak_gen_MiB"] = (shown.pop("peak_gen_bytes") / 2**20).round(2)
    with atomic_file(out / "table.md") as tmp:
        tmp.write_text(shown.to_markdown(index=False, floatfmt=".3f") + "\n")
    with atomic_file(out / "run.json") as tmp:
        tmp.write_text(json.dumps(run_info, indent=1) + "\n")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.45 * len(df) + 1.5), sharey=True)
    y = range(len(df))[::-1]
    colors = ["tab:blue" if m == "melt" else "tab:orange" if m == "ouro" else "tab:gray" for m in df["model"]]
    ax1.barh(list(y), df["accuracy"], color=colors)
    ax1.set_yticks(list(y), df["row"])
    ax1.set_xlabel("exact-match accuracy (held-out, greedy generate)")
    ax1.axvline(0.95 * df["accuracy"].iloc[0], ls="--", c="k", lw=0.8, label="95 % of the teacher")
    ax1.legend(loc="lower right", fontsize=8)
    ax2.barh(list(y), df["kv_bytes_per_token"], color=colors)
    ax2.set_xlabel("KV cache bytes per token")
    fig.tight_layout()
    with atomic_file(out / "accuracy.png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
