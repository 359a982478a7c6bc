"""Every looped KV-cache design in one table: what it keeps, what it costs in memory at Ouro-1.4B,
and what it costs in quality on the post-training task; and the memory-vs-quality frontier.

    python -m bench.report.frontier QUALITY_CSV [QUALITY_CSV ...] MEMORY_RESULTS [--out DIR]

QUALITY_CSV is the quality pipeline's table (train_melt.py preset=policies: one row per teacher
and design: accuracy, its ratio to the teacher, held-out loss, KV bytes per token at the task's
size, training time); several are put one after the other, each teacher set in one of them only.
MEMORY_RESULTS is a sweep of the same designs at Ouro-1.4B shapes, bfloat16, 32K tokens and 4 loops
under the fake probe (experiment=policies with those overrides). Writes
table.csv, table.md and frontier.png to DIR (default: QUALITY_CSV's folder): accuracy retained
against the KV bytes per token each design keeps at Ouro-1.4B, one panel per teacher set (two to a
row), one labelled point per design, the frontier (designs no other beats on both) drawn.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..rows.files import atomic_file, load_rows  # noqa: E402
from ..rows.labels import SOURCES, design_label  # noqa: E402
from .views import COLORS, save_figure  # noqa: E402

GB = 1e9


def memory_columns(memory: pd.DataFrame) -> pd.DataFrame:
    """Per design at Ouro-1.4B: KV bytes per token as allocated and while decoding (the cache after
    the prefill over its tokens: LoopCoder's windows spread over them), and the fake probe's peaks."""
    from models.cache_policies import POLICIES

    ok = memory[(memory.status == "ok")]
    rows = []
    for r in ok.to_dict("records"):
        tokens = r["batch"] * (r["seq_len"] + r["new_tokens"])
        policy = r["policy"]
        rows.append({"policy": policy, "design": design_label(r),
                     "source": POLICIES[policy].source if policy in POLICIES else SOURCES.get(policy, ""),
                     "ouro_kv_per_token": r["kv_bytes_analytic"] / tokens,
                     "ouro_kv_per_token_decode": r["kv_decode_bytes_analytic"] / tokens,
                     "ouro_prefill_peak_gb": r["peak_prefill_bytes"] / GB,
                     "ouro_decode_peak_gb": r["peak_decode_bytes"] / GB,
                     "ouro_point": f"{r['size']}, {r['dtype']}, {r['seq_len']} tokens", "ouro_loops": r["loops"]})
    return pd.DataFrame(rows).drop_duplicates("policy")


def table(quality: pd.DataFrame, memory: pd.DataFrame) -> pd.DataFrame:
    """quality.csv's rows with each design's memory at Ouro-1.4B beside them; `design` names the
    design at the task's sizes, `ouro_design` at the memory sweep's (they differ for LoopCoder's W)."""
    mem = memory_columns(memory).rename(columns={"design": "ouro_design"})
    joined = quality.merge(mem, on="policy", how="left", suffixes=("", "_memory"))
    joined.insert(joined.columns.get_loc("policy") + 1, "design",
                  [design_label(r) for r in quality.to_dict("records")])
    return joined.drop(columns=[c for c in joined.columns if c.endswith("_memory")])


def frontier(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The points no other point beats on both: less x (memory) and more y (quality)."""
    best = []
    for r in points.sort_values([x, y], ascending=[True, False]).to_dict("records"):
        if not best or r[y] > best[-1][y]:
            best.append(r)
    return pd.DataFrame(best)


MARKERS = {"zero-shot": ("o", "none"), "post-trained": ("o", None), "pretrained": ("s", None)}  # shape, face


def _spread(ys: list[float], gap: float, low: float = -0.04, high: float = 1.08) -> list[float]:
    """Label heights for points stacked at one x (ys ascending): in the same order, at least `gap`
    apart, as close to the points as that allows, within [low, high]."""
    placed = []
    for y in ys:  # push up past the label below
        placed.append(max(y, low) if not placed else max(y, placed[-1] + gap))
    for i in reversed(range(len(placed))):  # then down under the top and the label above
        placed[i] = min(placed[i], high if i == len(placed) - 1 else placed[i + 1] - gap)
    return placed


def plot(joined: pd.DataFrame, path: Path) -> None:
    """One panel per teacher set, two to a row: accuracy retained against the KV bytes per token
    each design keeps while decoding at Ouro-1.4B; hollow points zero-shot, filled post-trained,
    squares the pretrained models; the frontier drawn."""
    x, y = "ouro_kv_per_token_decode", "accuracy_vs_teacher"
    teachers = list(dict.fromkeys(joined.teacher))
    ncols = min(2, len(teachers))
    nrows = math.ceil(len(teachers) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 5.2 * nrows), sharey=True, squeeze=False)
    for ax in axes.flat[len(teachers):]:
        ax.set_visible(False)
    for ax, teacher in zip(axes.flat, teachers):
        rows = joined[(joined.teacher == teacher) & joined[x].notna()].copy()
        rows["mb"] = rows[x] / 1e6
        # Designs at (nearly) one x get their labels in a column right of the points, in y order.
        rows = rows.sort_values(["mb", y])
        for _, group in rows.groupby((rows.mb.diff().fillna(0) / rows.mb > 0.05).cumsum()):
            group = group.sort_values(y)
            heights = _spread(list(group[y]), gap=0.062)
            for r, label_y in zip(group.to_dict("records"), heights):
                shape, face = MARKERS.get(r["training"], ("o", None))
                color = COLORS.get(r["policy"], "tab:gray")
                ax.scatter(r["mb"], r[y], s=46, marker=shape, facecolors=face or color, edgecolors=color,
                           linewidths=1.4, zorder=3)
                name = r["design"].removeprefix("LoopLM ")
                text = name + (" (post-trained)" if r["training"] == "post-trained" else "")
                ax.annotate(text, (r["mb"], r[y]), xytext=(r["mb"] * 1.12, label_y), fontsize=7.5,
                            va="center", color=color, arrowprops=dict(arrowstyle="-", lw=0.5, color=color, alpha=0.6))
        front = frontier(rows, "mb", y)
        ax.step(front["mb"], front[y], where="post", color="k", lw=1, alpha=0.5, zorder=2, label="frontier")
        ax.set_xscale("log")
        ticks = sorted(set(round(v, 2) for v in rows.mb))
        ax.set_xticks(ticks, [f"{t:.2f}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlim(min(ticks) / 1.15, max(ticks) * 2.4)
        ax.set_ylim(-0.05, 1.12)
        ax.set_title(f"teacher: {teacher} ({TEACHER_NOTES.get(teacher, '')})", fontsize=9)
        ax.set_xlabel("KV cache MB per token while decoding (Ouro-1.4B, bf16, 32K tokens; log)")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("accuracy retained (of the per-loop teacher's)")
    handles = [plt.Line2D([], [], ls="", marker="o", mfc="none", mec="k", label="zero-shot (the teacher's weights)"),
               plt.Line2D([], [], ls="", marker="o", color="k", label="post-trained like MELT"),
               plt.Line2D([], [], ls="", marker="s", color="k", label="pretrained"),
               plt.Line2D([], [], color="k", alpha=0.5, label="frontier")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Every looped KV-cache design: memory against quality", fontsize=10)
    fig.tight_layout(rect=(0, 0.05 / nrows, 1, 1))
    save_figure(fig, path, dpi=120)


TEACHER_NOTES = {"ouro": "multi-hop lookups, loss at every exit, 2 layers",
                 "last_exit": "multi-hop lookups, loss at the last exit, 1 layer",
                 "depth": "S3 products, loss at every exit, 1 layer",
                 "text": "stdlib source, next byte, loss at every exit, 2 layers"}
COLUMNS_SHOWN = {"teacher": "teacher", "design": "design", "training": "training", "accuracy": "accuracy",
                 "accuracy_vs_teacher": "of teacher", "heldout_loss": "held-out loss",
                 "kv_bytes_per_token": "KV B/token (task)", "ouro_kv_per_token": "KV MB/token, prefill",
                 "ouro_kv_per_token_decode": "KV MB/token, decode", "ouro_prefill_peak_gb": "prefill peak GB",
                 "ouro_decode_peak_gb": "decode peak GB", "train_wall_s": "train s"}


def markdown(joined: pd.DataFrame) -> str:
    """The table as markdown, and which Ouro-1.4B point and settings its memory columns are from."""
    shown = joined[[c for c in COLUMNS_SHOWN if c in joined.columns]].copy()
    for column in ("ouro_kv_per_token", "ouro_kv_per_token_decode"):
        shown[column] = shown[column] / 1e6
    shown["train_wall_s"] = pd.Series(["" if pd.isna(v) else round(v) for v in shown["train_wall_s"]],
                                      index=shown.index, dtype=object)
    text = shown.rename(columns=COLUMNS_SHOWN).to_markdown(index=False, floatfmt=".3f") + "\n"
    points = sorted(set(joined.ouro_point.dropna()))
    differ = sorted({o for d, o in zip(joined.design, joined.ouro_design) if pd.notna(o) and d != o})
    if points:
        text += f"\nMemory columns (fake probe): {'; '.join(points)}, loops {int(joined.ouro_loops.max())}" + \
                (f"; there {', '.join(differ)} (conf/policy/)" if differ else "") + ".\n"
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report.frontier", description=__doc__.split("\n")[0])
    parser.add_argument("quality", nargs="+", help="quality.csv of the policies' post-training pipeline (one or more)")
    parser.add_argument("memory", help="results folder of the designs at Ouro-1.4B, 32K, fake probe")
    parser.add_argument("--out", help="where to write (default: the quality table's folder)")
    args = parser.parse_args(argv)
    missing = [p for p in args.quality if not Path(p).is_file()]
    if missing:
        parser.exit(2, f"{parser.prog}: error: {missing[0]}: no such file\n")
    tables = [pd.read_csv(p) for p in args.quality]
    seen: dict[str, str] = {}
    for path, df in zip(args.quality, tables):
        for teacher in dict.fromkeys(df.teacher):
            if teacher in seen:
                parser.exit(2, f"{parser.prog}: error: teacher set {teacher!r} is in both {seen[teacher]} and "
                               f"{path}; allowed: each teacher set in one QUALITY_CSV\n")
            seen[teacher] = path
    quality, memory = pd.concat(tables, ignore_index=True), load_rows(args.memory)
    if memory.empty:
        parser.exit(2, f"{parser.prog}: error: no result rows under {args.memory}\n")
    joined = table(quality, memory)
    out = Path(args.out or Path(args.quality[0]).parent)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "table.csv") as tmp:
        joined.to_csv(tmp, index=False)
    with atomic_file(out / "table.md") as tmp:
        tmp.write_text(markdown(joined))
    plot(joined, out / "frontier.png")
    print(markdown(joined))
    return 0


if __name__ == "__main__":
    sys.exit(main())
