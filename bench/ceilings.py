"""Memory ceilings for CI: every measured point against a committed byte limit, plus structural
guards that hold whatever the sizes.

    python -m bench.ceilings check RESULTS [--ceilings FILE]            # exit 1 on a violation
    python -m bench.ceilings check RESULTS --update [--headroom 0.05]   # rewrite FILE from RESULTS

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

A point is found by KEY (below); a ceiling whose point is missing from the results, or whose row
is not ok, fails, as does a row above its ceiling. Exit status: 0 all pass, 1 a check failed,
2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from .results import IDENTITY, RESULT_FILE, atomic_file, load_rows, with_legacy_columns

DEFAULT_CEILINGS = Path(__file__).resolve().parent.parent / "conf" / "ceilings" / "ci.yaml"
# What names a point in a ceilings file; rows that agree on these must agree on everything else.
# (policy: the cache design, models.policies.policy_name: the LoopLM's kv_sharing, else the model)
KEY = ["policy", "size", "loops", "seq_len", "batch", "scenario", "dtype", "probe", "prefill"]
LIMITED = ["peak_bytes", "peak_decode_bytes"]  # the columns a ceiling limits
GUARDS = {"melt_flat_in_loops": "MELT peak flat in loops",
          "melt_one_loop_is_standard": "MELT at one loop = standard + its gates",
          "ouro_kv_is_loops_x_standard": "LoopLM KV = loops x standard",
          "melt_kv_is_standard": "MELT KV = standard",
          "policy_kv_is_formula": "cache policies' KV = their formula x standard",
          "policy_flat_in_loops": "cache policies' peaks flat where their cache is"}


TOLERANCES = ("melt_flat_in_loops", "policy_flat_in_loops")  # guards set by a tolerance, the others by true


class CeilingError(ValueError):
    """Bad input: a ceilings file or a results path that cannot be checked."""


@dataclass
class Finding:
    check: str       # "ceiling" or a guard's name
    point: str       # key=value ... of the point (or the pair of points)
    ok: bool
    detail: str      # the measured bytes, the limit, the excess


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
    _check_unique(df, path)
    return df.reset_index(drop=True)


def _check_unique(df: pd.DataFrame, where) -> None:
    """Two rows with one KEY would share a ceiling: refuse, naming the column they differ in."""
    dup = df[df.duplicated(KEY, keep=False)]
    if dup.empty:
        return
    first = dup.groupby(KEY, dropna=False).head(2).iloc[:2]
    differ = [c for c in IDENTITY if c not in KEY and first[c].nunique(dropna=False) > 1]
    raise CeilingError(f"{where}: two rows for the point {_name(first.iloc[0])} (they differ in "
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


def _name(row) -> str:
    return " ".join(f"{k}={row[k]}" for k in KEY)


# -- checks ---------------------------------------------------------------------------------

def check(df: pd.DataFrame, ceilings: dict) -> list[Finding]:
    """Every ceiling against its row, then every guard over the rows it applies to."""
    _check_unique(df, "results")
    index = {tuple(_norm(r[k]) for k in KEY): r for r in df.to_dict("records")}
    findings = []
    for entry in ceilings["ceilings"]:
        point = " ".join(f"{k}={entry[k]}" for k in KEY)
        row = index.get(tuple(_norm(entry[k]) for k in KEY))
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


NEEDS = {"melt_flat_in_loops": "a MELT setting measured at two depths above 1",
         "melt_one_loop_is_standard": "a MELT row at loops 1 and a standard row of the same setting, chunked prefill",
         "policy_kv_is_formula": "a LoopLM or LoopCoder row and a standard row of the same setting",
         "policy_flat_in_loops": "a LoopLM setting measured at two depths with the same cache size",
         "ouro_kv_is_loops_x_standard": "a LoopLM row and a standard row of the same setting",
         "melt_kv_is_standard": "a MELT row and a standard row of the same setting"}


def check_guards(df: pd.DataFrame, guards: dict) -> list[Finding]:
    """The structural guards switched on in `guards`. One that finds nothing to compare fails: a
    guard must not pass by having no rows."""
    ok = df[df.status == "ok"]
    findings = []
    for name, setting in guards.items():
        if setting is False:
            continue
        if name == "melt_flat_in_loops":
            found = _melt_flat(ok, float(setting))
        elif name == "melt_one_loop_is_standard":
            found = _melt_one_loop(ok)
        elif name == "policy_kv_is_formula":
            found = _policy_kv(ok)
        elif name == "policy_flat_in_loops":
            found = _policy_flat(ok, float(setting))
        elif name == "ouro_kv_is_loops_x_standard":  # the per-loop LoopLM (Ouro's own cache)
            per_loop = ok[(ok.model != "ouro") | ok.kv_sharing.isna() | (ok.kv_sharing == "per_loop")]
            found = _kv_vs_standard(per_loop, "ouro", lambda loops: loops, name)
        else:
            found = _kv_vs_standard(ok, "melt", lambda loops: 1, name)
        findings += found or [Finding(name, "-", False, f"nothing to compare: the results need {NEEDS[name]} "
                                                        f"(or set {name}: false)")]
    return findings


def _norm(value):
    """Key values as plain Python (1 == 1.0 == numpy 1), so YAML and table entries match."""
    if isinstance(value, float) and math.isnan(value):
        return None  # a missing value, as pandas reads it
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value.item() if hasattr(value, "item") else value


def _melt_flat(ok: pd.DataFrame, tolerance: float) -> list[Finding]:
    """Per MELT setting: the peak at every depth <= the peak at its smallest depth above 1 x
    (1 + tolerance). (With one loop MELT keeps no latent: it is the standard model plus its gates,
    the guard melt_one_loop_is_standard.)"""
    melt = ok[(ok.model == "melt") & (ok.loops > 1)]
    others = [c for c in IDENTITY if c != "loops"]
    findings = []
    for _, group in melt.groupby(others, dropna=False):
        findings += _flat(group, LIMITED, "melt_flat_in_loops", tolerance)
    return findings


def _flat(group: pd.DataFrame, columns: list[str], guard: str, tolerance: float, why: str = "") -> list[Finding]:
    """Every row of `group` (one setting at several depths) deeper than its shallowest: each of
    `columns` within `tolerance` of the shallowest row's."""
    if len(group) < 2:
        return []
    base = group.loc[group.loops.idxmin()]
    findings = []
    for column in columns:
        for r in group[group.loops > base.loops].to_dict("records"):
            if pd.isna(r[column]) or pd.isna(base[column]):
                continue
            ratio = r[column] / base[column]
            findings.append(Finding(
                guard, _name(r), ratio <= 1 + tolerance,
                f"{column} {int(r[column]):,} B = {ratio:.4f} x loops={int(base.loops)} "
                f"({int(base[column]):,} B){why}; allowed <= {1 + tolerance:g}"))
    return findings


