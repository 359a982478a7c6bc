"""Hydra callback: after a multirun, gather the points' rows into the sweep's table, report, plots."""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("bench")


class GatherResults(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ..report.build import build  # pandas and matplotlib load only when a sweep ends

        folder = config.hydra.sweep.dir
        table = build(folder)
        log.info("%d rows -> %s/table.csv, report.md and plots", len(table), folder)
