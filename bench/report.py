"""Tables, plots and a Markdown report from a folder of result rows.

    python -m bench.report results/default            # rebuild in place
    python -m bench.report some/folder --out elsewhere

Writes table.csv, table.parquet, report.md, memory_vs_depth.png, memory_vs_seq_len.png and
throughput.png. Memory is shown in MiB (2**20 bytes); the table keeps exact bytes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .paper import markdown as paper_markdown  # noqa: E402
from .paper import table2  # noqa: E402
from .results import IDENTITY, RESULT_FILE, TABLE_FILE, atomic_file, load_rows, with_legacy_columns  # noqa: E402

MIB = 2**20
# Labels and colours per cache design (the `policy` column: the LoopLM's kv_sharing, else the model).
LABELS = {"standard": "standard", "per_loop": "LoopLM (Ouro)", "last_loop": "LoopLM last_loop",
          "first_loop": "LoopLM first_loop", "mean_loops": "LoopLM mean_loops", "ring": "LoopLM ring",
          "anchor": "LoopLM anchor", "first_writes": "LoopLM first_writes", "melt": "MELT",
          "loopcoder": "LoopCoder", "hf_llama": "HF Llama (peer)"}
COLORS = {"standard": "tab:gray", "per_loop": "tab:red", "last_loop": "tab:orange", "first_loop": "tab:brown",
          "mean_loops": "tab:pink", "ring": "tab:purple", "anchor": "tab:cyan", "first_writes": "tab:green",
          "melt": "tab:blue", "loopcoder": "tab:olive", "hf_llama": "black"}
SIZES = {"ring": ("kv_ring",), "anchor": ("kv_anchor", "kv_ring"), "loopcoder": ("kv_window",)}  # shown in labels
SIZE_NAMES = {"kv_ring": "K", "kv_anchor": "A", "kv_window": "W"}


def design_label(row) -> str:
    """'LoopLM ring (K=2)', 'LoopCoder (W=64)', 'MELT', ...: a row's cache design and its sizes."""
    policy = row["policy"]
    sizes = [f"{SIZE_NAMES[k]}={int(row[k])}" for k in SIZES.get(policy, ()) if pd.notna(row.get(k))]
    return LABELS.get(policy, policy) + (f" ({', '.join(sizes)})" if sizes else "")
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
SOURCES = {"standard": "the layers once", "melt": "MELT (arXiv 2605.07721)",
           "loopcoder": "IQuest-Coder Loop / PLT (arXiv 2510.24824)", "hf_llama": "transformers' Llama"}


