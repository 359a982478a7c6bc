"""What the quotes share: where the committed results are, reading them, and a Markdown table."""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd

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


@functools.lru_cache(maxsize=None)
def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path)


def summary_rows(root: Path, folder: str) -> pd.DataFrame:
    """The ok rows of a reference sweep that its report summarises: scenario generate (else
    decode), batch 1."""
    df = read_csv(root / folder / "table.csv")
    df = df[df.status == "ok"]
    scenario = "generate" if (df.scenario == "generate").any() else "decode"
    return df[(df.scenario == scenario) & (df.batch == 1)]


def value_at(df: pd.DataFrame, column: str, **where) -> float:
    rows = df
    for key, value in where.items():
        rows = rows[rows[key] == value]
    if len(rows) != 1:
        raise LookupError(f"{len(rows)} rows with {where}, expected one")
    return float(rows[column].iloc[0])


def mib(value: float) -> str:
    return f"{value / MIB:.1f}"


def markdown_table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A Markdown table: the first `left` columns aligned left, the rest right."""
    align = [":---" if i < left else "---:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def design_name(policy: str) -> str:
    from ...rows.labels import LABELS

    return LABELS.get(policy, policy)
