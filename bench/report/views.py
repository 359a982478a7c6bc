"""What the report's plots and tables show of a results table, and what they all share: the
slice of the table a plot draws (plot_view), the designs' order and colours, figure helpers."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..rows.files import atomic_file, with_legacy_columns  # noqa: E402
from ..rows.labels import design_label  # noqa: E402
from ..rows.schema import IDENTITY  # noqa: E402

MIB = 2**20
COLORS = {"standard": "tab:gray", "per_loop": "tab:red", "last_loop": "tab:orange", "first_loop": "tab:brown",
          "mean_loops": "tab:pink", "ring": "tab:purple", "anchor": "tab:cyan", "first_writes": "tab:green",
          "melt": "tab:blue", "loopcoder": "tab:olive", "hf_llama": "black"}
ONE_PASS = ("standard", "hf_llama")  # models that run once whatever `loops` says: references
PLOTS = ("memory_vs_depth.png", "memory_vs_seq_len.png", "throughput.png")
CAPACITY_PLOT = "capacity.png"  # only when the folder holds a capacity search
POLICIES_PLOT = "policies_memory_vs_depth.png"  # only when the folder compares cache designs
QUALITY_PLOT = "policy_quality.png"  # only when the folder holds scored texts (scenario=score)
BREAKDOWN_PLOT = "peak_breakdown.png"  # where each point's peak goes
TIMELINE_PLOT = "timeline.png"  # only when points recorded a timeline (profile=timeline)
PARTS = [("weights", "weights", "tab:gray"), ("kv", "KV cache", "tab:red"), ("activations", "activations", "tab:blue"),
         ("allocator", "allocator's cache", "tab:olive"), ("outside_torch", "outside PyTorch", "black")]
# The designs' families, one panel each in the policies plot (per_loop and standard in every one).
FAMILIES = {"Ouro: per-loop cache and decode-time sharing": ("per_loop", "last_loop", "first_loop", "mean_loops"),
            "Huginn: compressed caches": ("ring", "anchor"),
            "one shared loop-0 cache": ("first_writes", "loopcoder"),
            "MELT: one gated slot per layer": ("melt",)}


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Write a figure atomically (a failure leaves the previous file as it was) and close it."""
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)


def schedules(df: pd.DataFrame) -> list[str]:
    """The prefill schedules in `df`, equal chunking (the fair comparison) first."""
    present = set(df.prefill.dropna()) if "prefill" in df else set()
    return [s for s in ("chunked", "one_pass") if s in present] or [None]


def schedule_label(df: pd.DataFrame, prefill: str | None) -> str:
    """How the rows of one schedule prefilled, for headings and captions."""
    if prefill == "chunked":
        chunks = sorted(set(df.loc[df.prefill == "chunked", "chunk_size"].dropna().astype(int)))
        return f"prefill chunked (chunk_size {', '.join(map(str, chunks))}) for every model"
    if prefill == "one_pass":
        return "prefill in one pass for the standard model and the LoopLM (MELT in its chunks)"
    return "prefill schedule not recorded"


def plot_view(df: pd.DataFrame, prefill: str | None = None) -> pd.DataFrame:
    """One slice of the table for the plots and summaries: one prefill schedule (equal chunking
    when the table has it), a single scenario (generate if there, else decode, else prefill), the
    smallest batch, and a `series` label per model variant."""
    if df.empty:
        return df.assign(series=pd.Series(dtype=str))
    df = with_legacy_columns(df.copy())
    prefill = prefill or schedules(df)[0]
    if prefill is not None:
        df = df[df.prefill == prefill]
    scenario = next(s for s in ("generate", "decode", "prefill", "score") if (df.scenario == s).any())
    view = df[(df.scenario == scenario) & (df.batch == df.batch.min())].copy()
    # Settings that vary within a design (cache_update, size, dtype...) split it into several lines.
    shown = ("model", "loops", "seq_len", "batch", "scenario", "prefill", "kv_sharing", "kv_ring", "kv_anchor",
             "kv_window")
    settings = [k for k in IDENTITY if k not in shown]
    varying = {policy: [k for k in settings if rows[k].nunique(dropna=False) > 1]
               for policy, rows in view.groupby("policy")}
    view["series"] = view.apply(
        lambda r: " ".join([design_label(r)] + [f"{k}={r[k]}" for k in varying[r.policy]]), axis=1)
    return view


def panels(view: pd.DataFrame):
    """(loops, rows) per panel: one panel per loop count of the looped models, each also showing
    the standard model (which runs once whatever the loop count) as a reference."""
    looped = view[~view.model.isin(ONE_PASS)]
    standard = view[view.model.isin(ONE_PASS)]
    loops = sorted(looped.loops.unique()) or sorted(standard.loops.unique()) or [1]
    return [(n, pd.concat([looped[looped.loops == n], standard])) for n in loops]


def figure_grid(n: int):
    """n panels sharing the y axis, at most 3 a row; -> (figure, the n axes)."""
    cols, rows = min(n, 3), -(-n // 3)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 0.6, 3.4 * rows + 0.6),
                             squeeze=False, sharey=True)
    axes = axes.ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def save_grid(fig, axes, path: Path, empty_note: str | None) -> None:
    """A figure_grid() with one legend below the panels (the last panel's), saved; `empty_note`
    written on the first panel when nothing was drawn."""
    if empty_note:
        axes[0].text(0.5, 0.5, empty_note, ha="center", va="center", transform=axes[0].transAxes)
    handles, labels = axes[-1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(handles)), fontsize=8,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    save_figure(fig, path)


def ticked_axis(ax, values, log2: bool = True) -> None:
    """x axis ticked at the measured values, written as plain numbers; log-2 unless told."""
    if log2:
        ax.set_xscale("log", base=2)
    ticks = sorted(set(values))
    if ticks:
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()


def mark_oom(ax, rows: pd.DataFrame, x: str, color) -> None:
    """Points that ran out of memory: an x on the top edge of the panel."""
    xs = rows.loc[rows.status == "oom", x]
    if len(xs):
        ax.plot(xs, [1.0] * len(xs), "x", color=color, ms=9, mew=2, clip_on=False,
                transform=ax.get_xaxis_transform())


def policies_of(view: pd.DataFrame) -> list[str]:
    """The cache designs in the view, in the families' order."""
    order = ["standard", *[p for family in FAMILIES.values() for p in family]]
    present = set(view.policy.dropna()) if "policy" in view else set()
    return [p for p in order if p in present] + sorted(present - set(order))
