"""Result files: a point's row written atomically as JSON, a folder of rows read back as a table,
the rows a re-run finds already measured, and the names of every file a point or sweep writes."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd

from .schema import COLUMNS, IDENTITY

RESULT_FILE = "result.json"           # a point's row, in its folder
TABLE_FILE = "table.parquet"          # a sweep's gathered rows (and table.csv)
DRIFT_FILE = "drift.csv"              # beside a scored LoopLM's row: its K/V drift per loop
# profile=timeline and profile=snapshot (bench/measure/profiles.py), in the point's folder
TIMELINE_FILE, MARKS_FILE, SNAPSHOT_FILE = "timeline.parquet", "timeline_marks.parquet", "memory_snapshot.pickle"


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
    for column, value in LEGACY.items():
        if column not in df.columns:
            df[column] = value
    policy = df["policy"] if "policy" in df.columns else pd.Series([None] * len(df), index=df.index)
    if policy.isna().any():
        from models.cache_policies import policy_name  # torch comes with it: only for tables without `policy`

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
