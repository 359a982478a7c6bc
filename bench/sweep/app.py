"""The Hydra app's job: one sweep point, from its composed config to its row on disk.

    resolve the config -> skip it if already measured -> measure it -> write its row -> log a line

run_bench.py calls run(cfg) once per point, in whatever process the launcher gives it (the basic
launcher's own, one per point for isolated, a Slurm job).
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ..config import resolve
from ..measure import capacity, machine
from ..measure.point import measure, write_drift
from ..rows.files import find_measured, same_code, write_row
from ..rows.schema import identity
from .progress import progress


def run(cfg: DictConfig) -> dict:
    """Run the point `cfg` inside a Hydra job and return its row (also written as result.json in
    the job's folder). In a multirun, a point whose identity already has a row under the sweep
    folder, measured by this code version (git_sha), is skipped and that row returned; a row from
    another version is measured again."""
    point = resolve(cfg)
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    job_num = hc.job.num if multirun else 0
    folder = Path(hc.runtime.output_dir)
    if point.capacity:  # a search over batch (bench/measure/capacity.py); it always runs, never resumes
        row = capacity.search(point, folder, measure)
        write_row(folder, row)
        progress(job_num, row, f"{row['status']}, largest batch within the budget: {row['capacity_max_batch']}")
        return row
    again = ""
    if multirun:
        sha = machine.info(point.device)["git_sha"]
        done = find_measured(hc.sweep.dir, identity(point), sha)
        if done is not None and same_code(done.get("git_sha"), sha):
            progress(job_num, done, "already measured, skipped")
            return done
        if done is not None:
            again = f" (measured again: the row was from git {done['git_sha']}, this is {sha})"
    row = measure(point, folder=folder)
    write_row(folder, row)
    if point.scenario == "score" and row["status"] == "ok" and row["policy"] == "per_loop":
        write_drift(point, folder)
    progress(job_num, row, row["status"] + again)
    return row