def build(src: Path | str, out: Path | str | None = None) -> pd.DataFrame:
    """Gather every result row under `src` and write the table, plots and report to `out`, each
    file atomically (a failure leaves the previous file as it was)."""
    df = load_rows(src)
    if df.empty:  # never overwrite a table with an empty one
        raise FileNotFoundError(f"no result rows under {src}: no {RESULT_FILE} and no {TABLE_FILE}")
    out = Path(out or src)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "table.csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_file(out / TABLE_FILE) as tmp:
        df.to_parquet(tmp, index=False)
    view = plot_view(df)
    plot_memory_vs_depth(view, out / PLOTS[0])
    plot_memory_vs_seq_len(view, out / PLOTS[1])
    plot_throughput(view, out / PLOTS[2])
    text = markdown(df, view, title=Path(src).resolve().name)
    if df.prefill_weights_bytes.notna().any():  # where each point's peak goes
        plot_breakdown(view, out / BREAKDOWN_PLOT)
        text += breakdown_markdown(df, view)
    pair = timeline_pair(view, Path(src))
    if pair:
        plot_timelines(pair, out / TIMELINE_PLOT)
        text += timeline_markdown(pair)
    if df.nll.notna().any():  # texts scored through each design's cache path
        plot_quality(df, out / QUALITY_PLOT)
        text += quality_markdown(df, Path(src))
    if set(policies_of(view)) - {"standard", "per_loop", "melt", "hf_llama"}:  # more cache designs than the three
        plot_policies(view, out / POLICIES_PLOT)
        text += policies_markdown(view)
    text += speed_markdown(df)  # limits, the peer, capacity
    if len(capacity_table(df)):
        plot_capacity(capacity_table(df), out / CAPACITY_PLOT)
        text += capacity_markdown(df)
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text(text)
    return df


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Write a figure atomically (a failure leaves the previous file as it was) and close it."""
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)


# -- what the plots show ----------------------------------------------------------------------

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


def _panels(view: pd.DataFrame):
    """(loops, rows) per panel: one panel per loop count of the looped models, each also showing
    the standard model (which runs once whatever the loop count) as a reference."""
    looped = view[~view.model.isin(ONE_PASS)]
    standard = view[view.model.isin(ONE_PASS)]
    loops = sorted(looped.loops.unique()) or sorted(standard.loops.unique()) or [1]
    return [(n, pd.concat([looped[looped.loops == n], standard])) for n in loops]


def _figure(n: int):
    """n panels sharing the y axis, at most 3 a row; -> (figure, the n axes)."""
    cols, rows = min(n, 3), -(-n // 3)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 0.6, 3.4 * rows + 0.6),
                             squeeze=False, sharey=True)
    axes = axes.ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _save(fig, axes, path: Path, empty_note: str | None) -> None:
    if empty_note:
        axes[0].text(0.5, 0.5, empty_note, ha="center", va="center", transform=axes[0].transAxes)
    handles, labels = axes[-1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(handles)), fontsize=8,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    save_figure(fig, path)


def _ticked_axis(ax, values, log2: bool = True) -> None:
    """x axis ticked at the measured values, written as plain numbers; log-2 unless told."""
    if log2:
        ax.set_xscale("log", base=2)
    ticks = sorted(set(values))
    if ticks:
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()


def _mark_oom(ax, rows: pd.DataFrame, x: str, color) -> None:
    """Points that ran out of memory: an x on the top edge of the panel."""
    xs = rows.loc[rows.status == "oom", x]
    if len(xs):
        ax.plot(xs, [1.0] * len(xs), "x", color=color, ms=9, mew=2, clip_on=False,
                transform=ax.get_xaxis_transform())


def plot_memory_vs_depth(view: pd.DataFrame, path: Path) -> None:
    """Peak memory against loops, one line per model and one panel per sequence length; the
    analytic KV cache dashed. The standard model runs once: a horizontal reference."""
    seq_lens = sorted(view.seq_len.unique()) if len(view) else [None]
    fig, axes = _figure(len(seq_lens))
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
            _mark_oom(ax, s, "loops", color)
        _ticked_axis(ax, rows.loops, log2=False)  # linear: growth in loops shows as a line
        ax.set_xlabel("loops")
        ax.set_title(f"seq_len {seq_len}" if seq_len else "")
        ax.grid(alpha=0.3)
    for ax in axes[::3]:
        ax.set_ylabel("memory (MiB)")
    _save(fig, axes, path, None if len(view) else "no results")


def plot_memory_vs_seq_len(view: pd.DataFrame, path: Path) -> None:
    """Peak memory against sequence length, one panel per loop count; OOM points as x on top."""
    _per_seq_len(view, path, "peak_bytes", MIB, "peak memory (MiB)")


def plot_throughput(view: pd.DataFrame, path: Path) -> None:
    """Decode tokens/s against sequence length (context before decoding), one panel per loops;
    the bars span the repeats' min to max."""
    _per_seq_len(view, path, "decode_tokens_per_s", 1, "decode tokens/s (median, bars: min-max)")


def _per_seq_len(view: pd.DataFrame, path: Path, column: str, unit: float, ylabel: str) -> None:
    panels = _panels(view)
    fig, axes = _figure(len(panels))
    drawn = False
    for ax, (loops, rows) in zip(axes, panels):
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
            _mark_oom(ax, s, "seq_len", color)
            drawn |= len(ok) > 0
        _ticked_axis(ax, rows.seq_len)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title(f"loops {loops}")
        ax.grid(alpha=0.3)
    for ax in axes[::3]:
        ax.set_ylabel(ylabel)
    _save(fig, axes, path, None if drawn else f"no {column} results")


# -- the report -------------------------------------------------------------------------------

def ratio_table(view: pd.DataFrame, column: str = "peak_bytes") -> pd.DataFrame:
    """MELT / LoopLM (its own per-loop cache) of `column` per sequence length (rows) and loops
    (columns)."""
    ok = view[view.status == "ok"]
    pivot = ok.pivot_table(index=["seq_len", "loops"], columns="policy", values=column,
                           aggfunc="first")
    if not {"melt", "per_loop"} <= set(pivot.columns):
        return pd.DataFrame()
    return (pivot["melt"] / pivot["per_loop"]).unstack("loops").dropna(axis=1, how="all")


