#!/usr/bin/env bash
# GPU check: memory against sequence length and against loop depth for the three models at
# Ouro-1.4B size, bfloat16, batch 1, on one GPU (about 6 minutes on an H100). Writes
# results/gpu_check/<gpu name>/{memory_vs_seq_len,memory_vs_depth}/ (table, report, plots).
#   scripts/gpu_check.sh                    # uses .venv/bin/python, or PYTHON=...
#   scripts/gpu_check.sh repeats=3          # extra overrides go to both sweeps
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

gpu=$("$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.cuda.get_device_name().replace(" ", "_"))')
out=results/gpu_check/$gpu
start=$SECONDS
for experiment in memory_vs_seq_len memory_vs_depth; do
    "$PY" run_bench.py -m "experiment=$experiment" device=cuda probe=cuda size=ouro-1.4b \
        dtype=bfloat16 batch=1 "hydra.sweep.dir=$out/$experiment" "$@"
done
echo "gpu_check: $((SECONDS - start)) s -> $out"