SAME_SETTING = ["size", "seq_len", "batch", "new_tokens", "scenario", "dtype", "device", "probe"]


def _melt_one_loop(ok: pd.DataFrame) -> list[Finding]:
    """Per MELT row at loops 1 with a standard row of the same setting, both prefilled in the same
    chunks: its peaks exceed the standard model's by exactly its extra weights (the gates)."""
    key = SAME_SETTING + ["prefill", "chunk_size"]
    chunked = ok[ok.prefill == "chunked"]
    standard = {tuple(_norm(r[c]) for c in key): r for r in chunked[chunked.model == "standard"].to_dict("records")}
    findings = []
    for r in chunked[(chunked.model == "melt") & (chunked.loops == 1)].to_dict("records"):
        s = standard.get(tuple(_norm(r[c]) for c in key))
        if s is None:
            continue
        gates = int(r["weights_bytes"]) - int(s["weights_bytes"])
        for column in LIMITED:
            if pd.isna(r[column]) or pd.isna(s[column]):
                continue
            extra = int(r[column]) - int(s[column])
            findings.append(Finding("melt_one_loop_is_standard", _name(r), extra == gates,
                                    f"{column} {int(r[column]):,} B - standard {int(s[column]):,} B = "
                                    f"{extra:,} B; MELT's extra weights {gates:,} B"))
    return findings


