"""The report: a folder of rows (or a committed table) -> table.csv / .parquet, report.md, plots.

    build.py          build(src): the table, every plot and report.md; python -m bench.report SRC
    views.py          the slice of a table a plot shows, the designs' colours and order, figure helpers
    plots.py          memory against depth and length, decode throughput
    memory.py         MELT / LoopLM ratios, OOM frontier, predicted vs measured, where the peak goes
    cache_designs.py  every cache design at depth; scored texts and the K/V drift behind them
    speed.py          speed against the machine's limits, the hf_llama peer, capacity
    paper.py          the MELT paper's Table 2 beside ours
    estimates.py      the fake probe and the memory model against measured peaks (GPU check)
    frontier.py       every design's memory beside its quality: table and frontier plot
    quotes/           figures the README and docs/ quote from committed results, kept equal to them

Reads result files and the row schema only: nothing here measures, and nothing imports the runner.
May import: bench.rows, models (a cache policy's published source, on use).
"""
