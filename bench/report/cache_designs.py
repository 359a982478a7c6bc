"""The report's sections on cache designs: every design at the sweep's deepest loop count (table
and plot), and the quality of scored texts (scenario=score) with the K/V drift behind it."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..rows.files import DRIFT_FILE, with_legacy_columns  # noqa: E402
from ..rows.labels import SOURCES, design_label, policy_of_label  # noqa: E402
from .views import (COLORS, FAMILIES, MIB, ONE_PASS, POLICIES_PLOT, QUALITY_PLOT, policies_of,  # noqa: E402
                    save_figure, ticked_axis)


def policies_markdown(view: pd.DataFrame) -> str:
    """Per design at the deepest loop count and each length: its cache as allocated and after the
    prefill, its peaks, decode speed and the ratio of its peak to the per-loop LoopLM's."""
    from models.cache_policies import POLICIES

    ok = view[view.status == "ok"]
    deepest = ok[~ok.model.isin(ONE_PASS)].loops.max()
    order = {p: i for i, p in enumerate(policies_of(view))}
    rows = []
    for seq_len in sorted(ok.seq_len.unique()):
        at = ok[(ok.seq_len == seq_len) & ((ok.loops == deepest) | ok.model.isin(ONE_PASS))]
        at = at.iloc[sorted(range(len(at)), key=lambda i: order.get(at.policy.iloc[i], len(order)))]
        ref = at[at.policy == "per_loop"].peak_bytes
        for r in at.to_dict("records"):
            policy = r["policy"]
            rows.append({"seq_len": seq_len, "design": design_label(r),
                         "source": POLICIES[policy].source if policy in POLICIES else SOURCES.get(policy, ""),
                         "KV MiB": _in(r.get("kv_bytes_analytic"), MIB),
                         "KV after prefill MiB": _in(r.get("kv_decode_bytes_analytic"), MIB),
                         "prefill peak MiB": _in(r.get("peak_prefill_bytes"), MIB),
                         "decode peak MiB": _in(r.get("peak_decode_bytes"), MIB),
                         "peak / LoopLM's": r["peak_bytes"] / ref.iloc[0] if len(ref) else None,
                         "decode tok/s": r.get("decode_tokens_per_s")})
    table = pd.DataFrame(rows)
    lines = ["", f"## Every cache design at loops {deepest} ({POLICIES_PLOT})", "",
             "One row per design and length, at the deepest loop count of the sweep (the standard model"
             " runs once): the cache as allocated (`KV MiB`) and after the prefill (merging policies"
             " keep one slot per layer then), the prefill and decode peaks, and the peak against the"
             " per-loop LoopLM's at the same point. Sources: cache-policies.md.", "",
             table.to_markdown(index=False, floatfmt=".2f"), "",
             f"![every cache design against loop depth]({POLICIES_PLOT})", ""]
    return "\n".join(lines) + "\n"


def _in(value, unit: float):
    """value / unit, or None for a missing value."""
    return None if value is None or pd.isna(value) else value / unit


