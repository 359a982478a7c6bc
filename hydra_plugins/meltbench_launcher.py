"""meltbench's Slurm launcher as Hydra sees it (Hydra takes launchers from the hydra_plugins
namespace only): submitit's SlurmLauncher, its launch and its jobs' set-up done by
bench/sweep/slurm.py. Kept light: Hydra imports every plugin module when it starts."""

from typing import Any, Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher


class MeltbenchSlurmLauncher(SlurmLauncher):
    """Waits for every job; a job the scheduler ended becomes its point's row; never requeues."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from bench.sweep.slurm import launch

        return launch(self, job_overrides, initial_job_idx)

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        from bench.sweep.slurm import in_job

        in_job()
        return super().__call__(*args, **kwargs)

    def checkpoint(self, *args: Any, **kwargs: Any) -> None:
        return None  # a point is never requeued
