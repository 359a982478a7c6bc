"""python -m bench.report SRC [--out DIR]: the table, plots and report of a folder of rows."""

from .build import main

main()
