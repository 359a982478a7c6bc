"""meltbench: memory and speed of MELT, an Ouro-style LoopLM and a standard LLM.

    python run_bench.py model=melt size=small loops=4 seq_len=1024 batch=1 scenario=decode
    python run_bench.py -m experiment=memory_vs_depth
    python run_bench.py -m model=standard,ouro,melt loops=1,2,4,8 seq_len=512,2048

Settings: conf/config.yaml and bench/config.py. Rows, tables and plots: bench/results.py and
bench/report.py.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from bench import cli, config

CONF = str(Path(__file__).resolve().parent / "conf")
config.register()


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def main(cfg: DictConfig) -> dict:
    from bench.runner import run

    try:
        return run(cfg)
    except config.ConfigError as e:  # normally caught by the preflight already
        cli.fail(str(e))


if __name__ == "__main__":
    cli.preflight(sys.argv[1:], CONF, "config")
    main()