def plot_policies(view: pd.DataFrame, path: Path) -> None:
    """Peak memory against loops, one panel per family of designs (FAMILIES) and one row per
    length; the per-loop LoopLM (faint) and the standard model (dotted) in every panel as
    references. Solid: the point's peak; dashed: its decode peak."""
    seq_lens = sorted(view.seq_len.unique())
    families = [(name, members) for name, members in FAMILIES.items() if set(members) & set(view.policy)]
    fig, axes = plt.subplots(len(seq_lens), len(families), squeeze=False, sharey="row",
                             figsize=(3.9 * len(families) + 0.6, 3.2 * len(seq_lens) + 0.8))
    for row, seq_len in enumerate(seq_lens):
        rows = view[(view.seq_len == seq_len) & (view.status == "ok")]
        for col, (name, members) in enumerate(families):
            ax = axes[row][col]
            for policy in dict.fromkeys(("per_loop", *members)):
                s = rows[rows.policy == policy].sort_values("loops")
                if s.empty:
                    continue
                reference = policy not in members
                color = COLORS.get(policy)
                label = design_label(s.iloc[0]) + (" (reference)" if reference else "")
                ax.plot(s.loops, s.peak_bytes / MIB, "o-", color=color, alpha=0.35 if reference else 1,
                        label=label, ms=3 if reference else 4)
                if not reference:
                    ax.plot(s.loops, s.peak_decode_bytes / MIB, "--", color=color, lw=1)
            standard = rows[rows.policy == "standard"]
            if len(standard):
                ax.axhline(standard.peak_bytes.iloc[0] / MIB, color=COLORS["standard"], ls=":", label="standard")
            ticked_axis(ax, rows.loops, log2=False)
            ax.set_title(f"{name}\nseq_len {seq_len}" if row == 0 else f"seq_len {seq_len}", fontsize=9)
            ax.set_xlabel("loops")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.legend(fontsize=7, frameon=False, loc="upper left")
        axes[row][0].set_ylabel("peak memory (MiB)")
    fig.suptitle("Every cache design against loop depth (solid: peak; dashed: decode peak)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)



# -- scored texts: what each design costs in quality ------------------------------------------------

def quality_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per scored design (scenario=score): the text's negative log-likelihood and perplexity over
    the scored tokens, against the per-loop LoopLM's, beside its cache per token."""
    ok = with_legacy_columns(df[(df.status == "ok") & df.nll.notna()].copy())
    order = {p: i for i, p in enumerate(policies_of(ok))}
    rows = []
    for r in sorted(ok.to_dict("records"), key=lambda r: order.get(r["policy"], len(order))):
        ref = ok[(ok.policy == "per_loop") & (ok.checkpoint == r["checkpoint"]) & (ok.text == r["text"])]
        length = r["seq_len"] + r["new_tokens"]
        rows.append({"design": design_label(r), "loops": r["loops"], "scored tokens": r["scored_tokens"],
                     "NLL (nats/token)": r["nll"], "perplexity": r["perplexity"],
                     "NLL - LoopLM's": r["nll"] - ref.nll.iloc[0] if len(ref) else None,
                     "KV B/token (prefill)": r["kv_bytes_analytic"] / length,
                     "KV B/token (decode)": r["kv_decode_bytes_analytic"] / length,
                     "checkpoint": r["checkpoint"], "text": r["text"]})
    return pd.DataFrame(rows)


def drift_table(src: Path) -> pd.DataFrame:
    """The drift.csv files under `src` (one per scored per-loop LoopLM), as means over the layers
    per loop and kind (keys, values)."""
    tables = [pd.read_csv(p).assign(point=p.parent.name) for p in sorted(Path(src).rglob(DRIFT_FILE))]
    if not tables:
        return pd.DataFrame()
    drift = pd.concat(tables)
    return drift.groupby(["loop", "kind"])[["cos_vs_last", "rel_vs_last", "cos_vs_first", "rel_vs_first"]].mean().reset_index()


def quality_markdown(df: pd.DataFrame, src: Path) -> str:
    table = quality_table(df)
    lines = ["", "## Quality on a text (scenario=score)", "",
             "The text's first `seq_len` tokens are prefilled, the next `new_tokens` fed one at a time"
             " through the decode step (teacher forcing), so each design's decode-time cache rules are"
             " what is scored. NLL in nats per scored token; the KV columns divide each design's cache"
             " (as allocated, and after the prefill) by the tokens it holds.", "",
             table.drop(columns=["checkpoint", "text"]).to_markdown(index=False, floatfmt=".4f"), "",
             f"checkpoint: {', '.join(map(str, table.checkpoint.unique()))}; text: {', '.join(map(str, table.text.unique()))}",
             "", f"![quality against the cache]({QUALITY_PLOT})", ""]
    drift = drift_table(src)
    if len(drift):
        lines += ["### How far each loop's K/V are from the last loop's and the first's", "",
                  "Means over layers and the prompt's tokens (bench/measure/drift.py): cosine similarity and"
                  " relative distance ||x - ref|| / ||ref|| of loop t's keys and values. A policy that"
                  " keeps one loop's K/V survives when the other loops' are close to it.", "",
                  drift.to_markdown(index=False, floatfmt=".3f"), ""]
    return "\n".join(lines) + "\n"


def plot_quality(df: pd.DataFrame, path: Path) -> None:
    """Perplexity against the KV bytes per token each design keeps while decoding (log x)."""
    table = quality_table(df)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in table.to_dict("records"):
        ax.scatter(r["KV B/token (decode)"], r["perplexity"], color=COLORS.get(policy_of_label(r["design"]), "tab:gray"))
        ax.annotate(r["design"], (r["KV B/token (decode)"], r["perplexity"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("KV bytes per token while decoding (log)")
    ax.set_ylabel("perplexity of the scored tokens")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
