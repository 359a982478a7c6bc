"""What compiling the decode step costs, per design and depth: compile seconds and the steady step.

    python -m bench.measure.compile_time [--size small] [--layers 24] [--loops 1 4 16]
        [--designs standard ouro melt ...] [--context 256] [--steps 8] [--threads 1]
        [--backend inductor] [--device cpu] [--whole-step] [--timeout S] [--out FILE.csv]

Each (design, loops) runs in a fresh process with an empty inductor cache, so every figure is a
cold compile: a model at the size preset (its layer count set by --layers), random weights, a
prompt of `context` tokens prefilled, then (models.runtime.Scenario.time)
  compile_s  the compiled step's first call (models.runtime.Engine.compiled_step: each layer
             function compiled once; on a GPU also the warm-up and the CUDA graph's capture),
  step_ms    the median of --steps further calls, and eager_ms the eager step's, alike,
  graphs     the graphs dynamo made.
--whole-step compiles decode_step as one graph instead, which unrolls loops x layers copies of the
layer: what the layer functions replace. A design is a model name, or ouro:<kv_sharing> for a
LoopLM cache policy. Prints one table; --out also writes it as CSV.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pandas as pd
import torch

from models import build_model
from models.config import KV_SHARINGS, MODEL_NAMES
from models.runtime import Engine, Scenario

DESIGNS = ("standard", "ouro", "melt", "loopcoder")


def _mode(a: argparse.Namespace) -> str:
    return "whole step" if a.whole_step else "layers"


def parse_design(design: str) -> tuple[str, dict]:
    """'melt' -> ("melt", {}); 'ouro:ring' -> ("ouro", {"kv_sharing": "ring"})."""
    model, _, policy = design.partition(":")
    if model not in MODEL_NAMES or (policy and (model != "ouro" or policy not in KV_SHARINGS)):
        raise SystemExit(f"compile_time: design {design!r}; allowed: {', '.join(MODEL_NAMES)}, "
                         f"or ouro:<policy> with a policy in {', '.join(KV_SHARINGS)}")
    return model, ({"kv_sharing": policy} if policy else {})


@torch.inference_mode()
def measure_one(design: str, loops: int, a: argparse.Namespace) -> dict:
    """One design at one depth, in this process (the parent gives it a fresh one)."""
    torch.set_num_threads(a.threads)
    model_name, options = parse_design(design)
    device = torch.device(a.device)
    model = build_model(model_name, a.size, loops=1 if model_name == "standard" else loops,
                        num_hidden_layers=a.layers, device=device, **options)
    prompt = torch.randint(model.config.vocab_size, (1, a.context), device=device)
    torch._dynamo.utils.counters.clear()
    engines = {"compiled": Engine(model, compile=True, backend=a.backend, whole_step=a.whole_step),
               "eager": Engine(model)}
    timings = {}
    for name, engine in engines.items():
        cache = engine.new_cache(1, a.context + a.steps + 1)
        timings[name] = Scenario(engine, cache, prompt, new_tokens=a.steps + 1).time(repeats=1)
    return {"design": design, "loops": model.config.loops, "layers": a.layers,
            "compile_s": round(timings["compiled"].compile_s, 2),
            "step_ms": round(float(np.median(timings["compiled"].step_s)) * 1e3, 3),
            "eager_ms": round(float(np.median(timings["eager"].step_s)) * 1e3, 3),
            "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
            "mode": _mode(a), "backend": a.backend,
            "torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "threads": a.threads}


def _in_fresh_process(design: str, loops: int, argv: list[str], a: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="meltbench-inductor-") as cache_dir:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
        try:
            done = subprocess.run([sys.executable, "-m", "bench.measure.compile_time", *argv, "--one", design,
                                   str(loops)], env=env, capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            done = None
    failed = {"design": design, "loops": loops, "layers": a.layers, "mode": _mode(a), "backend": a.backend}
    if done is None:
        return {**failed, "error": f"stopped after --timeout {a.timeout:g} s"}
    if done.returncode != 0:
        return {**failed, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.measure.compile_time", description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--loops", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS))
    parser.add_argument("--context", type=int, default=256, help="prompt tokens before the decode steps")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--whole-step", action="store_true")
    parser.add_argument("--timeout", type=float, help="seconds a (design, depth) may take; past it, a row that says so")
    parser.add_argument("--out")
    parser.add_argument("--one", nargs=2, metavar=("DESIGN", "LOOPS"), help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else argv
    a = parser.parse_args(raw)
    if a.one:
        print(json.dumps(measure_one(a.one[0], int(a.one[1]), a)))
        return 0
    for design in a.designs:  # every name checked before any work
        parse_design(design)
    rows = []
    for design in a.designs:
        for loops in ([1] if design == "standard" else a.loops):
            rows.append(_in_fresh_process(design, loops, raw, a))  # the child prints its row, writes nothing
            print(f"compile_time: {design} loops {loops}: " + ", ".join(f"{k} {v}" for k, v in rows[-1].items()
                                                                       if k in ("compile_s", "step_ms", "eager_ms", "graphs", "error")),
                  file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False))
    if a.out:
        table.to_csv(a.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
