"""meltbench's sweeper as Hydra sees it (Hydra takes sweepers from the hydra_plugins namespace
only): Hydra's basic sweeper without its second composition of every job before the launch.
run_bench.py's preflight (bench/sweep/preflight.py) has already composed and resolved each point
and stopped on a bad one; composing them again cost about 0.1 s a point."""

from typing import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class MeltbenchSweeper(BasicSweeper):
    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        return None  # the preflight checked every point of the sweep
