"""The measurement: one resolved point in, one row out.

    point.py         measure(point): the model under a probe, the scenario (models/runtime.py), the row
    probes.py        tracked (live tensors), fake (no allocation), cuda (the caching allocator)
    profiles.py      what a point records beyond its row: a timeline, a CUDA memory snapshot
    memory_model.py  the analytic prediction of a point's peaks, from its config alone
    machine.py       the environment columns, NVML, the machine's measured bandwidth and matmul rate
    roofline.py      the speed columns against those limits (what bounds a phase)
    capacity.py      the largest batch within a memory budget (a search over measure())
    drift.py         how far a LoopLM's K/V move from loop to loop
    scored_text.py   the tokens of a text that scenario=score reads

Runs no Hydra and writes only the files a point asks for (its profile, its drift, capacity trials).
May import: bench.config, bench.rows, models.
"""
