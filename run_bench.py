"""meltbench: memory and speed of MELT, an Ouro-style LoopLM and a standard LLM.

    python run_bench.py model=melt size=small loops=4 seq_len=1024 batch=1 scenario=decode
    python run_bench.py -m experiment=memory_vs_depth
    python run_bench.py -m model=standard,ouro,melt loops=1,2,4,8 seq_len=512,2048

Settings: conf/config.yaml and bench/config.py. The flow from here to a row, a table and a plot:
docs/architecture.md.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from bench import config
from bench.sweep import preflight

CONF = str(Path(__file__).resolve().parent / "conf")
config.register()


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def main(cfg: DictConfig) -> dict:
    from bench.sweep.app import run  # imported on use: --help and bad input need no torch

    try:
        return run(cfg)
    except config.ConfigError as e:  # normally caught by the preflight already
        preflight.fail(str(e))


if __name__ == "__main__":
    preflight.preflight(sys.argv[1:], CONF, "config")
    main()
