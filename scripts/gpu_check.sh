#!/usr/bin/env bash
# GPU check: memory against sequence length and against loop depth for the three models at
# Ouro-1.4B size, bfloat16, batch 1, on one GPU, and the CPU-side estimates (fake probe, memory
# model) against the CUDA peaks (budget: 8 minutes on an H100). Sweeps write to
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
# Estimates vs CUDA: the three models at Ouro-1.4B, loops 4, 4K/16K/32K tokens, measured by the
# cuda probe, then estimated by the fake probe (on this machine's CPU) for the same points;
# bench.estimates writes the errors of the fake probe and the memory model (target: within 5 %).
points=(size=ouro-1.4b dtype=bfloat16 loops=4 batch=1 new_tokens=4 repeats=1 scenario=generate
        model=standard,ouro,melt seq_len=4096,16384,32000)
"$PY" run_bench.py -m device=cuda probe=cuda "${points[@]}" "hydra.sweep.dir=$out/estimates_cuda" "$@"
"$PY" run_bench.py -m device=cpu probe=fake "${points[@]}" "hydra.sweep.dir=$out/estimates_fake" "$@"
mkdir -p "$ref/estimates"
"$PY" -m bench.estimates "$out/estimates_cuda" "$out/estimates_fake" --out "$ref/estimates"
seconds=$((SECONDS - start))
{
    echo "# scripts/gpu_check.sh $*: ${seconds} s"
    echo "git: $(git describe --always --dirty --abbrev=12)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
} > "$ref/environment.txt"
echo "gpu_check: ${seconds} s -> $out, copied to $ref"
