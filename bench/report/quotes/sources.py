"""Each quoted figure: its name, the committed result files it reads, and the exact text it makes
of them (QUOTES). markers.py puts them into the Markdown; designs.py makes the cache designs'."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from . import designs
from .layout import PARTS, imports_table, part_file
from .read import (CPU, CPU_ONE_PASS, H200, MIB, PAPER, POLICIES, QUALITY, ROOT, SPEED, TRAINING,
                   markdown_table, mib, read_csv, summary_rows, value_at)


@dataclass(frozen=True)
class Quote:
    sources: tuple[str, ...]      # files it reads, relative to the repository root
    make: Callable[[Path], str]   # root -> the exact text
    table: bool = False           # a block of lines (markers on lines of their own), else inline


# -- the quotes -----------------------------------------------------------------------------------

def cpu_headline(root: Path) -> str:
    """Peak memory against loops at 2048 tokens, and MELT / LoopLM (as report.md computes it)."""
    df = summary_rows(root, CPU)
    df = df[df.seq_len == 2048]
    standard = value_at(df, "peak_bytes", model="standard", loops=1)
    rows = []
    for loops in sorted(df[df.model == "ouro"].loops.unique()):
        ouro = value_at(df, "peak_bytes", model="ouro", loops=loops)
        melt = value_at(df, "peak_bytes", model="melt", loops=loops)
        rows.append([str(loops), mib(standard), mib(ouro), mib(melt), f"{melt / ouro:.3f}"])
    return markdown_table(["loops", "standard", "LoopLM (Ouro)", "MELT", "MELT / LoopLM"], rows)


def cpu_loops1(root: Path) -> str:
    """The three models at one loop: MELT is the standard model plus its gate weights."""
    df = summary_rows(root, CPU)
    rows = []
    for model, label in (("standard", "standard"), ("ouro", "LoopLM (Ouro)"), ("melt", "MELT")):
        one = df[(df.model == model) & (df.loops == 1)]
        rows.append([label, mib(value_at(one, "weights_bytes", seq_len=512))]
                    + [mib(value_at(one, column, seq_len=n))
                       for column in ("peak_bytes", "peak_decode_bytes") for n in (512, 2048)])
    return markdown_table(["model (loops 1)", "weights", "peak, 512", "peak, 2048", "decode peak, 512",
                          "decode peak, 2048"], rows)


def cpu_schedules(root: Path) -> str:
    """MELT / LoopLM peak at 2048 tokens per loops, under each prefill schedule."""
    rows = []
    for folder, label in ((CPU, "chunked (equal chunks of 500)"), (CPU_ONE_PASS, "one pass (MELT in chunks)")):
        df = summary_rows(root, folder)
        df = df[df.seq_len == 2048]
        peak = {(m, n): value_at(df, "peak_bytes", model=m, loops=n) for m in ("melt", "ouro") for n in (1, 4, 8, 16)}
        rows.append([label] + [f"{peak['melt', n] / peak['ouro', n]:.3f}" for n in (1, 4, 8, 16)])
    return markdown_table(["prefill schedule", "loops 1", "loops 4", "loops 8", "loops 16"], rows)


def cpu_make_bench_wall(root: Path) -> str:
    """The wall time environment.txt records for the reference `make bench`."""
    text = (root / CPU / "environment.txt").read_text()
    match = re.search(r"\((\d+m\d+s) wall", text)
    if not match:
        raise LookupError("no '(<m>m<s>s wall' in environment.txt")
    return match.group(1)


def paper_prediction_error(root: Path) -> str:
    """Largest |predicted / measured - 1| of the memory model against the fake probe, in %, over
    the paper_table2 points' prefill and decode peaks."""
    df = summary_rows(root, PAPER)
    errors = [df[f"predicted_{phase}_bytes"] / df[f"peak_{phase}_bytes"] - 1
              for phase in ("prefill", "decode")]
    return f"{100 * max(e.abs().max() for e in errors):.2f}"


DECODE_RUNS = [  # (label, folder under results/reference/cpu-speed)
    ("eager, 2 threads", "decode_speed_quiet"),
    ("eager, 1 thread", "decode_speed_1thread"),
    ("compiled, 1 thread", "decode_speed_1thread_compiled"),
    ("eager, 2 threads, busy machine", "decode_speed"),
]


def speed_decode(root: Path) -> str:
    """Decode tokens/s of each committed decode_speed run."""
    rows = []
    for label, folder in DECODE_RUNS:
        df = summary_rows(root, f"{SPEED}/{folder}")
        speed = {m: value_at(df, "decode_tokens_per_s", model=m) if (df.model == m).any() else None
                 for m in ("standard", "hf_llama", "ouro", "melt")}
        cells = [f"{v:.1f}" if v else "not run" for v in speed.values()]
        peer = f"{speed['standard'] / speed['hf_llama']:.2f}" if speed["hf_llama"] else ""
        rows.append([label, *cells, peer, f"{speed['melt'] / speed['ouro']:.2f}"])
    return markdown_table(["run", "standard", "hf_llama", "LoopLM (Ouro)", "MELT", "standard / hf_llama",
                          "MELT / LoopLM"], rows)


