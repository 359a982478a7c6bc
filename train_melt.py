"""MELT post-training (spec section 5) on a synthetic multi-hop task, end to end.

    python train_melt.py                           # the default pipeline -> results/training/
    python train_melt.py preset=quick out_dir=results/training_quick
    python train_melt.py variants=[melt,melt_last] melt.chunk_size=8
    python train_melt.py preset=policies          # every cache policy's quality -> results/policies/
    python train_melt.py preset=depth             # the same on the S3 products task (depth needed)
    python train_melt.py preset=text              # the same on stdlib Python source, byte-level

Trains a LoopLM teacher (cached), turns it into MELT (phase 1: interpolated K/V, phase 2:
attention-aligned distillation) for every variant, trains a standard model on the same data, and
writes checkpoints, a table (CSV + Markdown) and a plot. pipeline=policies instead evaluates every
cache policy zero-shot and post-trained on each teacher set (training/design_quality.py). Settings:
conf/train/ and training/config.py.
"""

import re
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from omegaconf import DictConfig

from models.config import ConfigError
from training import config

CONF = str(Path(__file__).resolve().parent / "conf" / "train")
config.register()


def fail(message: str) -> None:
    print(f"train_melt.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def preflight(argv: list[str]) -> None:
    """Compose and check the settings before Hydra starts: bad input is one line on stderr,
    exit status 2, nothing trained or written (Hydra's own errors span several lines)."""
    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return
    try:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            config.resolve(compose("config", overrides=args.overrides))
    except ConfigError as e:
        fail(str(e))
    except Exception as e:  # noqa: BLE001 - Hydra's and OmegaConf's errors, made one line
        cause = e.__cause__ or e
        key, first = getattr(cause, "full_key", None), (str(cause).strip().splitlines() or [""])[0]
        if "Could not override" in str(e) or "not in struct" in first:
            fail(f"{key or first}: not a setting of train_melt.py; allowed: "
                 f"{', '.join(config.TrainConfig.__dataclass_fields__)} (and their fields, e.g. melt.chunk_size)")
        missing = re.search(r"Could not find '(.+)/([^/']+)'", first)
        if missing:
            fail(f"{missing.group(1)}: unknown value {missing.group(2)!r}; allowed: "
                 f"{' | '.join(getattr(cause, 'options', None) or [])}")
        fail(f"{key}: {first}; allowed: a value of the field's type (training/config.py)" if key else first)


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def main(cfg: DictConfig) -> None:
    from training import design_quality, pipeline

    try:
        c = config.resolve(cfg)
    except ConfigError as e:  # normally caught by the preflight already
        fail(str(e))
    (design_quality.run if c.pipeline == "policies" else pipeline.run)(c)


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
