"""The sweep's plots: peak memory against loops and against sequence length, decode throughput."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .views import COLORS, MIB, ONE_PASS, figure_grid, mark_oom, panels, save_grid, ticked_axis


def plot_memory_vs_depth(view: pd.DataFrame, path: Path) -> None:
    """Peak memory against loops, one line per model and one panel per sequence length; the
    analytic KV cache dashed. The standard model runs once: a horizontal reference."""
    seq_lens = sorted(view.seq_len.unique()) if len(view) else [None]
    fig, axes = figure_grid(len(seq_lens))
    for ax, seq_len in zip(axes, seq_lens):
        rows = view[view.seq_len == seq_len]
        for series, s in rows.groupby("series", sort=False):
            s = s.sort_values("loops")
            ok = s[s.status == "ok"]
            color = COLORS.get(s.policy.iloc[0])
            if s.model.iloc[0] in ONE_PASS and len(ok):
                ax.axhline(ok.peak_bytes.iloc[0] / MIB, color=color, ls=":", label=f"{series} peak")
                ax.axhline(ok.kv_bytes_analytic.iloc[0] / MIB, color=color, ls="--", lw=1,
                           label=f"{series} KV (analytic)")
                continue
            ax.plot(ok.loops, ok.peak_bytes / MIB, "o-", color=color, label=f"{series} peak")
            ax.plot(ok.loops, ok.kv_bytes_analytic / MIB, "--", color=color, lw=1,
                    label=f"{series} KV (analytic)")
            mark_oom(ax, s, "loops", color)
        ticked_axis(ax, rows.loops, log2=False)  # linear: growth in loops shows as a line
        ax.set_xlabel("loops")
        ax.set_title(f"seq_len {seq_len}" if seq_len else "")
        ax.grid(alpha=0.3)
    for ax in axes[::3]:
        ax.set_ylabel("memory (MiB)")
    save_grid(fig, axes, path, None if len(view) else "no results")


def plot_memory_vs_seq_len(view: pd.DataFrame, path: Path) -> None:
    """Peak memory against sequence length, one panel per loop count; OOM points as x on top."""
    _per_seq_len(view, path, "peak_bytes", MIB, "peak memory (MiB)")


def plot_throughput(view: pd.DataFrame, path: Path) -> None:
    """Decode tokens/s against sequence length (context before decoding), one panel per loops;
    the bars span the repeats' min to max."""
    _per_seq_len(view, path, "decode_tokens_per_s", 1, "decode tokens/s (median, bars: min-max)")


def _per_seq_len(view: pd.DataFrame, path: Path, column: str, unit: float, ylabel: str) -> None:
    per_loops = panels(view)
    fig, axes = figure_grid(len(per_loops))
    drawn = False
    for ax, (loops, rows) in zip(axes, per_loops):
        for series, s in rows.groupby("series", sort=False):
            s = s.sort_values("seq_len")
            ok = s[(s.status == "ok") & s[column].notna()]
            color = COLORS.get(s.policy.iloc[0])
            style = ":" if s.model.iloc[0] in ONE_PASS else "-"
            if f"{column}_min" in ok and ok[f"{column}_min"].notna().any():  # the spread over repeats
                low = (ok[column] - ok[f"{column}_min"]).clip(lower=0) / unit
                high = (ok[f"{column}_max"] - ok[column]).clip(lower=0) / unit
                ax.errorbar(ok.seq_len, ok[column] / unit, yerr=[low.fillna(0), high.fillna(0)],
                            fmt="none", ecolor=color, capsize=3, lw=1)
            ax.plot(ok.seq_len, ok[column] / unit, "o" + style, color=color, label=series)
            mark_oom(ax, s, "seq_len", color)
            drawn |= len(ok) > 0
        ticked_axis(ax, rows.seq_len)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title(f"loops {loops}")
        ax.grid(alpha=0.3)
    for ax in axes[::3]:
        ax.set_ylabel(ylabel)
    save_grid(fig, axes, path, None if drawn else f"no {column} results")
