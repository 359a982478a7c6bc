"""Memory ceilings for CI: every measured point against a committed byte limit, plus structural
guards that hold whatever the sizes (guards.py). Reading the files, checking, rewriting.

    python -m bench.gate check RESULTS [--ceilings FILE]            # exit 1 on a violation
    python -m bench.gate check RESULTS --update [--headroom 0.05]   # rewrite FILE from RESULTS

RESULTS is a results folder (its result.json rows, or its table.parquet) or a table (.csv or
.parquet). FILE defaults to conf/ceilings/ci.yaml, the ceilings of the sweep `make test` runs
(experiment=ci). A ceilings file:

    headroom: 0.05                  # what --update added on top of the measured bytes
    guards:                         # checked on every results folder that has the rows they need
      melt_flat_in_loops: 0.02      # MELT's peak at any depth <= at its smallest depth above 1, x 1.02
      melt_one_loop_is_standard: true     # MELT at loops 1 == standard + its gate weights (chunked prefill)
      ouro_kv_is_loops_x_standard: true   # LoopLM KV bytes == loops x the standard model's
      melt_kv_is_standard: true     # MELT KV bytes == the standard model's
      policy_kv_is_formula: true    # every cache policy's KV == its formula x the standard model's
      policy_flat_in_loops: 0.02    # a policy's peak flat across depths where its cache is
    ceilings:                       # one entry per point: its key, then byte limits
    - {policy: melt, size: small, loops: 4, seq_len: 256, batch: 1, scenario: generate,
       dtype: float32, probe: tracked, prefill: chunked, peak_bytes: 29807066,
       peak_decode_bytes: 27262156}

A point is found by KEY (findings.py); a ceiling whose point is missing from the results, or whose row
is not ok, fails, as does a row above its ceiling. Exit status: 0 all pass, 1 a check failed,
2 bad input (one line on stderr).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import yaml

from ..rows.files import RESULT_FILE, atomic_file, load_rows, with_legacy_columns
from ..rows.schema import IDENTITY
from .findings import KEY, LIMITED, Finding, norm, point_name
from .guards import GUARDS, TOLERANCES, check_guards

DEFAULT_CEILINGS = Path(__file__).resolve().parents[2] / "conf" / "ceilings" / "ci.yaml"


class CeilingError(ValueError):
    """Bad input: a ceilings file or a results path that cannot be checked."""



# -- input ----------------------------------------------------------------------------------

def load_results(path: Path | str) -> pd.DataFrame:
    """The rows of a results folder (result.json rows below it, else its table.parquet) or of a
    table file."""
    path = Path(path)
    if path.is_dir():
        df = load_rows(path)
        if df.empty:
            raise CeilingError(f"{path}: no {RESULT_FILE} or table.parquet in it")
    elif path.suffix in (".csv", ".parquet") and path.is_file():
        df = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    elif not path.exists():
        raise CeilingError(f"{path}: no such file or folder")
    else:
        raise CeilingError(f"{path}: not a results folder, .csv or .parquet")
    df = with_legacy_columns(df)
    missing = [c for c in [*IDENTITY, "status", *LIMITED] if c not in df.columns]
    if df.empty or missing:
        raise CeilingError(f"{path}: not a results table; "
                           + (f"missing columns {', '.join(missing)}" if missing else "no rows"))
    check_unique(df, path)
    return df.reset_index(drop=True)


def check_unique(df: pd.DataFrame, where) -> None:
    """Two rows with one KEY would share a ceiling: refuse, naming the column they differ in."""
    dup = df[df.duplicated(KEY, keep=False)]
    if dup.empty:
        return
    first = dup.groupby(KEY, dropna=False).head(2).iloc[:2]
    differ = [c for c in IDENTITY if c not in KEY and first[c].nunique(dropna=False) > 1]
    raise CeilingError(f"{where}: two rows for the point {point_name(first.iloc[0])} (they differ in "
                       f"{', '.join(differ) or 'nothing'}); ceilings are per {', '.join(KEY)}: "
                       f"check one setting of the other columns at a time")


def load_ceilings(path: Path | str) -> dict:
    """A ceilings file as {"headroom", "guards", "ceilings"}, checked."""
    path = Path(path)
    if not path.is_file():
        raise CeilingError(f"{path}: no such file (make one with: check RESULTS --update)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise CeilingError(f"{path}: bad YAML: {getattr(e, 'problem', e)}"
                           + (f" (line {mark.line + 1})" if mark else "")) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("ceilings"), list):
        raise CeilingError(f"{path}: expected a mapping with a 'ceilings' list (and optional "
                           f"'headroom', 'guards')")
    unknown = set(raw) - {"headroom", "guards", "ceilings"}
    if unknown:
        raise CeilingError(f"{path}: unknown key {sorted(unknown)[0]!r}; allowed: headroom, guards, ceilings")
    guards = raw.get("guards") or {}
    for name, value in guards.items():
        if name not in GUARDS:
            raise CeilingError(f"{path}: guards: unknown guard {name!r}; allowed: {', '.join(GUARDS)}")
        if name in TOLERANCES and not (_number(value) and value >= 0):
            raise CeilingError(f"{path}: guards: {name}: got {value!r}; allowed: a "
                               f"tolerance >= 0 (0.02 is 2 %)")
        if name not in TOLERANCES and not isinstance(value, bool):
            raise CeilingError(f"{path}: guards: {name}: got {value!r}; allowed: true | false")
    for i, entry in enumerate(raw["ceilings"], 1):
        where = f"{path}: ceilings #{i}"
        if not isinstance(entry, dict):
            raise CeilingError(f"{where}: expected a mapping of {', '.join(KEY)} and byte limits")
        if "model" in entry and "policy" not in entry:  # files written before `policy` named the design
            model = entry.pop("model")
            entry["policy"] = "per_loop" if model == "ouro" else model
        missing = [k for k in KEY if k not in entry]
        if missing:
            raise CeilingError(f"{where}: missing {', '.join(missing)}")
        extra = set(entry) - set(KEY) - set(LIMITED)
        if extra:
            raise CeilingError(f"{where}: unknown key {sorted(extra)[0]!r}; allowed: "
                               f"{', '.join(KEY + LIMITED)}")
        limits = [k for k in LIMITED if k in entry]
        if not limits:
            raise CeilingError(f"{where}: no limit; give {' and/or '.join(LIMITED)} in bytes")
        for k in limits:
            if isinstance(entry[k], bool) or not isinstance(entry[k], int) or entry[k] <= 0:
                raise CeilingError(f"{where}: {k}: got {entry[k]!r}; allowed: a number of bytes > 0")
    return {"headroom": raw.get("headroom"), "guards": guards, "ceilings": raw["ceilings"]}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- checks ---------------------------------------------------------------------------------

def check(df: pd.DataFrame, ceilings: dict) -> list[Finding]:
    """Every ceiling against its row, then every guard over the rows it applies to."""
    check_unique(df, "results")
    index = {tuple(norm(r[k]) for k in KEY): r for r in df.to_dict("records")}
    findings = []
    for entry in ceilings["ceilings"]:
        point = " ".join(f"{k}={entry[k]}" for k in KEY)
        row = index.get(tuple(norm(entry[k]) for k in KEY))
        if row is None:
            findings.append(Finding("ceiling", point, False, "not in the results (not measured)"))
            continue
        if row["status"] != "ok":
            findings.append(Finding("ceiling", point, False,
                                    f"status {row['status']}: {row.get('error') or ''}".rstrip(": ")))
            continue
        for column in LIMITED:
            if column not in entry:
                continue
            measured, limit = row[column], entry[column]
            if measured is None or pd.isna(measured):
                findings.append(Finding("ceiling", point, False, f"{column} missing"))
                continue
            excess = 100 * (measured / limit - 1)
            findings.append(Finding("ceiling", point, measured <= limit,
                                    f"{column} {int(measured):,} B, ceiling {limit:,} B ({excess:+.2f} %)"))
    return findings + check_guards(df, ceilings["guards"])


# -- update ---------------------------------------------------------------------------------

def updated(df: pd.DataFrame, headroom: float, guards: dict) -> dict:
    """Ceilings for every ok row of `df`: measured bytes x (1 + headroom), rounded up."""
    entries = []
    for r in df[df.status == "ok"].sort_values(KEY).to_dict("records"):
        entry = {k: norm(r[k]) for k in KEY}
        for column in LIMITED:
            if not pd.isna(r[column]):
                entry[column] = math.ceil(int(r[column]) * (1 + headroom))
        entries.append(entry)
    return {"headroom": headroom, "guards": guards, "ceilings": entries}


def write_ceilings(path: Path, ceilings: dict, source: str) -> None:
    header = (f"# Memory ceilings, written by: python -m bench.gate check {source} --update "
              f"--headroom {ceilings['headroom']}\n# Each limit is the measured bytes plus the "
              f"headroom. Format and guards: bench/gate/ceilings.py; docs/memory.md, \"Memory ceilings in CI\".\n")
    body = yaml.safe_dump({"headroom": ceilings["headroom"], "guards": ceilings["guards"]},
                          sort_keys=False)
    lines = ["ceilings:"] + [f"- {{{', '.join(f'{k}: {v}' for k, v in e.items())}}}"
                             for e in ceilings["ceilings"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(header + body + "\n".join(lines) + "\n")


# -- output ---------------------------------------------------------------------------------

def render(findings: list[Finding]) -> str:
    out = []
    for check_name in ["ceiling", *GUARDS]:
        mine = [f for f in findings if f.check == check_name]
        if not mine and check_name != "ceiling":
            continue
        failed = [f for f in mine if not f.ok]
        title = "ceilings" if check_name == "ceiling" else GUARDS[check_name]
        out.append(f"{title}: {len(mine) - len(failed)} of {len(mine)} pass")
        out += [f"  FAIL {f.point}: {f.detail}" for f in failed]
    failed = sum(not f.ok for f in findings)
    out.append(f"{len(findings)} checks: {len(findings) - failed} pass, {failed} FAIL")
    return "\n".join(out)