def _policy_kv(ok: pd.DataFrame) -> list[Finding]:
    """Per LoopLM (any cache policy) or LoopCoder row with a standard row of the same setting: its
    cache as allocated, and after the prefill, is the policy's formula times the standard model's
    (cache-policies.md): groups x standard for the LoopLM, standard plus (T - 1) windows of
    min(W, L) rows for LoopCoder."""
    from models.policies import POLICIES

    standard = {tuple(_norm(r[c]) for c in SAME_SETTING): r for r in ok[ok.model == "standard"].to_dict("records")}
    findings = []
    for r in ok[ok.model.isin(["ouro", "loopcoder"])].to_dict("records"):
        s = standard.get(tuple(_norm(r[c]) for c in SAME_SETTING))
        if s is None or pd.isna(r["kv_bytes_measured"]) or pd.isna(s["kv_bytes_measured"]):
            continue
        base, loops = int(s["kv_bytes_measured"]), int(r["loops"])
        if r["model"] == "ouro":
            policy = POLICIES[_norm(r["kv_sharing"]) or "per_loop"]
            sizes = (loops, int(_norm(r["kv_ring"]) or 1), int(_norm(r["kv_anchor"]) or 1))
            want, want_decode = base * policy.groups(*sizes), base * policy.decode_groups(*sizes)
            how = f"{policy.groups(*sizes)} / {policy.decode_groups(*sizes)} x standard"
        else:
            length = int(r["seq_len"]) + int(r["new_tokens"])
            want = want_decode = base + (loops - 1) * base * min(int(r["kv_window"]), length) // length
            how = f"standard + {loops - 1} windows of {min(int(r['kv_window']), length)} rows"
        got, got_decode = int(r["kv_bytes_measured"]), r.get("kv_decode_bytes_analytic")
        ok_decode = got_decode is None or pd.isna(got_decode) or int(got_decode) == want_decode
        findings.append(Finding("policy_kv_is_formula", _name(r),
                                got == want and ok_decode,
                                f"KV {got:,} B (after the prefill {_norm(got_decode)}), want {want:,} / {want_decode:,} B = {how}"))
    return findings


def _policy_flat(ok: pd.DataFrame, tolerance: float) -> list[Finding]:
    """Per LoopLM setting (policy and sizes): at every depth whose cache is the size it is at the
    smallest such depth, the peak stays within tolerance of that depth's: peak_bytes where the
    allocated cache is equal, peak_decode_bytes where the cache after the prefill is."""
    looped = ok[ok.model == "ouro"]
    others = [c for c in IDENTITY if c != "loops"]
    findings = []
    for _, group in looped.groupby(others, dropna=False):
        for column, sizes in (("peak_bytes", ["kv_bytes_analytic", "kv_decode_bytes_analytic"]),
                              ("peak_decode_bytes", ["kv_decode_bytes_analytic"])):
            for _, same in group.groupby(sizes):   # rows without the sizes (older tables) are not compared
                findings += _flat(same, [column], "policy_flat_in_loops", tolerance, ", same cache")
    return findings


def _kv_vs_standard(ok: pd.DataFrame, model: str, factor, name: str) -> list[Finding]:
    """Per `model` row with a standard row of the same setting: KV bytes == factor(loops) x its."""
    same = SAME_SETTING
    standard = {tuple(_norm(r[c]) for c in same): r for r in ok[ok.model == "standard"].to_dict("records")}
    findings = []
    for r in ok[ok.model == model].to_dict("records"):
        s = standard.get(tuple(_norm(r[c]) for c in same))
        if s is None or pd.isna(r["kv_bytes_measured"]) or pd.isna(s["kv_bytes_measured"]):
            continue
        want = factor(int(r["loops"])) * int(s["kv_bytes_measured"])
        got = int(r["kv_bytes_measured"])
        findings.append(Finding(name, _name(r), got == want,
                                f"KV {got:,} B, standard {int(s['kv_bytes_measured']):,} B x "
                                f"{factor(int(r['loops']))} = {want:,} B"))
    return findings


