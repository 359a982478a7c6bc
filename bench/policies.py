"""Every looped KV-cache design in one table: what it keeps, what it costs in memory at Ouro-1.4B,
and what it costs in quality on the post-training task; and the memory-vs-quality frontier.

    python -m bench.policies QUALITY_CSV MEMORY_RESULTS [--out DIR] [--teacher NAME]

QUALITY_CSV is the quality pipeline's table (train_melt.py preset=policies: one row per teacher
and design: accuracy, its ratio to the teacher, held-out loss, KV bytes per token at the task's
size, training time). MEMORY_RESULTS is a sweep of the same designs at Ouro-1.4B shapes, bfloat16,
32K tokens and 4 loops under the fake probe (experiment=policies with those overrides). Writes
table.csv, table.md and frontier.png to DIR (default: QUALITY_CSV's folder): accuracy retained
against the KV bytes per token each design keeps at Ouro-1.4B, one labelled point per design, the
frontier (designs no other beats on both) drawn.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .report import COLORS, LABELS, SOURCES, design_label, save_figure  # noqa: E402
from .results import atomic_file, load_rows  # noqa: E402

GB = 1e9


def memory_columns(memory: pd.DataFrame) -> pd.DataFrame:
    """Per design at Ouro-1.4B: KV bytes per token as allocated and while decoding (the cache after
    the prefill over its tokens: LoopCoder's windows spread over them), and the fake probe's peaks."""
    from models.policies import POLICIES

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
                     "ouro_point": f"{r['size']} {r['dtype']} {r['seq_len']} tokens loops {r['loops']} probe {r['probe']}"})
    return pd.DataFrame(rows).drop_duplicates("policy")


def table(quality: pd.DataFrame, memory: pd.DataFrame) -> pd.DataFrame:
    """quality.csv's rows with each design's memory at Ouro-1.4B beside them."""
    joined = quality.merge(memory_columns(memory), on="policy", how="left", suffixes=("", "_memory"))
    if "design" in quality.columns:
        joined = joined.drop(columns=[c for c in joined.columns if c.endswith("_memory")])
    return joined


def frontier(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The points no other point beats on both: less x (memory) and more y (quality)."""
    best = []
    for r in points.sort_values([x, y], ascending=[True, False]).to_dict("records"):
        if not best or r[y] > best[-1][y]:
            best.append(r)
    return pd.DataFrame(best)


def plot(joined: pd.DataFrame, path: Path, teacher: str) -> None:
    rows = joined[(joined.teacher == teacher) & joined.ouro_kv_per_token_decode.notna()]
    x, y = "ouro_kv_per_token_decode", "accuracy_vs_teacher"
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for r in rows.to_dict("records"):
        ax.scatter(r[x] / 1e6, r[y], s=40, color=COLORS.get(r["policy"], "tab:gray"), zorder=3)
        ax.annotate(LABELS.get(r["policy"], r["policy"]).removeprefix("LoopLM "), (r[x] / 1e6, r[y]), fontsize=8,
                    xytext=(5, 3), textcoords="offset points")
    front = frontier(rows, x, y)
    if len(front):
        ax.step(front[x] / 1e6, front[y], where="post", color="k", lw=1, alpha=0.6, label="frontier", zorder=2)
        ax.legend(fontsize=8, frameon=False, loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("KV cache MB per token while decoding, Ouro-1.4B shapes, bf16, 32K tokens (log)")
    ax.set_ylabel("accuracy retained (of the teacher's)")
    ax.set_title(f"Every looped KV-cache design: memory against quality (teacher: {teacher})", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


COLUMNS_SHOWN = {"teacher": "teacher", "design": "design", "accuracy": "accuracy",
                 "accuracy_vs_teacher": "of teacher", "heldout_loss": "held-out loss",
                 "kv_bytes_per_token": "KV B/token (task)", "ouro_kv_per_token": "KV MB/token Ouro-1.4B",
                 "ouro_kv_per_token_decode": "decoding", "ouro_prefill_peak_gb": "prefill peak GB",
                 "ouro_decode_peak_gb": "decode peak GB", "train_wall_s": "train s"}


def markdown(joined: pd.DataFrame) -> str:
    shown = joined[[c for c in COLUMNS_SHOWN if c in joined.columns]].copy()
    for column in ("ouro_kv_per_token", "ouro_kv_per_token_decode"):
        shown[column] = shown[column] / 1e6
    return shown.rename(columns=COLUMNS_SHOWN).to_markdown(index=False, floatfmt=".3f") + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.policies", description=__doc__.split("\n")[0])
    parser.add_argument("quality", help="quality.csv of the policies' post-training pipeline")
    parser.add_argument("memory", help="results folder of the designs at Ouro-1.4B, 32K, fake probe")
    parser.add_argument("--out", help="where to write (default: the quality table's folder)")
    parser.add_argument("--teacher", help="the teacher whose rows the frontier plots (default: the first)")
    args = parser.parse_args(argv)
    if not Path(args.quality).is_file():
        parser.exit(2, f"{parser.prog}: error: {args.quality}: no such file\n")
    quality, memory = pd.read_csv(args.quality), load_rows(args.memory)
    if memory.empty:
        parser.exit(2, f"{parser.prog}: error: no result rows under {args.memory}\n")
    joined = table(quality, memory)
    out = Path(args.out or Path(args.quality).parent)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "table.csv") as tmp:
        joined.to_csv(tmp, index=False)
    with atomic_file(out / "table.md") as tmp:
        tmp.write_text(markdown(joined))
    plot(joined, out / "frontier.png", args.teacher or joined.teacher.iloc[0])
    print(markdown(joined))
    return 0


if __name__ == "__main__":
    sys.exit(main())
