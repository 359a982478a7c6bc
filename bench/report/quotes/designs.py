"""The quotes of the cache designs' memory and quality: results/reference/policies (the multi-hop
task's teacher sets) and results/reference/quality (the depth and text sets)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .read import POLICIES, QUALITY, design_name, markdown_table, read_csv, value_at


# What each design keeps per layer (N layers, T loops); the formulas of models/cache_policies.py and the
# models' nbytes().
KEEPS = {"standard": "1 slot", "per_loop": "T slots", "last_loop": "T slots, 1 after the prefill",
         "first_loop": "T slots, 1 after the prefill", "mean_loops": "T slots, 1 after the prefill",
         "ring": "K slots", "anchor": "A + K slots", "first_writes": "1 slot (loop 0 writes)",
         "melt": "1 gated slot", "loopcoder": "1 slot + (T - 1) windows of W rows"}


def _policies(root: Path) -> pd.DataFrame:
    return read_csv(root / POLICIES / "table.csv")


# A design's two rows per teacher set: with the teacher's weights (trained, for the teacher and the
# standard model), then post-trained.
TRAININGS = (("zero-shot", "pretrained"), ("post-trained",))


def _accuracy(df: pd.DataFrame, policy: str, teacher: str, training: tuple[str, ...]) -> str:
    rows = df[(df.policy == policy) & (df.teacher == teacher) & df.training.isin(training)]
    return f"{float(rows.accuracy_vs_teacher.iloc[0]):.3f}" if len(rows) == 1 else ""


# The teacher sets trained like Ouro (the loss at every exit), one column each in the summary.
SETTINGS = {"ouro": "multi-hop lookups", "depth": "S3 products", "text": "stdlib source"}


def policies_summary(root: Path) -> str:
    """Per design: what it keeps, where it comes from, its KV cache per token while decoding and its
    decode peak at Ouro-1.4B, and on each setting the share of the per-loop teacher's accuracy it
    keeps: with the teacher's weights (zero-shot; trained for the teacher and the standard model),
    then post-trained where it was."""
    df = read_csv(root / QUALITY / "table.csv")
    rows = []
    for design in df.drop_duplicates("policy").itertuples():
        cells = []
        for teacher in SETTINGS:
            kept = [_accuracy(df, design.policy, teacher, training) for training in TRAININGS]
            cells.append(" → ".join(v for v in kept if v))
        rows.append([design_name(design.policy), KEEPS.get(design.policy, ""), design.source,
                     f"{design.ouro_kv_per_token_decode / 1e6:.3f}", f"{design.ouro_decode_peak_gb:.1f}", *cells])
    return markdown_table(["design", "keeps per layer", "from", "KV MB/token", "decode peak GB", *SETTINGS.values()],
                          rows, left=3)


def policies_memory(root: Path) -> str:
    """Per design at Ouro-1.4B (fake probe): KV per token in prefill and decode, both peaks."""
    df = _policies(root).drop_duplicates("policy")
    rows = [[design_name(d.policy), f"{d.ouro_kv_per_token / 1e6:.3f}", f"{d.ouro_kv_per_token_decode / 1e6:.3f}",
             f"{d.ouro_prefill_peak_gb:.2f}", f"{d.ouro_decode_peak_gb:.2f}"] for d in df.itertuples()]
    return markdown_table(["design", "KV MB/token, prefill", "KV MB/token, decode", "prefill peak GB",
                          "decode peak GB"], rows)


def policies_quality(root: Path) -> str:
    """Per design, under each teacher: the accuracy it keeps of the teacher's, with the teacher's
    weights (zero-shot; pretrained for the teacher and the standard model) and post-trained."""
    df = _policies(root)
    teachers = list(dict.fromkeys(df.teacher))
    rows = [[design_name(policy)] + [_accuracy(df, policy, teacher, training)
                                     for teacher in teachers for training in TRAININGS]
            for policy in dict.fromkeys(df.policy)]
    return markdown_table(["design", *[f"{t}: {w}" for t in teachers for w in ("zero-shot", "post-trained")]], rows)


def policies_drift(root: Path) -> str:
    """Each teacher's keys and values at loop 0 and the loop before the last, against the last
    loop's: cosine similarity over the tokens."""
    df = read_csv(root / POLICIES / "drift.csv")
    rows = []
    for (teacher, layer, kind), g in df.groupby(["teacher", "layer", "kind"], sort=False):
        last = g.loop.max()
        rows.append([teacher, str(layer), kind] + [f"{value_at(g, 'cos_vs_last', loop=t):.2f}" for t in range(last)])
    loops = int(df.loop.max())
    return markdown_table(["teacher", "layer", "kind", *[f"loop {t}" for t in range(loops)]], rows, left=3)


