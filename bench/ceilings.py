"""Memory ceilings for CI: check result rows against limits written in YAML.

    python -m bench.ceilings RESULTS [CEILINGS_YAML ...]

RESULTS is a results folder (its result.json rows, or else its table.parquet) or a table
file (.csv or .parquet). Without CEILINGS_YAML, conf/ceilings/cpu_small.yaml is used.
Prints one line per check; exits 0 when all pass, 1 when any fails, 2 on bad input (one line).

A ceilings file is a YAML list of rules (README.md, "Memory ceilings in CI"):

    - name: MELT, 2048 tokens            # optional, shown in the table
      where: "model == 'melt' and seq_len == 2048"   # pandas DataFrame.query string; required
      peak_bytes: 55                     # absolute: every matching row's peak_bytes <= 55 MiB
      peak_decode_bytes: 43
    - where: "model == 'melt'"
      flat_in: loops                     # relative: in each group of rows equal in every other
      tolerance: 0.02                    #   identity column, max/min over loops <= 1 + tolerance
      columns: [peak_bytes, peak_decode_bytes]

A rule that matches no row is an error (a typo must not pass silently), and so is a flat_in rule
with no group holding two values of its column. A matching row whose status is oom or error fails
the rule.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from omegaconf import OmegaConf

from .results import IDENTITY, MEMORY, RESULT_FILE, load_rows

MIB = 2**20
DEFAULT_CEILINGS = Path(__file__).resolve().parent.parent / "conf" / "ceilings" / "cpu_small.yaml"
# Columns a ceiling can limit: the memory columns that hold bytes.
BYTE_COLUMNS = [c for c in MEMORY if c.endswith("_bytes")]
RULE_KEYS = ["name", "where", "flat_in", "tolerance", "columns"]


class CeilingError(ValueError):
    """Bad input: a ceilings file, a rule or a results path that cannot be checked."""


@dataclass
class Rule:
    label: str                 # name (file#index) for the table and errors
    where: str
    limits: dict[str, float]   # column -> MiB
    flat_in: str | None = None
    tolerance: float = 0.0
    columns: list[str] = field(default_factory=list)


@dataclass
class Check:
    rule: str
    check: str
    rows: int
    value: str
    limit: str
    ok: bool
    details: list[str] = field(default_factory=list)  # one line per failing row or group


# -- input ----------------------------------------------------------------------------------

def load_results(path: Path | str) -> pd.DataFrame:
    """The rows of a results folder (result.json rows below it, else its table.parquet) or of a
    table file."""
    path = Path(path)
    if path.is_dir():
        df = load_rows(path)  # result.json rows below it, else its gathered table.parquet
        if df.empty:
            raise CeilingError(f"{path}: no {RESULT_FILE} or table.parquet in it")
    elif path.suffix == ".csv" and path.is_file():
        df = pd.read_csv(path)
    elif path.suffix == ".parquet" and path.is_file():
        df = pd.read_parquet(path)
    elif not path.exists():
        raise CeilingError(f"{path}: no such file or folder")
    else:
        raise CeilingError(f"{path}: not a results folder, .csv or .parquet")
    if df.empty:
        raise CeilingError(f"{path}: no result rows")
    if "checkpoint" not in df.columns:  # an identity column newer than tables written before it
        df["checkpoint"] = None
    missing = [c for c in [*IDENTITY, "status"] if c not in df.columns]
    if missing:
        raise CeilingError(f"{path}: not a results table; missing columns {', '.join(missing)}")
    return df.reset_index(drop=True)


def load_ceilings(path: Path | str) -> list[Rule]:
    """The rules of one ceilings file."""
    path = Path(path)
    if not path.is_file():
        raise CeilingError(f"{path}: no such file")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except yaml.YAMLError as e:
        raise CeilingError(f"{path}: bad YAML: {_yaml_problem(e)}") from None
    except Exception as e:  # noqa: BLE001 - OmegaConf's errors (interpolation...), made one line
        raise CeilingError(f"{path}: {_first_line(e)}") from None
    if not isinstance(raw, list) or not raw:
        raise CeilingError(f"{path}: expected a YAML list of rules (- where: ...), "
                           f"got {type(raw).__name__ if raw else 'nothing'}")
    return [_rule(item, f"{path.name}#{i}") for i, item in enumerate(raw, 1)]


def _rule(item, where_from: str) -> Rule:
    if not isinstance(item, dict):
        raise CeilingError(f"{where_from}: a rule is a mapping (where: ..., <column>: MiB), "
                           f"got {item!r}")
    label = f"{item['name']} ({where_from})" if item.get("name") else where_from

    def bad(message: str) -> CeilingError:
        return CeilingError(f"{label}: {message}")

    where = item.get("where")
    if not isinstance(where, str) or not where.strip():
        raise bad("'where' is required: a DataFrame.query string, e.g. \"model == 'melt'\"")
    limits = {}
    for key, value in item.items():
        if key in RULE_KEYS:
            continue
        if key not in BYTE_COLUMNS:
            raise bad(f"unknown key {key!r}; allowed: {', '.join(RULE_KEYS + BYTE_COLUMNS)}")
        if not _number(value) or value <= 0:
            raise bad(f"{key}: got {value!r}; allowed: a ceiling in MiB, a number > 0")
        limits[key] = float(value)
    flat_in, columns = item.get("flat_in"), item.get("columns")
    tolerance = item.get("tolerance", 0.0)
    if flat_in is None:
        if columns is not None or "tolerance" in item:
            raise bad("'columns' and 'tolerance' go with 'flat_in'")
        if not limits:
            raise bad(f"no check; give a ceiling (<column>: MiB, columns: "
                      f"{', '.join(BYTE_COLUMNS)}) or flat_in")
        return Rule(label, where, limits)
    if flat_in not in IDENTITY:
        raise bad(f"flat_in: unknown column {flat_in!r}; allowed: {', '.join(IDENTITY)}")
    if isinstance(columns, str):
        columns = [columns]
    if not columns or not isinstance(columns, list):
        raise bad("flat_in needs 'columns': a list of memory columns, e.g. [peak_bytes]")
    for c in columns:
        if c not in BYTE_COLUMNS:
            raise bad(f"columns: unknown column {c!r}; allowed: {', '.join(BYTE_COLUMNS)}")
    if not _number(tolerance) or tolerance < 0:
        raise bad(f"tolerance: got {tolerance!r}; allowed: a number >= 0 (0.02 is 2 %)")
    return Rule(label, where, limits, flat_in, float(tolerance), list(columns))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None) or _first_line(e)
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- checks ---------------------------------------------------------------------------------

def select(df: pd.DataFrame, rule: Rule) -> pd.DataFrame:
    """The rows `rule.where` matches; a bad query, or one matching nothing, is a CeilingError."""
    try:
        mask = df.eval(rule.where)
    except Exception as e:  # noqa: BLE001 - pandas raises many kinds for a bad expression
        raise CeilingError(f"{rule.label}: bad where {rule.where!r}: {_first_line(e)}") from None
    if not isinstance(mask, pd.Series) or not pd.api.types.is_bool_dtype(mask):
        raise CeilingError(f"{rule.label}: where {rule.where!r} is not a condition; "
                           f"allowed: a comparison, e.g. \"model == 'melt' and loops > 1\"")
    rows = df[mask.fillna(False).astype(bool)]
    if rows.empty:
        raise CeilingError(f"{rule.label}: where {rule.where!r} matches no row")
    return rows


def check(df: pd.DataFrame, rules: list[Rule]) -> list[Check]:
    """Every check of every rule against the rows of `df`."""
    for rule in rules:
        missing = [c for c in [*rule.limits, *rule.columns] if c not in df.columns]
        if missing:
            raise CeilingError(f"{rule.label}: the results have no column {missing[0]!r}")
    checks = []
    for rule in rules:
        rows = select(df, rule)
        name = _namer(rows)
        ok = rows[rows.status == "ok"]
        bad = rows[rows.status != "ok"]
        if not bad.empty:
            counts = ", ".join(f"{n} {s}" for s, n in bad.status.value_counts(dropna=False).items())
            checks.append(Check(
                rule.label, "status", len(rows), counts, "ok", False,
                [f"{name(r)}: status {r['status']}"
                 + (f" ({r['error']})" if _present(r.get("error")) else "")
                 for r in bad.to_dict("records")]))
        for column, mib in rule.limits.items():
            checks.append(_absolute(rule, ok, len(rows), column, mib, name))
        for column in rule.columns:
            checks.append(_flat(rule, ok, len(rows), column, name))
    return checks


def _absolute(rule, ok, n, column, mib, name) -> Check:
    values = pd.to_numeric(ok[column], errors="coerce")
    records = ok.to_dict("records")
    details = [f"{name(r)}: {column} missing" for r, v in zip(records, values) if pd.isna(v)]
    details += [f"{name(r)}: {column} {v / MIB:.2f} MiB > {mib:g} MiB"
                for r, v in zip(records, values) if v > mib * MIB]
    worst = f"{values.max() / MIB:.2f} MiB" if values.notna().any() else "-"
    return Check(rule.label, column, n, worst, f"<= {mib:g} MiB", not details, details)


def _flat(rule, ok, n, column, name) -> Check:
    others = [c for c in IDENTITY if c != rule.flat_in]
    values = pd.to_numeric(ok[column], errors="coerce")
    details = [f"{name(r)}: {column} missing"
               for r, v in zip(ok.to_dict("records"), values) if pd.isna(v)]
    ratios = []
    frame = ok.assign(_value=values).dropna(subset=["_value"])
    for _, group in frame.groupby(others, dropna=False, sort=False):
        if group[rule.flat_in].nunique() < 2:
            continue
        low = group.loc[group["_value"].idxmin()].to_dict()
        high = group.loc[group["_value"].idxmax()].to_dict()
        lo, hi = low["_value"], high["_value"]
        ratio = hi / lo if lo > 0 else (1.0 if hi == 0 else math.inf)
        ratios.append(ratio)
        if ratio > 1 + rule.tolerance:
            details.append(f"{name(high)}: {column} {hi / MIB:.2f} MiB is {ratio:.4f}x that at "
                           f"{rule.flat_in}={_fmt(low[rule.flat_in])} ({lo / MIB:.2f} MiB)")
    if not ratios and not details:
        raise CeilingError(f"{rule.label}: flat_in {rule.flat_in}: no group of matching ok rows "
                           f"has two values of {rule.flat_in}, so nothing is compared")
    worst = f"{max(ratios):.4f} max/min" if ratios else "-"
    return Check(rule.label, f"{column} flat in {rule.flat_in}", n, worst,
                 f"<= {1 + rule.tolerance:g}", not details, details)


def _present(value) -> bool:
    return not (pd.api.types.is_scalar(value) and pd.isna(value))


def _namer(rows: pd.DataFrame):
    """row -> 'model=melt loops=4 seq_len=2048': model, loops, seq_len and any other identity
    column that varies among a rule's `rows` (empty values left out)."""
    shown = ["model", "loops", "seq_len"]
    shown += [c for c in IDENTITY if c not in shown and rows[c].nunique(dropna=False) > 1]

    def name(row: dict) -> str:
        return " ".join(f"{c}={_fmt(row[c])}" for c in shown if _present(row[c]))

    return name


