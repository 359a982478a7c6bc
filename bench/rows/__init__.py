"""The rows: what a point's measurement becomes, and the files that hold it.

    schema.py   the columns of a row (identity, status, memory, predictions, speed, environment)
    files.py    a row written atomically, a folder of rows read back, what a re-run skips, file names
    labels.py   what to call a row's cache design in tables, plots and progress lines

Owns the format every other part agrees on. Imports no torch: reading results needs no model.
May import: models (only to name the design of a table written without its `policy` column).
"""