def policies_pipeline_wall(root: Path) -> str:
    seconds = json.loads((root / POLICIES / "run.json").read_text())["pipeline_wall_s"]
    return f"{round(seconds / 60)} min"


def quality_depth_sweep(root: Path) -> str:
    """The sweep that chose the depth setting: per run, its task and size, the teacher's accuracy
    at each exit, the standard model's and their ratio."""
    df = read_csv(root / QUALITY / "depth_sweep.csv")
    rows = [[r.task, str(r.symbols), str(r.hops), f"{r.layers} x d{r.width}, {r.heads} heads",
             str(r.steps), str(r.seed), r.exits.strip("[]"),
             "" if pd.isna(r.standard_acc) else f"{r.standard_acc:.3f}",
             "" if pd.isna(r.ratio) else f"{r.ratio:.2f}"] for r in df.itertuples()]
    return markdown_table(["task", "symbols", "hops / M", "layers", "steps", "seed", "teacher at exits 1..T",
                          "standard", "standard / teacher"], rows, left=4)


def quality_designs(root: Path) -> str:
    """Each design's share of the per-loop teacher kept, on the depth and the text settings, and
    the text's bits per byte."""
    depth = read_csv(root / QUALITY / "depth" / "quality.csv")
    text = read_csv(root / QUALITY / "text" / "quality.csv")
    rows = []
    for d, t in zip(depth.itertuples(), text.itertuples()):
        if (d.policy, d.training) != (t.policy, t.training):
            raise LookupError(f"rows differ: {d.policy} {d.training} / {t.policy} {t.training}")
        rows.append([design_name(d.policy), d.training, f"{d.accuracy_vs_teacher:.3f}",
                     f"{t.accuracy_vs_teacher:.3f}", f"{t.bits_per_byte:.3f}"])
    return markdown_table(["design", "training", "depth: retained", "text: retained (next byte)",
                          "text: bits per byte"], rows, left=2)


def quality_exits(root: Path) -> str:
    """The teachers cut at 1..T loops: depth accuracy, text bits per byte and accuracy."""
    depth = read_csv(root / QUALITY / "depth" / "exits.csv")
    text = read_csv(root / QUALITY / "text" / "exits.csv")
    rows = [[str(d.exit), f"{d.accuracy:.3f}", f"{t.bits_per_byte:.3f}", f"{t.accuracy:.3f}"]
            for d, t in zip(depth.itertuples(), text.itertuples())]
    return markdown_table(["loops", "depth: accuracy", "text: bits per byte", "text: next-byte accuracy"], rows)


def quality_text_drift(root: Path) -> str:
    """On text, each loop's K/V against the last loop's (cosine), per layer."""
    df = read_csv(root / QUALITY / "text" / "drift.csv")
    rows = []
    for (layer, kind), g in df.groupby(["layer", "kind"], sort=True):
        rows.append([str(layer), kind] + [f"{c:.3f}" for c in g.sort_values("loop").cos_vs_last])
    loops = sorted(df.loop.unique())
    return markdown_table(["layer", "kind"] + [f"loop {n}" for n in loops], rows, left=2)


def quality_from_empty_wall(root: Path) -> str:
    """`preset=quality` from an empty folder: the whole run's wall time, and its longest part."""
    run = json.loads((root / QUALITY / "from-empty" / "run.json").read_text())
    return (f"{run['pipeline_wall_s'] / 60:.0f} min (the text teacher "
            f"{run['walls_s']['text/teacher'] / 60:.0f} min of it)")