def _fmt(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# -- output ---------------------------------------------------------------------------------

def render(checks: list[Check]) -> str:
    head = ("rule", "check", "rows", "value", "limit", "result")
    body = [(c.rule, c.check, str(c.rows), c.value, c.limit, "pass" if c.ok else "FAIL")
            for c in checks]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [line(head), line(tuple("-" * w for w in widths))]
    for c, r in zip(checks, body):
        out.append(line(r))
        out += [f"    FAIL {d}" for d in c.details]
    failed = sum(not c.ok for c in checks)
    out.append(f"{len(checks)} checks: {len(checks) - failed} pass, {failed} FAIL")
    return "\n".join(out)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for any other bad input
        self.exit(2, f"{self.prog}: error: {message}; usage: {self.format_usage().strip()[7:]}\n")


def main(argv=None) -> int:
    parser = _Parser(prog="python -m bench.ceilings",
                     description="Check result rows against memory ceilings (exit 0 all pass, "
                                 "1 a check failed, 2 bad input).")
    parser.add_argument("results", help="results folder, or a table .csv / .parquet")
    parser.add_argument("ceilings", nargs="*", default=[str(DEFAULT_CEILINGS)],
                        help="ceilings YAML files (default: conf/ceilings/cpu_small.yaml)")
    args = parser.parse_args(argv)
    try:
        df = load_results(args.results)
        rules = [rule for path in args.ceilings for rule in load_ceilings(path)]
        checks = check(df, rules)
    except CeilingError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.results}: {len(df)} rows; ceilings: {', '.join(args.ceilings)}")
    print(render(checks))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