def speed_capacity(root: Path) -> str:
    """The capacity searches: measured at size small and estimated (fake probe) at Ouro-1.4B."""
    small = read_csv(root / SPEED / "capacity_1thread" / "table.csv")
    large = read_csv(root / SPEED / "capacity_fake_ouro-1.4b_32k" / "table.csv")
    small, large = small[small.capacity_max_batch.notna()], large[large.capacity_max_batch.notna()]
    rows = []
    for model, label in (("standard", "standard"), ("ouro", "LoopLM (Ouro)"), ("melt", "MELT"),
                         ("hf_llama", "hf_llama")):
        cells = [label, f"{value_at(small, 'capacity_max_batch', model=model):.0f}",
                 f"{value_at(small, 'decode_tokens_per_s', model=model):.0f}"]
        cells.append(f"{value_at(large, 'capacity_max_batch', model=model):.0f}"
                     if (large.model == model).any() else "not run")
        rows.append(cells)
    return markdown_table(["model", "max batch, small", "decode tok/s at it", "max batch, Ouro-1.4B (fake)"],
                          rows)


COMPILE_TIME = f"{SPEED}/compile_time"
COMPILE_RUNS = ("whole_step_torch2.13.csv", "layers_torch2.13.csv", "layers_torch2.11.csv")


def speed_compile_time(root: Path) -> str:
    """Cold compile seconds of the decode step per design and depth: compiled as one graph, and as
    layer functions (both torch versions), with the graphs and the compiled and eager step times."""
    whole, layers, older = (read_csv(root / COMPILE_TIME / name).set_index(["design", "loops"]) for name in COMPILE_RUNS)

    def cell(table: pd.DataFrame, key, column: str) -> str:
        if key not in table.index:
            return "not run"
        row = table.loc[key]
        if isinstance(row.get("error"), str):
            return f"over {row.error.split()[-2]} s" if column == "compile_s" else ""
        return f"{row[column]:.1f}"

    rows = []
    for key, row in layers.iterrows():
        rows.append([key[0], str(key[1]), cell(whole, key, "compile_s"), cell(layers, key, "compile_s"),
                     cell(older, key, "compile_s"), f"{row.graphs:.0f}", cell(whole, key, "step_ms"),
                     f"{row.step_ms:.1f}", f"{row.eager_ms:.1f}"])
    return markdown_table(["design", "loops", "compile s, one graph", "compile s, layer functions",
                           "same, torch 2.11", "graphs", "step ms, one graph", "step ms, layer functions",
                           "step ms, eager"], rows, left=1)


def training_table(root: Path) -> str:
    """The post-training reference table (the columns of its table.md)."""
    df = read_csv(root / TRAINING / "table.csv")
    rows = [[r.row, f"{r.accuracy:.3f}", f"{r.heldout_loss:.4f}", f"{r.kv_bytes_per_token:.0f}",
             f"{r.peak_gen_bytes / MIB:.2f}", "" if pd.isna(r.train_wall_s) else f"{r.train_wall_s:.0f}"]
            for r in df.itertuples()]
    return markdown_table(["row", "accuracy", "held-out loss", "KV B/token", "peak MiB, 1024-token generate",
                          "train s"], rows)


def _training(root: Path, column: str, row: str = "melt") -> float:
    return value_at(read_csv(root / TRAINING / "table.csv"), column, row=row)


def training_kv_fraction(root: Path) -> str:
    fraction = _training(root, "kv_vs_teacher")
    inverse = round(1 / fraction)
    return f"1/{inverse}" if abs(fraction * inverse - 1) < 1e-9 else f"{fraction:.2f}"


def training_pipeline_wall(root: Path) -> str:
    """The reference run's wall time from its run.json, in whole minutes."""
    seconds = json.loads((root / TRAINING / "run.json").read_text())["pipeline_wall_s"]
    return f"{round(seconds / 60)} min"



def h200_memory(root: Path) -> str:
    """CUDA peak against prompt length on the H200 (loops 4, Ouro-1.4B, bfloat16), MELT / LoopLM,
    and the share of MELT's peak that is neither weights nor KV cache."""
    df = summary_rows(root, f"{H200}/memory_vs_seq_len")
    rows = []
    for n in sorted(df.seq_len.unique()):
        peak = {m: value_at(df, "peak_bytes", model=m, seq_len=n) for m in ("standard", "ouro", "melt")}
        melt = df[(df.model == "melt") & (df.seq_len == n)].iloc[0]
        rest = 1 - (melt.weights_bytes + melt.kv_bytes_analytic) / melt.peak_bytes
        rows.append([f"{n:,}", *(mib(v) for v in peak.values()), f"{peak['melt'] / peak['ouro']:.3f}",
                     f"{100 * rest:.2f} %"])
    return markdown_table(["prompt tokens", "standard", "LoopLM (Ouro)", "MELT", "MELT / LoopLM",
                          "MELT beyond weights + KV"], rows)


