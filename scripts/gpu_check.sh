#!/usr/bin/env bash
# GPU check at Ouro-1.4B size, bfloat16, batch 1, on one GPU (budget: about 6 minutes on an H200):
#   memory against sequence length (4K, 16K, 32K; loops 4) and against loop depth, the three models
#     (memory only: nothing timed or compiled);
#   decode speed at 4K context, loops 4: the three models and the hf_llama peer (compiled decode
#     step with CUDA graphs; bandwidth utilization against the measured copy bandwidth);
#   capacity at 32K, loops 4: the largest batch within the GPU's free memory and the decode
#     throughput at it (eager decode, to keep the time in budget: every batch would compile anew);
#   policies: every looped KV-cache design at loops 4, 4K and 16K tokens (memory only);
#   snapshot: one point (MELT, 4K tokens, loops 4) with PyTorch's CUDA memory history of its memory
#     pass (profile=snapshot), for pytorch.org/memory_viz;
#   estimates: the memory_vs_seq_len points again with the fake probe (on this machine's CPU), and
#     bench.report.estimates comparing fake and predicted peaks with the measured ones (target: 5 %).
# Sweeps write to results/gpu_check/<gpu>/<experiment>/; their table, report, plots and config and
# the environment are then copied to results/reference/<gpu>/, ready to commit.
#   scripts/gpu_check.sh                    # uses .venv/bin/python, or PYTHON=...
#   scripts/gpu_check.sh repeats=3          # extra overrides go to every sweep
#   GPU_CHECK_SMOKE=1 scripts/gpu_check.sh  # the same steps on CPU at size tiny, in about a minute:
#                                           # writes under GPU_CHECK_OUT (default results/gpu_check/cpu_smoke)
#   GPU_CHECK_ONLY="decode_speed capacity" scripts/gpu_check.sh   # some of the steps only
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

if [[ "${GPU_CHECK_SMOKE:-0}" == 1 ]]; then
    # CPU smoke mode: the script's logic with tiny sizes and the tracked probe; no GPU, no commit.
    gpu=cpu_smoke
    out=${GPU_CHECK_OUT:-results/gpu_check/cpu_smoke}
    ref=$out/reference
    common=(device=cpu probe=tracked size=tiny dtype=float32 repeats=1 warmup=0)
    declare -A extra=(
        [memory_vs_seq_len]="seq_len=64 new_tokens=2"
        [memory_vs_depth]="loops=2 seq_len=64 new_tokens=2"
        [decode_speed]="seq_len=64 new_tokens=2"
        [capacity]="model=ouro,melt seq_len=256 new_tokens=2 chunk_size=32 budget_gb=0.003"
        [policies]="loops=2 seq_len=64 new_tokens=2 repeats=0"
    )
    snapshot_point=(model=melt size=tiny seq_len=64 new_tokens=2 loops=2 device=cpu)
else
    gpu=$("$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.cuda.get_device_name().replace(" ", "_"))')
    out=results/gpu_check/$gpu
    ref=results/reference/$gpu
    common=(device=cuda probe=cuda size=ouro-1.4b dtype=bfloat16)
    # Memory sweeps are memory only (repeats=0: nothing timed, nothing compiled; loops 16 would
    # unroll 384 layer applications into one graph); only decode_speed compiles.
    declare -A extra=(
        [memory_vs_seq_len]="seq_len=4096,16384,32768 batch=1 repeats=0"
        [memory_vs_depth]="batch=1 repeats=0"
        [decode_speed]="seq_len=4096 batch=1 loops=4"
        [capacity]="seq_len=32768 loops=4 compile=false repeats=1"
        [policies]="loops=4 seq_len=4096,16384 repeats=0"
    )
    snapshot_point=(model=melt size=ouro-1.4b dtype=bfloat16 seq_len=4096 new_tokens=4 loops=4 device=cuda)
fi

start=$SECONDS
# GPU_CHECK_ONLY="decode_speed capacity" runs a subset (the tests' smoke run does).
steps=${GPU_CHECK_ONLY:-memory_vs_seq_len memory_vs_depth decode_speed capacity policies snapshot}
for experiment in ${steps/snapshot/}; do
    echo "gpu_check: $experiment ($((SECONDS - start)) s so far)"
    # shellcheck disable=SC2086  # the extra overrides are words on purpose
    "$PY" run_bench.py -m "experiment=$experiment" "${common[@]}" ${extra[$experiment]} \
        "hydra.sweep.dir=$out/$experiment" "$@"
    mkdir -p "$ref/$experiment"
    cp "$out/$experiment"/{table.csv,table.parquet,report.md,*.png} "$ref/$experiment/"
    "$PY" -m bench.sweep.portable "$out/$experiment/multirun.yaml" "$ref/$experiment/multirun.yaml"
done
if [[ " $steps " == *" snapshot "* ]]; then
    echo "gpu_check: snapshot ($((SECONDS - start)) s so far)"
    "$PY" run_bench.py "${snapshot_point[@]}" profile=snapshot repeats=0 "hydra.run.dir=$out/snapshot" "$@"
    mkdir -p "$ref/snapshot"
    cp "$out/snapshot/result.json" "$ref/snapshot/"
    if [[ -f "$out/snapshot/memory_snapshot.pickle" ]]; then  # recorded on CUDA only; gzip it (memory_viz wants it unzipped)
        gzip -c "$out/snapshot/memory_snapshot.pickle" > "$ref/snapshot/memory_snapshot.pickle.gz"
    fi
fi
if [[ " $steps " == *" memory_vs_seq_len "* ]]; then
    echo "gpu_check: estimates ($((SECONDS - start)) s so far)"
    fake=(device=cpu probe=fake "${common[@]:2}")  # common starts with device=... probe=...
    # shellcheck disable=SC2086
    "$PY" run_bench.py -m experiment=memory_vs_seq_len "${fake[@]}" ${extra[memory_vs_seq_len]} \
        "hydra.sweep.dir=$out/estimates_fake" "$@"
    mkdir -p "$ref/estimates"
    "$PY" -m bench.report.estimates "$out/memory_vs_seq_len" "$out/estimates_fake" --out "$ref/estimates"
fi
seconds=$((SECONDS - start))
{
    echo "# scripts/gpu_check.sh $*: ${seconds} s${GPU_CHECK_SMOKE:+ (GPU_CHECK_SMOKE=$GPU_CHECK_SMOKE)}"
    echo "git: $(git describe --always --dirty --abbrev=12)"
    if [[ $gpu != cpu_smoke ]]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    fi
    "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
} > "$ref/environment.txt"
echo "gpu_check: ${seconds} s -> $out, copied to $ref"
