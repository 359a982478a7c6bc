"""The gate: result rows against committed memory ceilings and structural guards, for CI.

    ceilings.py   the ceilings file (format, reading, rewriting) and the check of every point
    guards.py     what must hold between rows whatever the sizes (MELT flat in loops, KV formulas)
    findings.py   a check's outcome and how a point is named
    cli.py        python -m bench.gate check RESULTS [--ceilings FILE] [--update]

Reads rows, never measures; imports no torch until a guard needs a cache policy's formula.
May import: bench.rows, models (the cache policies' formulas, on use).
"""
