"""The report's speed sections: tokens/s against the machine's limits, our standard model against
the hf_llama peer, and the capacity searches."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..rows.labels import LABELS  # noqa: E402
from .views import CAPACITY_PLOT, COLORS, MIB, save_figure  # noqa: E402


# -- speed against the machine's limits, the hf_llama peer, capacity ---------------------------------

def speed_markdown(df: pd.DataFrame) -> str:
    """Per timed row: tokens/s, utilization of the measured limits and which term bounds it; our
    standard model against the hf_llama peer where both ran."""
    timed = df[(df.status == "ok") & (df.decode_tokens_per_s.notna() | df.prefill_utilization.notna())]
    if timed.empty:
        return ""
    first = timed.iloc[0]
    device_bw = first.get("device_bandwidth_bytes_per_s")
    theoretical = (f" (the device's theoretical bandwidth: {_fmt(device_bw, 1e9)} GB/s)"
                   if device_bw is not None and pd.notna(device_bw) else "")
    lines = ["", "## Speed against the machine's limits", "",
             "Measured once per run: copy bandwidth "
             f"{_fmt(first.copy_bytes_per_s, 1e9)} GB/s (large copies, read + write){theoretical}, matmul rate "
             f"{_fmt(first.matmul_flops_per_s, 1e12)} TFLOP/s ({first['dtype']}). Tokens/s: the median over"
             " the repeats, with their min-max. A decode step is timed from the end of the one before"
             " (CUDA events on a GPU), so the first step, and what runs before it, is not."
             " `bandwidth util` = bytes a"
             " decode step must read (weights once per loop applied + the KV rows attended, for the"
             " batch) x steps/s / copy bandwidth; `prefill util` = prefill flops/s / matmul rate."
             " `bound`: the term (weights, kv reads or compute) that takes longest at those limits"
             " (bench/measure/roofline.py).", ""]
    timed = timed.sort_values(["seq_len", "batch", "loops", "model"])
    table = timed[["model", "loops", "seq_len", "batch", "compile"]].copy()
    table["decode tok/s"] = timed.decode_tokens_per_s
    table["decode min-max"] = [_range(r, "decode_tokens_per_s") for r in timed.to_dict("records")]
    table["bandwidth util %"] = 100 * timed.bandwidth_utilization
    table["decode bound"] = timed.decode_bound
    table["prefill util %"] = 100 * timed.prefill_utilization
    table["prefill bound"] = timed.prefill_bound
    lines += [table.to_markdown(index=False, floatfmt=".1f"), ""]
    peer = peer_ratio(df)
    if len(peer):
        lines += ["## Our standard model against the hf_llama peer (decode tokens/s, same run)", "",
                  peer.to_markdown(index=False, floatfmt=".2f"), ""]
    return "\n".join(lines) + "\n"


def _range(row: dict, column: str) -> str:
    low, high = row.get(f"{column}_min"), row.get(f"{column}_max")
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return ""
    return f"{low:.1f}-{high:.1f}"


def _fmt(value, unit: float) -> str:
    return "?" if value is None or pd.isna(value) else f"{value / unit:.1f}"


def peer_ratio(df: pd.DataFrame) -> pd.DataFrame:
    """standard / hf_llama decode tokens/s per (seq_len, batch, dtype) where both have a row."""
    ok = df[(df.status == "ok") & df.decode_tokens_per_s.notna() & ~df.capacity_max_batch.notna()]
    keys = ["seq_len", "batch", "dtype"]
    pivot = ok.pivot_table(index=keys, columns="model", values="decode_tokens_per_s", aggfunc="first")
    if not {"standard", "hf_llama"} <= set(pivot.columns):
        return pd.DataFrame()
    out = pivot[["standard", "hf_llama"]].dropna().reset_index()
    out["standard / hf_llama"] = out.standard / out.hf_llama
    return out.rename(columns={"standard": "standard tok/s", "hf_llama": "hf_llama tok/s"})


def capacity_table(df: pd.DataFrame) -> pd.DataFrame:
    """The capacity searches' final rows: per cache design, the largest batch within the budget and
    the decode throughput (tokens/s over the whole batch) at that batch."""
    rows = df[df.capacity_max_batch.notna()]
    table = pd.DataFrame({
        "policy": rows.policy, "loops": rows.loops, "seq_len": rows.seq_len,
        "budget GB": rows.budget_bytes / 1e9, "max batch": rows.capacity_max_batch.astype(int),
        "first OOM batch": rows.capacity_first_oom.astype("Int64"),
        # numeric even when nothing was timed (probe fake: all None)
        "decode tok/s": pd.to_numeric(rows.decode_tokens_per_s), "peak MiB": rows.peak_bytes / MIB,
        "KV MiB": rows.kv_bytes_analytic / MIB, "decode bound": rows.decode_bound,
    })
    return table.sort_values(["seq_len", "loops", "policy"]).reset_index(drop=True)


def capacity_markdown(df: pd.DataFrame) -> str:
    table = capacity_table(df)
    lines = ["", "## Capacity at the memory budget", "",
             "Largest batch whose run (prefill of the batch, then decode) fits the budget, by doubling"
             " then bisection; every trial is a row of the table (OOM rows included). Decode tok/s is"
             " over the whole batch, at the largest batch.", "",
             table.to_markdown(index=False, floatfmt=".2f"), ""]
    for (seq_len, loops), g in table.groupby(["seq_len", "loops"]):
        by = g.set_index("policy")
        if {"melt", "per_loop"} <= set(by.index) and by.loc["per_loop", "max batch"] > 0:
            speed = by.loc["melt", "decode tok/s"] / by.loc["per_loop", "decode tok/s"]
            lines.append(f"- seq_len {seq_len}, loops {loops}: MELT / LoopLM max batch "
                         f"{by.loc['melt', 'max batch'] / by.loc['per_loop', 'max batch']:.2f}, decode tok/s "
                         + (f"{speed:.2f}" if pd.notna(speed) else "not timed (probe fake)"))
    lines += ["", f"![capacity]({CAPACITY_PLOT})", ""]
    return "\n".join(lines) + "\n"


def plot_capacity(table: pd.DataFrame, path: Path) -> None:
    """Two bar panels per (seq_len, loops): max batch and decode tokens/s at it, per model."""
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    labels = [f"{LABELS.get(r.policy, r.policy)}\n{r.seq_len} tok, loops {r.loops}"
              for r in table.itertuples()]
    colors = [COLORS.get(p, "tab:gray") for p in table.policy]
    for ax, column, ylabel in ((axes[0], "max batch", "largest batch within budget"),
                               (axes[1], "decode tok/s", "decode tokens/s at that batch")):
        ax.bar(range(len(table)), table[column].fillna(0), color=colors)
        ax.set_xticks(range(len(table)), labels, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    budgets = ", ".join(f"{b:.2f}" for b in table["budget GB"].unique())
    fig.suptitle(f"capacity at a memory budget of {budgets} GB", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
