"""Command-line checks run before Hydra starts: every point of the requested run or sweep is
composed and checked first, so a bad value costs one line on stderr and nothing is measured or
written. Hydra's own error output (several lines and a hint about stack traces) is not used for
bad input."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from ..config import BenchConfig, ConfigError, launcher_of, register, resolve
from .progress import announce


def fail(message: str) -> None:
    print(f"run_bench.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def preflight(argv: list[str], config_dir: str, config_name: str) -> None:
    """Check every point `argv` asks for; on a bad one print it and exit 2."""
    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return
    try:
        points = _points(args.overrides, args.multirun, config_dir, config_name)
    except ConfigError as e:
        fail(str(e))
    except Exception as e:  # noqa: BLE001 - Hydra's and OmegaConf's errors, made one line
        fail(_one_line(e))
    announce(points)


def _points(overrides: list[str], multirun: bool, config_dir: str, config_name: str) -> int:
    return len(expand(overrides, multirun, config_dir, config_name))


CONF = str(Path(__file__).resolve().parents[2] / "conf")


def compose_point(overrides: list[str], config_dir: str = CONF, config_name: str = "config") -> BenchConfig:
    """The one point `overrides` name (no sweep), resolved as run_bench.py would run it, from
    Python: e.g. compose_point(["model=melt", "loops=4"])."""
    register()
    return expand(overrides, False, config_dir, config_name)[0]


def expand(overrides: list[str], multirun: bool, config_dir: str, config_name: str) -> list[BenchConfig]:
    """Every point the command line asks for, resolved as it will run. A sweep is expanded as
    Hydra's basic sweeper does (the experiment's sweeper params, then the command line's, which
    win), and each point is checked for where it runs: this machine, or under a remote launcher
    (hydra/launcher=slurm) the GPU node it will get, so a Slurm sweep can be checked and submitted
    from a login node without a GPU."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        if not multirun:
            return [resolve(job_settings(compose(config_name, overrides=overrides, return_hydra_config=True)))]
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        base = compose(config_name, overrides=fixed, return_hydra_config=True)
        launcher = launcher_of(base)
        params = OmegaConf.select(base, "hydra.sweeper.params") or {}
        swept = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + overrides)
        jobs = [job for batch in BasicSweeper.split_arguments(swept, None) for job in batch]
        return [resolve(job_settings(compose(config_name, overrides=job, return_hydra_config=True)), launcher)
                for job in jobs]


def job_settings(cfg: DictConfig) -> DictConfig:
    """A point's settings without Hydra's node, each resolved in the whole config first (so that
    ${on_device:...} sees the launcher)."""
    values = {k: cfg[k] for k in cfg if k != "hydra"}
    job = OmegaConf.structured(BenchConfig)
    unknown = sorted(set(values) - set(BenchConfig.__dataclass_fields__))  # from +key=value
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a setting of run_bench.py; allowed: "
                          f"{', '.join(BenchConfig.__dataclass_fields__)}")
    return OmegaConf.merge(job, values)


def _one_line(e: Exception) -> str:
    """'<field>: <problem>; allowed: ...' from a composition or parse error."""
    cause = e.__cause__ or e
    key = getattr(cause, "full_key", None)
    text = str(cause).strip()
    first = text.splitlines()[0] if text else type(cause).__name__
    fields = BenchConfig.__dataclass_fields__
    if "not in struct" in first or "Could not override" in str(e):
        return f"{key or first}: not a setting of run_bench.py; allowed: {', '.join(fields)}"
    if key in fields:  # a value OmegaConf could not convert to the field's type
        return f"{key}: {first}; allowed: {fields[key].type}"
    missing = re.search(r"Could not find '(.+)/([^/']+)'", first)
    if missing:  # an unknown option of a config group (experiment=, hydra/launcher=)
        group, value = missing.groups()
        return f"{group}: unknown value {value!r}; allowed: {' | '.join(cause.options or [])}"
    if first.startswith("Ambiguous value"):  # a sweep without -m
        return f"{first}; allowed: one value per setting, or -m to sweep"
    if "Error parsing override" in first:
        return f"{first}; allowed: key=value overrides, e.g. loops=4 or, with -m, loops=1,2,4"
    return first