# -- update ---------------------------------------------------------------------------------

def updated(df: pd.DataFrame, headroom: float, guards: dict) -> dict:
    """Ceilings for every ok row of `df`: measured bytes x (1 + headroom), rounded up."""
    entries = []
    for r in df[df.status == "ok"].sort_values(KEY).to_dict("records"):
        entry = {k: _norm(r[k]) for k in KEY}
        for column in LIMITED:
            if not pd.isna(r[column]):
                entry[column] = math.ceil(int(r[column]) * (1 + headroom))
        entries.append(entry)
    return {"headroom": headroom, "guards": guards, "ceilings": entries}


def write_ceilings(path: Path, ceilings: dict, source: str) -> None:
    header = (f"# Memory ceilings, written by: python -m bench.ceilings check {source} --update "
              f"--headroom {ceilings['headroom']}\n# Each limit is the measured bytes plus the "
              f"headroom. Format and guards: bench/ceilings.py; docs/memory.md, \"Memory ceilings in CI\".\n")
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


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for any other bad input
        self.exit(2, f"{self.prog}: error: {message}; usage: {self.format_usage().strip()[7:]}\n")


def main(argv=None) -> int:
    parser = _Parser(prog="python -m bench.ceilings",
                     description="Check result rows against memory ceilings (exit 0 all pass, "
                                 "1 a check failed, 2 bad input), or rewrite the ceilings.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("check", help="check RESULTS against the ceilings file")
    run.add_argument("results", help="results folder, or a table .csv / .parquet")
    run.add_argument("--ceilings", default=str(DEFAULT_CEILINGS),
                     help="ceilings YAML (default: conf/ceilings/ci.yaml)")
    run.add_argument("--update", action="store_true",
                     help="rewrite the ceilings file from RESULTS instead of failing")
    run.add_argument("--headroom", type=float, default=None,
                     help="with --update: the fraction added to each measured value (default: the "
                          "file's, else 0.05)")
    args = parser.parse_args(argv)
    if args.headroom is not None and not (args.update and 0 <= args.headroom < 10):
        parser.error("--headroom goes with --update and is a fraction >= 0 (0.05 is 5 %)")
    try:
        df = load_results(args.results)
        path = Path(args.ceilings)
        old = load_ceilings(path) if not args.update or path.exists() else None
        if args.update:
            headroom = args.headroom if args.headroom is not None else (
                (old or {}).get("headroom") or 0.05)
            guards = (old or {}).get("guards")
            if guards is None:  # a new file: every guard these results can exercise
                every = {"melt_flat_in_loops": 0.02, "melt_one_loop_is_standard": True,
                         "ouro_kv_is_loops_x_standard": True, "melt_kv_is_standard": True,
                         "policy_kv_is_formula": True, "policy_flat_in_loops": 0.02}
                guards = {name: value for name, value in every.items()
                          if not any(f.point == "-" for f in check_guards(df, {name: value}))}
            new = updated(df, headroom, guards)
            findings = check(df, new)  # the guards must hold before the file changes
            if not all(f.ok for f in findings):
                print(render(findings))
                print(f"{path}: not updated: a guard fails on these results", file=sys.stderr)
                return 1
            write_ceilings(path, new, str(args.results))
            print(f"{path}: {len(new['ceilings'])} ceilings from {len(df)} rows "
                  f"(headroom {headroom:g}); guards pass ({len(findings)} checks)")
            return 0
        findings = check(df, old)
    except CeilingError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.results}: {len(df)} rows; ceilings: {args.ceilings}")
    print(render(findings))
    return 0 if all(f.ok for f in findings) else 1


if __name__ == "__main__":
    sys.exit(main())
