"""python -m bench.gate check RESULTS [--ceilings FILE] [--update [--headroom H]]: result rows
against their memory ceilings and the structural guards (exit 0 all pass, 1 a check failed, 2 bad
input, one line on stderr). The format: bench/gate/ceilings.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .ceilings import (DEFAULT_CEILINGS, CeilingError, check, load_ceilings, load_results, render, updated,
                       write_ceilings)
from .guards import check_guards


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for any other bad input
        self.exit(2, f"{self.prog}: error: {message}; usage: {self.format_usage().strip()[7:]}\n")


def main(argv=None) -> int:
    parser = _Parser(prog="python -m bench.gate",
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
