"""A folder of result rows -> its table, plots and Markdown report.

    python -m bench.report results/default            # rebuild in place
    python -m bench.report some/folder --out elsewhere

Writes table.csv, table.parquet, report.md, memory_vs_depth.png, memory_vs_seq_len.png and
throughput.png. Memory is shown in MiB (2**20 bytes); the table keeps exact bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ..rows.files import RESULT_FILE, TABLE_FILE, atomic_file, load_rows
from .cache_designs import plot_policies, plot_quality, policies_markdown, quality_markdown
from .memory import (breakdown_markdown, oom_frontier, plot_breakdown, plot_timelines, prediction_markdown,
                     ratio_table, timeline_markdown, timeline_pair)
from .paper import markdown as paper_markdown
from .paper import table2
from .plots import plot_memory_vs_depth, plot_memory_vs_seq_len, plot_throughput
from .speed import capacity_markdown, capacity_table, plot_capacity, speed_markdown
from .views import (BREAKDOWN_PLOT, CAPACITY_PLOT, MIB, PLOTS, POLICIES_PLOT, QUALITY_PLOT, TIMELINE_PLOT,
                    plot_view, policies_of, schedule_label, schedules)


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


def markdown(df: pd.DataFrame, view: pd.DataFrame, title: str) -> str:
    """report.md's first sections: what was measured, the MELT / LoopLM ratios, the paper's Table
    2, predicted against measured memory, the OOM frontier, the plots and every point."""
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