def oom_frontier(view: pd.DataFrame) -> pd.DataFrame:
    """Per model variant and loops: the longest sequence that fitted and the shortest that did not."""
    groups = view.groupby(["series", "loops"])
    frontier = pd.DataFrame({
        "longest_ok": groups.apply(lambda g: g.loc[g.status == "ok", "seq_len"].max(),
                                   include_groups=False),
        "shortest_oom": groups.apply(lambda g: g.loc[g.status == "oom", "seq_len"].min(),
                                     include_groups=False),
    })
    return frontier[frontier.shortest_oom.notna()].astype("Int64")


RATIOS = [  # (column, heading, what it includes) of the MELT / LoopLM tables in report.md
    ("peak_bytes", "peak memory",
     "`peak_bytes`, the scenario's peak: it includes the prefill's activations, which depend on the"
     " prefill schedule."),
    ("peak_decode_bytes", "decode peak",
     "`peak_decode_bytes`, the peak during decode (reset after prefill): the cache's effect without"
     " the prefill activations."),
    ("kv_bytes_analytic", "KV cache", "`kv_bytes_analytic`: the caches alone, by the models' formulas."),
    ("decode_tokens_per_s", "decode tokens/s",
     "`decode_tokens_per_s` (higher is better for MELT): MELT's gate reads about 16 % more weight"
     " bytes per loop; both read every past token's K/V in every loop."),
]

TABLE_COLUMNS = {  # report column -> (table column, divisor)
    "peak MiB": ("peak_bytes", MIB), "prefill peak MiB": ("peak_prefill_bytes", MIB),
    "decode peak MiB": ("peak_decode_bytes", MIB), "KV MiB": ("kv_bytes_analytic", MIB),
    "weights MiB": ("weights_bytes", MIB), "predicted peak MiB": ("predicted_peak_bytes", MIB),
    "prefill tok/s": ("prefill_tokens_per_s", 1),
    "decode tok/s": ("decode_tokens_per_s", 1), "p50 ms/token": ("token_latency_ms_p50", 1),
}


PREDICTION_OF = {"peak_bytes": "predicted_peak_bytes", "peak_prefill_bytes": "predicted_prefill_bytes",
                 "peak_decode_bytes": "predicted_decode_bytes"}


def prediction_error(df: pd.DataFrame, column: str = "peak_bytes") -> pd.Series:
    """(predicted / measured - 1) of `column` per ok row that has both, as a fraction."""
    predicted = PREDICTION_OF[column]
    rows = df[(df.status == "ok") & df[column].notna() & df[predicted].notna()]
    return rows[predicted].astype(float) / rows[column].astype(float) - 1


def prediction_markdown(df: pd.DataFrame) -> list[str]:
    """How far bench.memory_model's prediction is from what each probe measured."""
    stats = []
    for probe, rows in df.groupby("probe"):
        for column, what in (("peak_prefill_bytes", "prefill peak"), ("peak_decode_bytes", "decode peak")):
            err = prediction_error(rows, column)
            if len(err):
                worst = rows.loc[err.abs().idxmax()]
                stats.append({"probe": probe, "phase": what, "points": len(err),
                              "median error %": 100 * err.median(),
                              "max abs error %": 100 * err.abs().max(),
                              "worst point": f"{worst.model} loops={worst.loops} "
                                             f"seq_len={worst.seq_len} batch={worst.batch}"})
    if not stats:
        return []
    return ["## Predicted vs measured memory", "",
            "bench/memory_model.py predicts each point's peaks from its config alone (weights, KV"
            " cache, largest activation set; docs/memory.md, \"The memory model\"). Error ="
            " predicted / measured - 1.", "", pd.DataFrame(stats).to_markdown(index=False, floatfmt=".3f"), ""]


