"""The report's memory sections: MELT / LoopLM ratios, the OOM frontier, predicted against
measured memory, where each peak goes, and the memory timeline of a pass."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..rows.files import MARKS_FILE, RESULT_FILE, TIMELINE_FILE  # noqa: E402
from ..rows.labels import design_label  # noqa: E402
from .views import BREAKDOWN_PLOT, MIB, ONE_PASS, PARTS, TIMELINE_PLOT, policies_of, save_figure  # noqa: E402


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
            "bench/measure/memory_model.py predicts each point's peaks from its config alone (weights, KV"
            " cache, largest activation set; docs/memory.md, \"The memory model\"). Error ="
            " predicted / measured - 1.", "", pd.DataFrame(stats).to_markdown(index=False, floatfmt=".3f"), ""]



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
             "Each phase's peak by who owns the memory (bench/measure/probes.py): the model's weights, the KV"
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
