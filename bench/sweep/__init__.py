"""The sweep: a command line becomes points, each point a Hydra job, the jobs a folder of rows.

    preflight.py     every point of a run or sweep composed and checked before Hydra starts
    app.py           a Hydra job: resolve, skip if already measured, measure, write the row
    progress.py      the line each point logs
    callbacks.py     after a multirun: the rows gathered into the table, report and plots
    profile_cost.py  what profile=timeline costs (python -m bench.sweep.profile_cost)
    portable.py      a sweep's multirun.yaml without this machine's paths, for committing

The top of the flow: the only part that runs Hydra's app and calls the others in order.
May import: bench.config, bench.measure, bench.rows, bench.report, models.
"""
