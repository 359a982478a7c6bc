"""Each quoted figure: its name, the committed result files it reads, and the exact text it makes
of them (QUOTES). markers.py puts them into the Markdown."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from .layout import PARTS, imports_table, part_file

ROOT = Path(__file__).resolve().parents[3]  # the repository
MIB = 2**20
CPU = "results/reference/cpu"
CPU_ONE_PASS = "results/reference/cpu-one-pass"
SPEED = "results/reference/cpu-speed"
TRAINING = "results/reference/training"
PAPER = "results/reference/paper_table2"
POLICIES = "results/reference/policies"
H200 = "results/reference/NVIDIA_H200"
QUALITY = "results/reference/quality"


@dataclass(frozen=True)
class Quote:
    sources: tuple[str, ...]      # files it reads, relative to the repository root
    make: Callable[[Path], str]   # root -> the exact text
    table: bool = False           # a block of lines (markers on lines of their own), else inline


# -- reading the committed results ----------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path)


def _rows(root: Path, folder: str) -> pd.DataFrame:
    """The ok rows of a reference sweep that its report summarises: scenario generate (else
    decode), batch 1."""
    df = _csv(root / folder / "table.csv")
    df = df[df.status == "ok"]
    scenario = "generate" if (df.scenario == "generate").any() else "decode"
    return df[(df.scenario == scenario) & (df.batch == 1)]


def _at(df: pd.DataFrame, column: str, **where) -> float:
    rows = df
    for key, value in where.items():
        rows = rows[rows[key] == value]
    if len(rows) != 1:
        raise LookupError(f"{len(rows)} rows with {where}, expected one")
    return float(rows[column].iloc[0])


def _mib(value: float) -> str:
    return f"{value / MIB:.1f}"


def _markdown(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A Markdown table: the first `left` columns aligned left, the rest right."""
    align = [":---" if i < left else "---:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


# -- the quotes -----------------------------------------------------------------------------------

def cpu_headline(root: Path) -> str:
    """Peak memory against loops at 2048 tokens, and MELT / LoopLM (as report.md computes it)."""
    df = _rows(root, CPU)
    df = df[df.seq_len == 2048]
    standard = _at(df, "peak_bytes", model="standard", loops=1)
    rows = []
    for loops in sorted(df[df.model == "ouro"].loops.unique()):
        ouro = _at(df, "peak_bytes", model="ouro", loops=loops)
        melt = _at(df, "peak_bytes", model="melt", loops=loops)
        rows.append([str(loops), _mib(standard), _mib(ouro), _mib(melt), f"{melt / ouro:.3f}"])
    return _markdown(["loops", "standard", "LoopLM (Ouro)", "MELT", "MELT / LoopLM"], rows)


def cpu_loops1(root: Path) -> str:
    """The three models at one loop: MELT is the standard model plus its gate weights."""
    df = _rows(root, CPU)
    rows = []
    for model, label in (("standard", "standard"), ("ouro", "LoopLM (Ouro)"), ("melt", "MELT")):
        one = df[(df.model == model) & (df.loops == 1)]
        rows.append([label, _mib(_at(one, "weights_bytes", seq_len=512))]
                    + [_mib(_at(one, column, seq_len=n))
                       for column in ("peak_bytes", "peak_decode_bytes") for n in (512, 2048)])
    return _markdown(["model (loops 1)", "weights", "peak, 512", "peak, 2048", "decode peak, 512",
                      "decode peak, 2048"], rows)


def cpu_schedules(root: Path) -> str:
    """MELT / LoopLM peak at 2048 tokens per loops, under each prefill schedule."""
    rows = []
    for folder, label in ((CPU, "chunked (equal chunks of 500)"), (CPU_ONE_PASS, "one pass (MELT in chunks)")):
        df = _rows(root, folder)
        df = df[df.seq_len == 2048]
        rows.append([label] + [f"{_at(df, 'peak_bytes', model='melt', loops=n) / _at(df, 'peak_bytes', model='ouro', loops=n):.3f}"
                               for n in (1, 4, 8, 16)])
    return _markdown(["prefill schedule", "loops 1", "loops 4", "loops 8", "loops 16"], rows)


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
    df = _rows(root, PAPER)
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
        df = _rows(root, f"{SPEED}/{folder}")
        speed = {m: _at(df, "decode_tokens_per_s", model=m) if (df.model == m).any() else None
                 for m in ("standard", "hf_llama", "ouro", "melt")}
        cells = [f"{v:.1f}" if v else "not run" for v in speed.values()]
        peer = f"{speed['standard'] / speed['hf_llama']:.2f}" if speed["hf_llama"] else ""
        rows.append([label, *cells, peer, f"{speed['melt'] / speed['ouro']:.2f}"])
    return _markdown(["run", "standard", "hf_llama", "LoopLM (Ouro)", "MELT", "standard / hf_llama",
                      "MELT / LoopLM"], rows)


def speed_capacity(root: Path) -> str:
    """The capacity searches: measured at size small and estimated (fake probe) at Ouro-1.4B."""
    small = _csv(root / SPEED / "capacity_1thread" / "table.csv")
    large = _csv(root / SPEED / "capacity_fake_ouro-1.4b_32k" / "table.csv")
    small, large = small[small.capacity_max_batch.notna()], large[large.capacity_max_batch.notna()]
    rows = []
    for model, label in (("standard", "standard"), ("ouro", "LoopLM (Ouro)"), ("melt", "MELT"),
                         ("hf_llama", "hf_llama")):
        cells = [label, f"{_at(small, 'capacity_max_batch', model=model):.0f}",
                 f"{_at(small, 'decode_tokens_per_s', model=model):.0f}"]
        cells.append(f"{_at(large, 'capacity_max_batch', model=model):.0f}"
                     if (large.model == model).any() else "not run")
        rows.append(cells)
    return _markdown(["model", "max batch, small", "decode tok/s at it", "max batch, Ouro-1.4B (fake)"],
                     rows)


def training_table(root: Path) -> str:
    """The post-training reference table (the columns of its table.md)."""
    df = _csv(root / TRAINING / "table.csv")
    rows = [[r.row, f"{r.accuracy:.3f}", f"{r.heldout_loss:.4f}", f"{r.kv_bytes_per_token:.0f}",
             f"{r.peak_gen_bytes / MIB:.2f}", "" if pd.isna(r.train_wall_s) else f"{r.train_wall_s:.0f}"]
            for r in df.itertuples()]
    return _markdown(["row", "accuracy", "held-out loss", "KV B/token", "peak MiB, 1024-token generate",
                      "train s"], rows)


def _training(root: Path, column: str, row: str = "melt") -> float:
    return _at(_csv(root / TRAINING / "table.csv"), column, row=row)


def training_kv_fraction(root: Path) -> str:
    fraction = _training(root, "kv_vs_teacher")
    inverse = round(1 / fraction)
    return f"1/{inverse}" if abs(fraction * inverse - 1) < 1e-9 else f"{fraction:.2f}"


def training_pipeline_wall(root: Path) -> str:
    """The reference run's wall time from its run.json, in whole minutes."""
    seconds = json.loads((root / TRAINING / "run.json").read_text())["pipeline_wall_s"]
    return f"{round(seconds / 60)} min"


# What each design keeps per layer (N layers, T loops); the formulas of models/cache_policies.py and the
# models' nbytes().
KEEPS = {"standard": "1 slot", "per_loop": "T slots", "last_loop": "T slots, 1 after the prefill",
         "first_loop": "T slots, 1 after the prefill", "mean_loops": "T slots, 1 after the prefill",
         "ring": "K slots", "anchor": "A + K slots", "first_writes": "1 slot (loop 0 writes)",
         "melt": "1 gated slot", "loopcoder": "1 slot + (T - 1) windows of W rows"}


def _policies(root: Path) -> pd.DataFrame:
    return _csv(root / POLICIES / "table.csv")


def _accuracy(df: pd.DataFrame, policy: str, teacher: str, training: tuple[str, ...]) -> str:
    rows = df[(df.policy == policy) & (df.teacher == teacher) & df.training.isin(training)]
    return f"{float(rows.accuracy_vs_teacher.iloc[0]):.3f}" if len(rows) == 1 else ""


def policies_summary(root: Path) -> str:
    """Per design: what it keeps, where it comes from, its KV cache per token while decoding and its
    decode peak at Ouro-1.4B, and the accuracy it keeps of the teacher's on the task."""
    df = _policies(root)
    rows = []
    for design in df.drop_duplicates("policy").itertuples():
        rows.append([_design(design.policy), KEEPS.get(design.policy, ""), design.source,
                     f"{design.ouro_kv_per_token_decode / 1e6:.3f}", f"{design.ouro_decode_peak_gb:.1f}",
                     _accuracy(df, design.policy, "ouro", ("zero-shot", "pretrained")),
                     _accuracy(df, design.policy, "last_exit", ("zero-shot", "pretrained")),
                     _accuracy(df, design.policy, "last_exit", ("post-trained",))])
    return _markdown(["design", "keeps per layer", "from", "KV MB/token", "decode peak GB",
                      "zero-shot, ouro", "zero-shot, last_exit", "post-trained, last_exit"], rows, left=3)


def policies_memory(root: Path) -> str:
    """Per design at Ouro-1.4B (fake probe): KV per token in prefill and decode, both peaks."""
    df = _policies(root).drop_duplicates("policy")
    rows = [[_design(d.policy), f"{d.ouro_kv_per_token / 1e6:.3f}", f"{d.ouro_kv_per_token_decode / 1e6:.3f}",
             f"{d.ouro_prefill_peak_gb:.2f}", f"{d.ouro_decode_peak_gb:.2f}"] for d in df.itertuples()]
    return _markdown(["design", "KV MB/token, prefill", "KV MB/token, decode", "prefill peak GB",
                      "decode peak GB"], rows)


def policies_quality(root: Path) -> str:
    """Per design, under each teacher: the accuracy it keeps of the teacher's, with the teacher's
    weights (zero-shot; pretrained for the teacher and the standard model) and post-trained."""
    df = _policies(root)
    teachers = list(dict.fromkeys(df.teacher))
    rows = [[_design(policy)] + [_accuracy(df, policy, teacher, training) for teacher in teachers
                                 for training in (("zero-shot", "pretrained"), ("post-trained",))]
            for policy in dict.fromkeys(df.policy)]
    return _markdown(["design", *[f"{t}: {w}" for t in teachers for w in ("zero-shot", "post-trained")]], rows)


def _design(policy: str) -> str:
    from ...rows.labels import LABELS

    return LABELS.get(policy, policy)


def policies_drift(root: Path) -> str:
    """Each teacher's keys and values at loop 0 and the loop before the last, against the last
    loop's: cosine similarity over the tokens."""
    df = _csv(root / POLICIES / "drift.csv")
    rows = []
    for (teacher, layer, kind), g in df.groupby(["teacher", "layer", "kind"], sort=False):
        last = g.loop.max()
        rows.append([teacher, str(layer), kind] + [f"{_at(g, 'cos_vs_last', loop=t):.2f}" for t in range(last)])
    loops = int(df.loop.max())
    return _markdown(["teacher", "layer", "kind", *[f"loop {t}" for t in range(loops)]], rows, left=3)


def policies_pipeline_wall(root: Path) -> str:
    seconds = json.loads((root / POLICIES / "run.json").read_text())["pipeline_wall_s"]
    return f"{round(seconds / 60)} min"


def h200_memory(root: Path) -> str:
    """CUDA peak against prompt length on the H200 (loops 4, Ouro-1.4B, bfloat16), MELT / LoopLM,
    and the share of MELT's peak that is neither weights nor KV cache."""
    df = _rows(root, f"{H200}/memory_vs_seq_len")
    rows = []
    for n in sorted(df.seq_len.unique()):
        peak = {m: _at(df, "peak_bytes", model=m, seq_len=n) for m in ("standard", "ouro", "melt")}
        melt = df[(df.model == "melt") & (df.seq_len == n)].iloc[0]
        rest = 1 - (melt.weights_bytes + melt.kv_bytes_analytic) / melt.peak_bytes
        rows.append([f"{n:,}", *(_mib(v) for v in peak.values()), f"{peak['melt'] / peak['ouro']:.3f}",
                     f"{100 * rest:.2f} %"])
    return _markdown(["prompt tokens", "standard", "LoopLM (Ouro)", "MELT", "MELT / LoopLM",
                      "MELT beyond weights + KV"], rows)


def h200_estimate_error(root: Path) -> str:
    """Largest |estimate / CUDA peak - 1| in %, of the fake probe and of the memory model."""
    df = _csv(root / H200 / "estimates" / "estimate_vs_cuda.csv")
    return (f"{df['fake error %'].abs().max():.2f} % (fake probe) and "
            f"{df['predicted error %'].abs().max():.2f} % (memory model)")


def h200_decode(root: Path) -> str:
    """Decode tokens/s and bandwidth utilization at 4,096 tokens: eager, and compiled where it ran."""
    rows = []
    for folder, label in (("decode_speed_eager", "eager"), ("decode_speed", "compiled, CUDA graphs")):
        df = _rows(root, f"{H200}/{folder}")
        for model in ("standard", "hf_llama", "ouro", "melt"):
            if (df.model == model).any():
                rows.append([model, label, f"{_at(df, 'decode_tokens_per_s', model=model):.1f}",
                             f"{100 * _at(df, 'bandwidth_utilization', model=model):.1f} %"])
    return _markdown(["model", "decode step", "tokens/s", "bandwidth util"], rows, left=2)


def quality_depth_sweep(root: Path) -> str:
    """The sweep that chose the depth setting: per run, its task and size, the teacher's accuracy
    at each exit, the standard model's and their ratio."""
    df = _csv(root / QUALITY / "depth_sweep.csv")
    rows = [[r.task, str(r.symbols), str(r.hops), f"{r.layers} x d{r.width}, {r.heads} heads",
             str(r.steps), str(r.seed), r.exits.strip("[]"),
             "" if pd.isna(r.standard_acc) else f"{r.standard_acc:.3f}",
             "" if pd.isna(r.ratio) else f"{r.ratio:.2f}"] for r in df.itertuples()]
    return _markdown(["task", "symbols", "hops / M", "layers", "steps", "seed", "teacher at exits 1..T",
                      "standard", "standard / teacher"], rows, left=4)


def quality_designs(root: Path) -> str:
    """Each design's share of the per-loop teacher kept, on the depth and the text settings, and
    the text's bits per byte."""
    depth = _csv(root / QUALITY / "depth" / "quality.csv")
    text = _csv(root / QUALITY / "text" / "quality.csv")
    rows = []
    for d, t in zip(depth.itertuples(), text.itertuples()):
        if (d.policy, d.training) != (t.policy, t.training):
            raise LookupError(f"rows differ: {d.policy} {d.training} / {t.policy} {t.training}")
        rows.append([_design(d.policy), d.training, f"{d.accuracy_vs_teacher:.3f}",
                     f"{t.accuracy_vs_teacher:.3f}", f"{t.bits_per_byte:.3f}"])
    return _markdown(["design", "training", "depth: retained", "text: retained (next byte)",
                      "text: bits per byte"], rows, left=2)


def quality_exits(root: Path) -> str:
    """The teachers cut at 1..T loops: depth accuracy, text bits per byte and accuracy."""
    depth = _csv(root / QUALITY / "depth" / "exits.csv")
    text = _csv(root / QUALITY / "text" / "exits.csv")
    rows = [[str(d.exit), f"{d.accuracy:.3f}", f"{t.bits_per_byte:.3f}", f"{t.accuracy:.3f}"]
            for d, t in zip(depth.itertuples(), text.itertuples())]
    return _markdown(["loops", "depth: accuracy", "text: bits per byte", "text: next-byte accuracy"], rows)


def quality_text_drift(root: Path) -> str:
    """On text, each loop's K/V against the last loop's (cosine), per layer."""
    df = _csv(root / QUALITY / "text" / "drift.csv")
    rows = []
    for (layer, kind), g in df.groupby(["layer", "kind"], sort=True):
        rows.append([str(layer), kind] + [f"{c:.3f}" for c in g.sort_values("loop").cos_vs_last])
    loops = sorted(df.loop.unique())
    return _markdown(["layer", "kind"] + [f"loop {n}" for n in loops], rows, left=2)


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
    "training.table": Quote((f"{TRAINING}/table.csv",), training_table, table=True),
    "training.melt_of_teacher": Quote((f"{TRAINING}/table.csv",),
                                      lambda root: f"{_training(root, 'accuracy_vs_teacher'):.3f}"),
    "training.melt_kv_fraction": Quote((f"{TRAINING}/table.csv",), training_kv_fraction),
    "training.pipeline_wall": Quote((f"{TRAINING}/run.json",), training_pipeline_wall),
    "policies.summary": Quote((f"{POLICIES}/table.csv",), policies_summary, table=True),
    "policies.memory": Quote((f"{POLICIES}/table.csv",), policies_memory, table=True),
    "policies.quality": Quote((f"{POLICIES}/table.csv",), policies_quality, table=True),
    "policies.drift": Quote((f"{POLICIES}/drift.csv",), policies_drift, table=True),
    "policies.pipeline_wall": Quote((f"{POLICIES}/run.json",), policies_pipeline_wall),
    "h200.memory": Quote((f"{H200}/memory_vs_seq_len/table.csv",), h200_memory, table=True),
    "h200.estimate_error": Quote((f"{H200}/estimates/estimate_vs_cuda.csv",), h200_estimate_error),
    "h200.decode": Quote((f"{H200}/decode_speed_eager/table.csv", f"{H200}/decode_speed/table.csv"),
                         h200_decode, table=True),
    "quality.depth_sweep": Quote((f"{QUALITY}/depth_sweep.csv",), quality_depth_sweep, table=True),
    "quality.designs": Quote((f"{QUALITY}/depth/quality.csv", f"{QUALITY}/text/quality.csv"), quality_designs,
                             table=True),
    "quality.exits": Quote((f"{QUALITY}/depth/exits.csv", f"{QUALITY}/text/exits.csv"), quality_exits, table=True),
    "quality.text_drift": Quote((f"{QUALITY}/text/drift.csv",), quality_text_drift, table=True),
    "layout.imports": Quote(tuple(str(part_file(Path("."), p)) for p in PARTS), imports_table, table=True),
}
