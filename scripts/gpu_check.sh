#!/usr/bin/env bash
# GPU check: memory against sequence length and against loop depth for the three models at
# Ouro-1.4B size, bfloat16, batch 1, on one GPU (budget: 6 minutes on an H100). Sweeps write to
# results/gpu_check/<gpu>/<experiment>/; their table, report, plots, config and the environment
# are then copied to results/reference/<gpu>/, ready to commit.
#   scripts/gpu_check.sh                    # uses .venv/bin/python, or PYTHON=...
#   scripts/gpu_check.sh repeats=3          # extra overrides go to both sweeps
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

gpu=$("$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.cuda.get_device_name().replace(" ", "_"))')
out=results/gpu_check/$gpu
ref=results/reference/$gpu
start=$SECONDS
for experiment in memory_vs_seq_len memory_vs_depth; do
    "$PY" run_bench.py -m "experiment=$experiment" device=cuda probe=cuda size=ouro-1.4b \
        dtype=bfloat16 batch=1 "hydra.sweep.dir=$out/$experiment" "$@"
    mkdir -p "$ref/$experiment"
    cp "$out/$experiment"/{table.csv,table.parquet,report.md,multirun.yaml,*.png} "$ref/$experiment/"
done
seconds=$((SECONDS - start))
{
    echo "# scripts/gpu_check.sh $*: ${seconds} s"
    echo "git: $(git describe --always --dirty --abbrev=12)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
} > "$ref/environment.txt"
echo "gpu_check: ${seconds} s -> $out, copied to $ref"
