"""MELT post-training (spec section 5) on a synthetic multi-hop task, end to end.

    python train_melt.py                           # the default pipeline -> results/training/
    python train_melt.py preset=quick out_dir=/tmp/quick
    python train_melt.py variants=[melt,melt_last] melt.chunk_size=8

Trains a LoopLM teacher (cached), turns it into MELT (phase 1: interpolated K/V, phase 2:
attention-aligned distillation) for every variant, trains a standard model on the same data, and
writes checkpoints, a table (CSV + Markdown) and a plot. Settings: conf/train/ and
training/config.py.
"""

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from models.config import ConfigError
from training import config

CONF = str(Path(__file__).resolve().parent / "conf" / "train")
config.register()
log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        c = config.resolve(cfg)
    except ConfigError as e:
        print(f"train_melt.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    from training.pipeline import run

    run(c)


if __name__ == "__main__":
    main()
