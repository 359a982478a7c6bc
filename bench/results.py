"""The result row: its columns, how one is written (atomically) and how a folder of them is read."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd

from .config import MODEL_OPTIONS, BenchConfig

RESULT_FILE = "result.json"
TABLE_FILE = "table.parquet"

# A point is identified by these; a sweep skips a point whose identity already has a result
# measured by the same code (git_sha, see find_measured and same_code).
IDENTITY = ["model", "size", "loops", "seq_len", "batch", "new_tokens", "scenario", "dtype",
            "device", "probe", "prefill", *MODEL_OPTIONS, "mem_limit_mib", "seed", "checkpoint", "text", "compile",
            "compile_backend", "profile"]
# status: the memory pass (ok | oom | error); timing_status: the timing pass after it (empty when
# the point is not timed). A failed timing pass keeps the memory columns.
STATUS = ["status", "error", "timing_status", "timing_error"]
# The cache design the row measures (models.policies.policy_name: derived from model and kv_sharing).
DESIGN = ["policy"]
MEMORY = ["weights_bytes", "baseline_bytes", "kv_bytes_analytic", "kv_decode_bytes_analytic", "kv_bytes_measured",
          "kv_bytes_per_token", "peak_bytes", "peak_prefill_bytes", "peak_decode_bytes",
          "reserved_bytes", "nvml_used_bytes", "nvml_scope", "non_torch_bytes"]
# Where each phase's peak goes (bench/probes.py): by owner, summing to the tracked peak; on CUDA
# also the allocator's cached, unused share and what the process holds outside PyTorch (NVML).
BREAKDOWN_CATEGORIES = ["weights", "kv", "activations", "allocator", "outside_torch"]
MEMORY += [f"{phase}_{category}_bytes" for phase in ("prefill", "decode") for category in BREAKDOWN_CATEGORIES]
MEMORY += ["process_peak_rss_bytes"]  # the process's peak resident set (its whole life, on CPU and GPU)
# bench.memory_model's analytic prediction for the point (empty for a model it does not cover).
PREDICTED = ["predicted_kv_bytes", "predicted_prefill_bytes", "predicted_decode_bytes",
             "predicted_peak_bytes", "predicted_weights_bytes", "predicted_kv_decode_bytes",
             "predicted_prefill_activations_bytes", "predicted_decode_activations_bytes"]
# Speed: medians over the repeats, and their range (_min, _max).
SPEED = ["prefill_tokens_per_s", "prefill_tokens_per_s_min", "prefill_tokens_per_s_max",
         "decode_tokens_per_s", "decode_tokens_per_s_min", "decode_tokens_per_s_max",
         "token_latency_ms_p50", "token_latency_ms_p90", "bandwidth_utilization"]
# Against the machine's measured limits (bench/roofline.py): weights | kv | compute.
SPEED += ["decode_bound", "prefill_utilization", "prefill_bound"]
# scenario=score: the text's teacher-forced likelihood through the point's cache path (nats).
SCORE = ["scored_tokens", "nll", "perplexity"]
# The capacity search (bench/capacity.py), on its final row: the largest batch within the budget.
CAPACITY = ["budget_bytes", "capacity_max_batch", "capacity_first_oom"]
ENV = ["gpu_name", "torch_version", "cuda_version", "git_sha", "timestamp", "wall_s"]
ENV += ["copy_bytes_per_s", "matmul_flops_per_s",  # measured once per run (bench/env.py)
        "device_bandwidth_bytes_per_s"]              # the GPU's theoretical bandwidth (NVML)
COLUMNS = IDENTITY + DESIGN + STATUS + MEMORY + PREDICTED + SPEED + SCORE + CAPACITY + ENV


def identity(point: BenchConfig) -> dict:
    """The identity columns of a resolved point (see bench.config.resolve)."""
    values = dataclasses.asdict(point)
    return {k: values[k] for k in IDENTITY}


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Write `path` atomically: yields a temporary path in the same folder (same suffix, so writers
    that go by it still work) to write to; it then replaces `path` in one rename, readable by
    others as the umask allows (0644 under the usual 022). If the writing fails, `path` keeps its
    old content and the temporary file is removed. A reader, or a killed run, never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_row(folder: Path, row: dict) -> Path:
    """Write one row as JSON, atomically (atomic_file)."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / RESULT_FILE) as tmp, open(tmp, "w") as f:
        json.dump({k: row.get(k) for k in COLUMNS}, f, indent=1)
    return folder / RESULT_FILE


# Identity columns that tables written by earlier versions lack, and what those rows mean by them:
# before `prefill` existed, the standard model and the LoopLM prefilled in one pass.
LEGACY = {"checkpoint": None, "compile": None, "prefill": "one_pass", "compile_backend": None, "text": None,
          "profile": "none", "kv_ring": None, "kv_anchor": None, "kv_window": None}


def with_legacy_columns(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with the LEGACY identity columns it lacks, filled with what its rows meant, and the
    derived `policy` column."""
    from models.policies import policy_name

    for column, value in LEGACY.items():
        if column not in df.columns:
            df[column] = value
    policy = df["policy"] if "policy" in df.columns else pd.Series([None] * len(df), index=df.index)
    if policy.isna().any():
        sharing = df["kv_sharing"] if "kv_sharing" in df.columns else pd.Series([None] * len(df), index=df.index)
        df["policy"] = pd.Series([p if isinstance(p, str) else policy_name(m, None if pd.isna(k) else k)
                                  for p, m, k in zip(policy, df["model"], sharing)], index=df.index)
    return df


def load_rows(folder: Path | str) -> pd.DataFrame:
    """Every result row under `folder` (any depth), one per identity: the newest wins. A folder
    with no result.json but a gathered table.parquet (a committed reference run) reads that."""
    rows = [json.loads(p.read_text()) for p in sorted(Path(folder).rglob(RESULT_FILE))]
    if not rows and (Path(folder) / TABLE_FILE).exists():
        rows = with_legacy_columns(pd.read_parquet(Path(folder) / TABLE_FILE)).to_dict("records")
    df = pd.DataFrame(rows, columns=COLUMNS)
    if df.empty:
        return df
    df = with_legacy_columns(df)
    df = df.sort_values("timestamp").drop_duplicates(IDENTITY, keep="last")
    return df.sort_values(["model", "seq_len", "loops", "batch", "scenario"]).reset_index(drop=True)


def find_measured(folder: Path | str, ident: dict, git_sha: str | None = None) -> dict | None:
    """A row under `folder` with this identity and status ok or oom (an error is retried, and so
    is a timing pass that failed with an error), or None.
    Of several, one measured by the code version `git_sha` (see same_code) if there is one, else the
    newest: the caller measures again when same_code(row["git_sha"], git_sha) is false."""
    rows = [row for row in (json.loads(p.read_text()) for p in Path(folder).rglob(RESULT_FILE))
            if row.get("status") in ("ok", "oom") and row.get("timing_status") != "error"
            and all(row.get(k) == v for k, v in ident.items())]
    if not rows:
        return None
    return max(rows, key=lambda r: (same_code(r.get("git_sha"), git_sha), r.get("timestamp") or ""))


def same_code(row_sha: str | None, current_sha: str | None) -> bool:
    """Whether a row measured at `row_sha` counts as measured by the current code. An unknown
    version on either side (git missing, a row from elsewhere) matches."""
    return row_sha is None or current_sha is None or row_sha == current_sha
