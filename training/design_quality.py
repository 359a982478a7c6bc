"""The policies pipeline: what each looped KV-cache policy costs in quality, per teacher.

For every teacher set of policies.teachers (config.TEACHERS: a LoopLM trained its own way on its
own data, settings.py: the multi-hop task, the S3 products task or stdlib text), in out_dir:

    checkpoints/<set>/teacher/    the LoopLM (per-loop K/V), cached like train_melt.py's teacher
    checkpoints/<set>/standard/   the same layers run once, trained the same way
    checkpoints/<set>/<policy>/   melt, first_writes, loopcoder distilled from the teacher (sets
                                  of policies.post_train only)

Every checkpoint trained with the same settings is reused by a rerun, and a pretraining killed
midway continues from its last saved state (teacher.save_every): the pipeline resumes. Text
checkpoints carry the byte tokenizer. Over all sets:

    quality.csv, quality.md  one row per (teacher, policy, training): quality through the model's
                             own cached path (settings.Setting.quality: accuracy, held-out loss,
                             bits per byte on text), KV bytes per token at the task's size, training
                             time (columns: COLUMNS, documented in results/reference/policies/)
    exits.csv                the teacher cut after each loop: how usable every exit is
    drift.csv                bench.measure.drift.kv_drift of each teacher on held-out prompts: per layer and
                             loop, how far K/V move from the last loop's and from loop 0's
    run.json                 the settings and the wall times

Zero-shot rows: every training-free policy of models/cache_policies.py on the teacher's weights, plus
LoopCoder and MELT with their new gates at their initial values. Post-trained rows: MELT, the
MoR-style first_writes and LoopCoder, each distilled from the teacher with MELT's recipe (phase 1
interpolation, phase 2 KD + attention alignment; training/student.py has their forwards).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from bench.measure.drift import kv_drift
from bench.rows.files import atomic_file
from models import LoopCoderLM, MeltLM, OuroLM
from models.causal_lm import CausalLM
from models.cache_policies import KV_SHARINGS

from .config import POST_TRAINED, TEACHERS, TrainConfig, teacher_config
from .pipeline import SETTINGS_FILE, pretrain, save_checkpoint, teacher_identity, train_variant
from .settings import Setting, make_setting, task_quality
from .trainer import Schedule, distill

log = logging.getLogger("train")

COLUMNS = ["teacher", "policy", "training", "model", "kv_sharing", "kv_ring", "kv_anchor", "kv_window",
           "cache_update", "layers", "loops", "accuracy", "accuracy_vs_teacher", "heldout_loss", "bits_per_byte",
           "kv_bytes_per_token", "prefill_kv_bytes_per_token", "kv_fixed_bytes", "train_wall_s", "note",
           "checkpoint"]


quality = task_quality    # the task's accuracy and held-out loss (settings.Setting.quality for any data)


def kv_columns(model: CausalLM, seq_len: int) -> dict:
    """KV bytes per token of context after the prompt is in, during the prefill, and the bytes per
    sequence that do not grow with it (LoopCoder's window rings at the task's length)."""
    if isinstance(model, OuroLM):
        return {"kv_bytes_per_token": model.kv_decode_bytes(1, 1),
                "prefill_kv_bytes_per_token": model.kv_bytes_per_token(), "kv_fixed_bytes": 0}
    per_token = model.kv_bytes_per_token()
    return {"kv_bytes_per_token": per_token, "prefill_kv_bytes_per_token": per_token,
            "kv_fixed_bytes": model.kv_cache_bytes(1, seq_len) - seq_len * per_token}


def _policy_options(c: TrainConfig, policy: str) -> dict:
    p = c.policies
    return {"ring": {"kv_ring": p.ring}, "anchor": {"kv_anchor": p.anchor, "kv_ring": p.anchor_ring}}.get(policy, {})


def _describe(model: CausalLM) -> dict:
    cfg = model.config
    ouro = cfg.arch == "ouro"
    return {"model": cfg.arch, "kv_sharing": cfg.kv_sharing if ouro else None,
            "kv_ring": cfg.kv_ring if ouro and cfg.kv_sharing in ("ring", "anchor") else None,
            "kv_anchor": cfg.kv_anchor if ouro and cfg.kv_sharing == "anchor" else None,
            "kv_window": cfg.kv_window if cfg.arch == "loopcoder" else None,
            "cache_update": cfg.cache_update if cfg.arch == "melt" else None,
            "layers": cfg.num_hidden_layers, "loops": cfg.loops}


def post_train(c: TrainConfig, policy: str, teacher: CausalLM, teacher_dir: Path, data) -> tuple[CausalLM, float]:
    """MELT (pipeline.train_variant), first_writes or loopcoder from the teacher's weights, each
    distilled as MELT is: phase 1 (interpolated, KD), then phase 2 (KD + attention alignment), with
    MELT's steps, learning rates (LoopCoder's window gates take the gate rate) and batches.
    -> (the student, its training seconds)"""
    if policy == "melt":
        return train_variant(c, "melt", teacher, teacher_dir, data)
    if policy == "first_writes":
        student = OuroLM.from_pretrained(teacher_dir, device=c.device, kv_sharing="first_writes")
    else:
        student = LoopCoderLM.from_pretrained(teacher_dir, device=c.device, kv_window=c.policies.window)
    m = c.melt
    common = dict(lr_pretrained=m.lr_pretrained, lr_gate=m.lr_gate, chunk_size=None, what=policy)
    data.reset(c.seed + 1)                                       # the batches MELT sees
    start = time.perf_counter()
    if m.phase1_steps:
        distill(student, teacher, data, Schedule(m.phase1_steps, m.warmup, c.log_every), phase=1, **common)
    if m.phase2_steps:
        distill(student, teacher, data, Schedule(m.phase2_steps, m.warmup, c.log_every), phase=2,
                align_weight=m.align_weight, **common)
    return student, time.perf_counter() - start


def _load_student(policy: str, folder: Path, device: str) -> CausalLM:
    cls = {"melt": MeltLM, "first_writes": OuroLM, "loopcoder": LoopCoderLM}[policy]
    return cls.from_pretrained(folder, device=device)          # the policy's options are in its config


def post_trained(c: TrainConfig, policy: str, teacher: CausalLM, teacher_dir: Path, setting: Setting,
                 folder: Path) -> tuple[CausalLM, float, bool]:
    """post_train, or the student already in `folder` when it was trained from the same teacher
    settings with the same post-training settings (reuse_teacher). -> (student, seconds, reused?)"""
    ident = {"teacher": teacher_identity(c), "policy": policy, "melt": dataclasses.asdict(c.melt),
             "window": c.policies.window if policy == "loopcoder" else None}
    saved = folder / SETTINGS_FILE
    if c.reuse_teacher and saved.exists():
        info = json.loads(saved.read_text())
        if info.get("identity") == ident:
            log.info("%s: reusing %s (trained with the same settings in %.0f s)", policy, folder, info["train_wall_s"])
            return _load_student(policy, folder, c.device), info["train_wall_s"], True
    student, wall = post_train(c, policy, teacher, teacher_dir, setting.data)
    save_checkpoint(student, folder, {"identity": ident, "policy": policy, "train_wall_s": wall, "melt": dataclasses.asdict(c.melt)})
    setting.save_tokenizer(folder)
    return student, wall, False


def run_set(c: TrainConfig, name: str, out: Path, walls: dict[str, float],
            reused: list[str]) -> tuple[list[dict], list[dict], list[dict]]:
    """One teacher set -> (quality rows, exit rows, drift rows). Adds its wall times to walls
    ("<set>/<model>": training seconds, a reused checkpoint's saved ones; "<set>/evaluation") and
    the checkpoints it found already trained to reused."""
    c = teacher_config(c, name)
    setting = make_setting(c)
    spec, data = setting.spec, setting.data
    ckpt = out / "checkpoints" / name
    ckpt.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def add(policy: str, training: str, model: CausalLM, wall: float | None, checkpoint: Path | None, note: str = ""):
        started = time.perf_counter()
        row = {"teacher": name, "policy": policy, "training": training, **_describe(model),
               **setting.quality(model), **kv_columns(model, spec.seq_len),
               "train_wall_s": None if wall is None else round(wall, 1), "note": note,
               "checkpoint": None if checkpoint is None else str(checkpoint)}
        rows.append(row)
        walls[f"{name}/evaluation"] = round(walls.get(f"{name}/evaluation", 0.0) + time.perf_counter() - started, 1)
        log.info("%s / %s (%s): accuracy %.3f, held-out loss %.4f, KV %d B/token", name, policy, training,
                 row["accuracy"], row["heldout_loss"], row["kv_bytes_per_token"])

    def pretrained(arch: str) -> tuple[CausalLM, Path, float]:
        folder = ckpt / ("teacher" if arch == "ouro" else arch)
        model, wall, found = pretrain(c, arch, data, folder)
        setting.save_tokenizer(folder)
        walls[f"{name}/{folder.name}"] = round(wall, 1)
        reused.extend([f"{name}/{folder.name}"] if found else [])
        return model, folder, wall

    p, m = c.policies, c.model
    log.info("teacher set %s: %s", name, TEACHERS[name][1])
    log.info("%s: %d tokens per sequence (prompt %d), vocabulary %d; %d layers, d = %d, %d heads, %d loops; "
             "ring K=%d, anchor A=%d K=%d, loopcoder W=%d", name, spec.seq_len, spec.prompt_len, spec.vocab_size,
             m.num_hidden_layers, m.hidden_size, m.num_attention_heads, m.loops, p.ring, p.anchor, p.anchor_ring,
             p.window)
    teacher, teacher_dir, wall = pretrained("ouro")
    for policy in KV_SHARINGS:
        model = OuroLM.from_pretrained(teacher_dir, device=c.device, kv_sharing=policy, **_policy_options(c, policy))
        add(policy, "pretrained" if policy == "per_loop" else "zero-shot", model,
            wall if policy == "per_loop" else None, teacher_dir,
            "the teacher" if policy == "per_loop" else "the teacher's weights")
    add("loopcoder", "zero-shot", LoopCoderLM.from_pretrained(teacher_dir, device=c.device, kv_window=c.policies.window),
        None, teacher_dir, "the teacher's weights, window gates at zero (g = 0.5)")
    torch.manual_seed(c.seed)
    add("melt", "zero-shot", MeltLM.from_pretrained(teacher_dir, device=c.device, chunk_size=c.melt.chunk_size),
        None, None, "the teacher's weights, fresh latent gates")
    standard, standard_dir, wall = pretrained("standard")
    add("standard", "pretrained", standard, wall, standard_dir, "the same layers run once, trained the same way")

    if name in c.policies.post_train:
        for policy in POST_TRAINED:
            student, wall, found = post_trained(c, policy, teacher, teacher_dir, setting, ckpt / policy)
            walls[f"{name}/{policy}"] = round(wall, 1)
            reused.extend([f"{name}/{policy}"] if found else [])
            add(policy, "post-trained", student, wall, ckpt / policy, "distilled from the teacher (MELT's recipe)")

    teacher_acc = rows[0]["accuracy"]
    for r in rows:
        r["accuracy_vs_teacher"] = r["accuracy"] / teacher_acc if teacher_acc else None

    exits = []
    for loops in range(1, c.model.loops + 1):
        cut = OuroLM.from_pretrained(teacher_dir, device=c.device, loops=loops)
        exits.append({"teacher": name, "exit": loops, **setting.quality(cut)})
    drift = kv_drift(teacher, setting.prompts(c.policies.drift_size).to(c.device))
    log.info("%s: exit accuracies %s; keys' cosine to the last loop's, loop by loop (mean over layers) %s", name,
             " ".join(f"{e['accuracy']:.3f}" for e in exits),
             " ".join(f"{v:.2f}" for v in drift[drift.kind == "keys"].groupby("loop").cos_vs_last.mean()))
    drift.insert(0, "teacher", name)
    return rows, exits, drift.to_dict("records")


def run(c: TrainConfig) -> list[dict]:
    """The policies pipeline of TrainConfig c (already resolved); returns quality.csv's rows."""
    torch.set_num_threads(c.threads)
    start, cpu = time.perf_counter(), time.process_time()
    out = Path(c.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info("teacher sets %s", ", ".join(c.policies.teachers))
    rows, exits, drift, walls, reused = [], [], [], {}, []
    for name in c.policies.teachers:
        r, e, d = run_set(c, name, out, walls, reused)
        rows += r
        exits += e
        drift += d
    total = time.perf_counter() - start
    run_info = {"config": dataclasses.asdict(c),
                "teacher_sets": {t: {"settings": TEACHERS[t][0], "overrides": c.policies.overrides.get(t, {}),
                                     "what": TEACHERS[t][1]} for t in c.policies.teachers},
                "reused": reused, "walls_s": walls,
                "pipeline_wall_s": round(total, 1),
                # process CPU seconds: with threads=1, about the wall time on an otherwise idle core
                "pipeline_cpu_s": round(time.process_time() - cpu, 1)}
    write_results(out, rows, exits, drift, run_info)
    log.info("done in %.0f s: %s", total, out / "quality.md")
    return rows


def write_results(out: Path, rows: list[dict], exits: list[dict], drift: list[dict], run_info: dict) -> None:
    """quality.csv, quality.md, exits.csv, drift.csv and run.json, each written atomically."""
    import pandas as pd

    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    for column in ("kv_ring", "kv_anchor", "kv_window"):             # integers, empty where they do not apply
        df[column] = df[column].astype("Int64")
    with atomic_file(out / "quality.csv") as tmp:
        df.to_csv(tmp, index=False)
    shown = df[["teacher", "policy", "training", "accuracy", "accuracy_vs_teacher", "heldout_loss"]
               + (["bits_per_byte"] if df["bits_per_byte"].notna().any() else [])
               + ["kv_bytes_per_token", "train_wall_s"]].copy()
    # whole seconds; empty where the row was not trained
    shown["train_wall_s"] = pd.Series(["" if pd.isna(s) else round(s) for s in shown["train_wall_s"]],
                                      index=shown.index, dtype=object)
    with atomic_file(out / "quality.md") as tmp:
        tmp.write_text(shown.to_markdown(index=False, floatfmt=".3f") + "\n")
    with atomic_file(out / "exits.csv") as tmp:
        pd.DataFrame(exits).to_csv(tmp, index=False)
    with atomic_file(out / "drift.csv") as tmp:
        pd.DataFrame(drift).round(4).to_csv(tmp, index=False)
    with atomic_file(out / "run.json") as tmp:
        tmp.write_text(json.dumps(run_info, indent=1) + "\n")