def markdown(df: pd.DataFrame, view: pd.DataFrame, title: str) -> str:
    lines = [f"# meltbench: {title}", ""]
    first = df.iloc[0]
    counts = ", ".join(f"{n} {s}" for s, n in df.status.value_counts().items())
    lines += [
        f"- device: {', '.join(df.gpu_name.dropna().unique())} ({', '.join(df.device.unique())}),"
        f" dtype {', '.join(df.dtype.unique())}, probe {', '.join(df.probe.unique())}",
        f"- torch {first.torch_version}, CUDA {first.cuda_version or 'none'},"
        f" git {', '.join(df.git_sha.dropna().unique())}",
        f"- measured {df.timestamp.min()} to {df.timestamp.max()}; {len(df)} points: {counts}",
        f"- plots and summaries below: scenario {view.scenario.iloc[0]}, batch {view.batch.iloc[0]};"
        f" {schedule_label(df, schedules(df)[0])}; memory in MiB (2^20 bytes)", "",
    ]
    for prefill in schedules(df):
        rows = plot_view(df, prefill)
        for column, what, note in RATIOS:
            ratios = ratio_table(rows, column)
            if not ratios.empty:
                lines += [f"## MELT / LoopLM {what} (rows: seq_len, columns: loops)", "",
                          f"{note} Schedule: {schedule_label(df, prefill)}.", "",
                          ratios.to_markdown(floatfmt=".3f"), ""]
    paper = table2(df)
    if not paper.empty:
        lines += paper_markdown(paper)
    lines += prediction_markdown(df)
    frontier = oom_frontier(view)
    if not frontier.empty:
        lines += ["## OOM frontier (longest sequence that fit, shortest that did not)", "",
                  frontier.reset_index().rename(columns={"series": "model"})
                  .to_markdown(index=False), ""]
    lines += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in PLOTS] + [""]
    # The design column names the cache policy where the sweep has more designs than the models.
    design = ["policy"] if "policy" in df and df.policy.nunique() > df.model.nunique() else []
    table = df[["model", *design, "loops", "seq_len", "batch", "scenario", "prefill", "status"]].copy()
    for name, (column, unit) in TABLE_COLUMNS.items():
        table[name] = df[column] / unit
    lines += ["## All points", "", table.to_markdown(index=False, floatfmt=".1f"), ""]
    errors = df[df.status == "error"]
    if len(errors):
        lines += ["## Errors", ""] + [f"- {r.model} loops={r.loops} seq_len={r.seq_len}: {r.error}"
                                      for r in errors.itertuples()] + [""]
    return "\n".join(lines)


# -- every cache design: the policies table and plot -----------------------------------------------

def policies_of(view: pd.DataFrame) -> list[str]:
    """The cache designs in the view, in the families' order."""
    order = ["standard", *[p for family in FAMILIES.values() for p in family]]
    present = set(view.policy.dropna()) if "policy" in view else set()
    return [p for p in order if p in present] + sorted(present - set(order))


