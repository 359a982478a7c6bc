"""meltbench's benchmark side, in the order its data flows:

    config.py   the settings of a point (BenchConfig, registered with Hydra) and their checks
    sweep/      the command line and Hydra: points composed and checked, one job per point, gather
    measure/    one point measured: model, probe, scenario (models/runtime.py), row
    rows/       the row's columns and its files: written atomically, read back, resumed
    report/     a folder of rows -> table, plots, report.md; figures the docs quote
    gate/       rows against committed memory ceilings and structural guards (CI)

Each part's __init__ says what it owns and which parts it may import ("May import:"); the
import graph test (tests/test_layout.py) holds every module to it, and docs/architecture.md
draws the map.
"""
