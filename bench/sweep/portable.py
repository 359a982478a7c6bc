"""Copy a sweep's multirun.yaml without this machine's paths, for committing as a reference.

    python -m bench.sweep.portable SRC_MULTIRUN_YAML DST

Hydra records where it ran (hydra.runtime: the working folder, config search paths) and the
sweep folder it wrote to. Those name one machine; the rest (the settings, the sweep, the overrides)
is what a reader needs to re-run it. The sweep folder is kept only if it is relative.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from ..rows.files import atomic_file


def portable(src: Path | str, dst: Path | str) -> None:
    cfg = OmegaConf.load(src)
    hydra = cfg.get("hydra")
    if hydra is not None:
        hydra.pop("runtime", None)
        if Path(str(OmegaConf.select(cfg, "hydra.sweep.dir", default=""))).is_absolute():
            hydra.sweep.dir = "results/${name}"
        task = OmegaConf.select(cfg, "hydra.overrides.hydra")
        if task is not None:
            hydra.overrides.hydra = [o for o in task if not o.startswith("hydra.sweep.dir=/")]
    with atomic_file(dst) as tmp:
        tmp.write_text(OmegaConf.to_yaml(cfg))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m bench.sweep.portable SRC_MULTIRUN_YAML DST")
    portable(sys.argv[1], sys.argv[2])