def policies_markdown(view: pd.DataFrame) -> str:
    """Per design at the deepest loop count and each length: its cache as allocated and after the
    prefill, its peaks, decode speed and the ratio of its peak to the per-loop LoopLM's."""
    from models.policies import POLICIES

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
            _ticked_axis(ax, rows.loops, log2=False)
            ax.set_title(f"{name}\nseq_len {seq_len}" if row == 0 else f"seq_len {seq_len}", fontsize=9)
            ax.set_xlabel("loops")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.legend(fontsize=7, frameon=False, loc="upper left")
        axes[row][0].set_ylabel("peak memory (MiB)")
    fig.suptitle("Every cache design against loop depth (solid: peak; dashed: decode peak)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


# -- where the peak goes ---------------------------------------------------------------------------

def breakdown_table(view: pd.DataFrame) -> pd.DataFrame:
    """Per point of the view (the longest length first): each phase's peak split by owner, in MiB,
    and the memory model's error per category."""
    ok = view[(view.status == "ok") & view.prefill_weights_bytes.notna()]
    rows = []
    for r in ok.sort_values(["seq_len", "policy", "loops"], ascending=[False, True, True]).to_dict("records"):
        for phase in ("prefill", "decode"):
            if pd.isna(r.get(f"peak_{phase}_bytes")):
                continue
            row = {"design": design_label(r), "loops": r["loops"], "seq_len": r["seq_len"], "phase": phase,
                   "peak MiB": r[f"peak_{phase}_bytes"] / MIB}
            for part, name, _ in PARTS:
                value = r.get(f"{phase}_{part}_bytes")
                if value is not None and pd.notna(value):
                    row[f"{name} MiB"] = value / MIB
            for part, predicted in (("weights", "predicted_weights_bytes"),
                                    ("kv", "predicted_kv_bytes" if phase == "prefill" else "predicted_kv_decode_bytes"),
                                    ("activations", f"predicted_{phase}_activations_bytes")):
                measured, model = r.get(f"{phase}_{part}_bytes"), r.get(predicted)
                if measured and model is not None and pd.notna(model) and pd.notna(measured):
                    row[f"{part} error %"] = 100 * (model / measured - 1)
            rows.append(row)
    return pd.DataFrame(rows)


def breakdown_markdown(df: pd.DataFrame, view: pd.DataFrame) -> str:
    table = breakdown_table(view)
    if table.empty:
        return ""
    lines = ["", "## Where the peak goes", "",
             "Each phase's peak by who owns the memory (bench/probes.py): the model's weights, the KV"
             " cache, and activations (every other tensor: the pass's activations and temporaries); on"
             " CUDA also the caching allocator's reserved-but-unused share and what the process holds"
             " outside PyTorch (NVML). The first three sum to the tracked peak to the byte. Error % ="
             " the memory model's prediction of the category / measured - 1.", "",
             table.to_markdown(index=False, floatfmt=".2f"), "", f"![where the peak goes]({BREAKDOWN_PLOT})", ""]
    return "\n".join(lines) + "\n"


def plot_breakdown(view: pd.DataFrame, path: Path) -> None:
    """Stacked bars per design and loops: the prefill peak (top row) and decode peak (bottom) of
    each length (columns), split by owner."""
    ok = view[(view.status == "ok") & view.prefill_weights_bytes.notna()]
    seq_lens = sorted(ok.seq_len.unique())
    fig, axes = plt.subplots(2, max(1, len(seq_lens)), squeeze=False, sharey="col",
                             figsize=(max(6.0, 0.42 * len(ok) / max(1, len(seq_lens)) + 3) * len(seq_lens), 7.0))
    order = {p: i for i, p in enumerate(policies_of(ok))}
    for col, seq_len in enumerate(seq_lens):
        points = sorted(ok[ok.seq_len == seq_len].to_dict("records"), key=lambda r: (order.get(r["policy"], 99), r["loops"]))
        labels = [f"{design_label(r)}\nloops {r['loops']}" if r["model"] not in ONE_PASS else design_label(r)
                  for r in points]
        for row, phase in enumerate(("prefill", "decode")):
            ax, bottom = axes[row][col], [0.0] * len(points)
            for part, name, color in PARTS:
                values = [(r.get(f"{phase}_{part}_bytes") or 0) / MIB if pd.notna(r.get(f"{phase}_{part}_bytes")) else 0
                          for r in points]
                if any(values):
                    ax.bar(range(len(points)), values, bottom=bottom, color=color, label=name, width=0.8)
                    bottom = [b + v for b, v in zip(bottom, values)]
            ax.set_xticks(range(len(points)), labels, fontsize=6, rotation=90)
            ax.set_title(f"{phase} peak, seq_len {seq_len}", fontsize=9)
            ax.grid(alpha=0.3, axis="y")
        axes[0][col].set_ylabel("MiB")
        axes[1][col].set_ylabel("MiB")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    save_figure(fig, path)


def timeline_pair(view: pd.DataFrame, src: Path) -> list[tuple[dict, pd.DataFrame, pd.DataFrame]]:
    """MELT's and the per-loop LoopLM's recorded timelines at one point (the longest length, loops 4
    if measured, else their deepest common depth): [(row, samples, marks)], or [] without both."""
    from .profiles import MARKS_FILE, TIMELINE_FILE

    files = {p.parent: p for p in Path(src).rglob(TIMELINE_FILE)}
    if not files:
        return []
    rows = {}
    for folder in files:
        result = folder / RESULT_FILE
        if result.is_file():
            rows[folder] = json.loads(result.read_text())
    candidates = [(f, r) for f, r in rows.items() if r.get("status") == "ok" and r.get("policy") in ("melt", "per_loop")]
    points = {}
    for folder, r in candidates:
        points.setdefault((r["seq_len"], r["loops"], r["batch"]), {})[r["policy"]] = (folder, r)
    both = [key for key, found in points.items() if {"melt", "per_loop"} <= set(found)]
    if not both:
        return []
    key = max(both, key=lambda k: (k[0], k[1] == 4, k[1]))
    return [(r, pd.read_parquet(f / TIMELINE_FILE), pd.read_parquet(f / MARKS_FILE))
            for f, r in (points[key]["per_loop"], points[key]["melt"])]


def timeline_markdown(pair) -> str:
    r = pair[0][0]
    return "\n".join(["", "## Memory over a memory pass", "",
                      f"Live bytes by owner after every op of the LoopLM's and MELT's memory pass at"
                      f" {r['seq_len']} tokens, loops {r['loops']} (profile=timeline): the prefill chunk by"
                      " chunk (thin lines: chunks; dotted: loops), then the decode steps. Both caches are"
                      " allocated before the prefill; the dark part is what holds written rows: the"
                      " LoopLM's grows loop by loop (each loop fills its own slot), MELT's chunk by chunk"
                      " (every loop rewrites the same rows), while MELT's activations rise and fall with"
                      " each chunk (its latents live through the chunk's loops).", "",
                      f"![memory over a memory pass]({TIMELINE_PLOT})", ""]) + "\n"


def plot_timelines(pair, path: Path) -> None:
    """Stacked live bytes by owner against op count, one panel per design, markers for phases,
    chunks and loops; the same y scale."""
    fig, axes = plt.subplots(len(pair), 1, figsize=(11.5, 2.9 * len(pair) + 0.6), sharey=True, squeeze=False)
    for ax, (r, samples, marks) in zip(axes[:, 0], pair):
        x = samples.op
        ax.stackplot(x, *[samples[part] / MIB for part, _, _ in PARTS[:3]], step="post",
                     colors=[c for _, _, c in PARTS[:3]], labels=[n for _, n, _ in PARTS[:3]], alpha=0.85)
        if "kv_written" in samples:  # the cache's rows that hold the prompt so far, over the weights
            ax.fill_between(x, samples.weights / MIB, (samples.weights + samples.kv_written) / MIB, step="post",
                            color="darkred", alpha=0.9, label="KV cache, rows written")
        for m in marks.to_dict("records"):
            if m["kind"] == "chunk" and not marks[(marks.kind == "phase") & (marks.label == "decode") & (marks.op <= m["op"])].empty:
                continue  # decode steps: too many to mark
            style = {"phase": dict(color="k", lw=1.2), "chunk": dict(color="k", lw=0.5, alpha=0.5),
                     "loop": dict(color="k", lw=0.4, ls=":", alpha=0.4)}[m["kind"]]
            ax.axvline(m["op"], **style)
            if m["kind"] == "phase":
                ax.text(m["op"], 1.0, f" {m['label']}", transform=ax.get_xaxis_transform(), fontsize=8, va="top")
        ax.set_title(f"{design_label(r)}, {r['seq_len']} tokens, loops {r['loops']}", fontsize=9)
        ax.set_ylabel("live MiB")
        ax.grid(alpha=0.2)
    axes[-1, 0].set_xlabel("op (memory pass)")
    axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
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
    from .runner import DRIFT_FILE

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
                  "Means over layers and the prompt's tokens (bench/drift.py): cosine similarity and"
                  " relative distance ||x - ref|| / ||ref|| of loop t's keys and values. A policy that"
                  " keeps one loop's K/V survives when the other loops' are close to it.", "",
                  drift.to_markdown(index=False, floatfmt=".3f"), ""]
    return "\n".join(lines) + "\n"


def plot_quality(df: pd.DataFrame, path: Path) -> None:
    """Perplexity against the KV bytes per token each design keeps while decoding (log x)."""
    table = quality_table(df)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in table.to_dict("records"):
        ax.scatter(r["KV B/token (decode)"], r["perplexity"], color=COLORS.get(_policy_of(r["design"]), "tab:gray"))
        ax.annotate(r["design"], (r["KV B/token (decode)"], r["perplexity"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("KV bytes per token while decoding (log)")
    ax.set_ylabel("perplexity of the scored tokens")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def _policy_of(label: str) -> str:
    return next((p for p, name in LABELS.items() if label.startswith(name)), label)


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
             " (bench/roofline.py).", ""]
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="folder holding result.json files (searched recursively), or a "
                        "folder with a gathered table.parquet")
    parser.add_argument("--out", help="where to write (default: src)")
    args = parser.parse_args(argv)
    try:
        df = build(args.src, args.out)
    except FileNotFoundError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"{len(df)} rows -> {args.out or args.src}")


if __name__ == "__main__":
    main()