def h200_estimate_error(root: Path) -> str:
    """Largest |estimate / CUDA peak - 1| in %, of the fake probe and of the memory model."""
    df = read_csv(root / H200 / "estimates" / "estimate_vs_cuda.csv")
    return (f"{df['fake error %'].abs().max():.2f} % (fake probe) and "
            f"{df['predicted error %'].abs().max():.2f} % (memory model)")


def h200_decode(root: Path) -> str:
    """Decode tokens/s and bandwidth utilization at 4,096 tokens: eager, and compiled where it ran."""
    rows = []
    for folder, label in (("decode_speed_eager", "eager"), ("decode_speed", "compiled, CUDA graphs")):
        df = summary_rows(root, f"{H200}/{folder}")
        for model in ("standard", "hf_llama", "ouro", "melt"):
            if (df.model == model).any():
                rows.append([model, label, f"{value_at(df, 'decode_tokens_per_s', model=model):.1f}",
                             f"{100 * value_at(df, 'bandwidth_utilization', model=model):.1f} %"])
    return markdown_table(["model", "decode step", "tokens/s", "bandwidth util"], rows, left=2)



QUOTES: dict[str, Quote] = {
    "cpu.headline": Quote((f"{CPU}/table.csv",), cpu_headline, table=True),
    "cpu.loops1": Quote((f"{CPU}/table.csv",), cpu_loops1, table=True),
    "cpu.schedules": Quote((f"{CPU}/table.csv", f"{CPU_ONE_PASS}/table.csv"), cpu_schedules, table=True),
    "cpu.make_bench_wall": Quote((f"{CPU}/environment.txt",), cpu_make_bench_wall),
    "paper_table2.prediction_error_pct": Quote((f"{PAPER}/table.csv",), paper_prediction_error),
    "speed.decode": Quote(tuple(f"{SPEED}/{f}/table.csv" for _, f in DECODE_RUNS), speed_decode,
                          table=True),
    "speed.capacity": Quote((f"{SPEED}/capacity_1thread/table.csv",
                             f"{SPEED}/capacity_fake_ouro-1.4b_32k/table.csv"), speed_capacity,
                            table=True),
    "speed.compile_time": Quote(tuple(f"{COMPILE_TIME}/{name}" for name in COMPILE_RUNS), speed_compile_time,
                                table=True),
    "training.table": Quote((f"{TRAINING}/table.csv",), training_table, table=True),
    "training.melt_of_teacher": Quote((f"{TRAINING}/table.csv",),
                                      lambda root: f"{_training(root, 'accuracy_vs_teacher'):.3f}"),
    "training.melt_kv_fraction": Quote((f"{TRAINING}/table.csv",), training_kv_fraction),
    "training.pipeline_wall": Quote((f"{TRAINING}/run.json",), training_pipeline_wall),
    "policies.summary": Quote((f"{QUALITY}/table.csv",), designs.policies_summary, table=True),
    "policies.memory": Quote((f"{POLICIES}/table.csv",), designs.policies_memory, table=True),
    "policies.quality": Quote((f"{POLICIES}/table.csv",), designs.policies_quality, table=True),
    "policies.drift": Quote((f"{POLICIES}/drift.csv",), designs.policies_drift, table=True),
    "policies.pipeline_wall": Quote((f"{POLICIES}/run.json",), designs.policies_pipeline_wall),
    "h200.memory": Quote((f"{H200}/memory_vs_seq_len/table.csv",), h200_memory, table=True),
    "h200.estimate_error": Quote((f"{H200}/estimates/estimate_vs_cuda.csv",), h200_estimate_error),
    "h200.decode": Quote((f"{H200}/decode_speed_eager/table.csv", f"{H200}/decode_speed/table.csv"),
                         h200_decode, table=True),
    "quality.depth_sweep": Quote((f"{QUALITY}/depth_sweep.csv",), designs.quality_depth_sweep, table=True),
    "quality.designs": Quote((f"{QUALITY}/depth/quality.csv", f"{QUALITY}/text/quality.csv"), designs.quality_designs,
                             table=True),
    "quality.exits": Quote((f"{QUALITY}/depth/exits.csv", f"{QUALITY}/text/exits.csv"), designs.quality_exits,
                           table=True),
    "quality.text_drift": Quote((f"{QUALITY}/text/drift.csv",), designs.quality_text_drift, table=True),
    "quality.from_empty_wall": Quote((f"{QUALITY}/from-empty/run.json",), designs.quality_from_empty_wall),
    "layout.imports": Quote(tuple(str(part_file(Path("."), p)) for p in PARTS), imports_table, table=True),
}
