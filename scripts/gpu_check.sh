#!/usr/bin/env bash
# GPU check at Ouro-1.4B size, bfloat16, batch 1, on one GPU. Default steps, sized from the first H200
# run's per-point times (7-40 s a point: model set-up, chunked prefill) to about 8 minutes:
#   memory_vs_seq_len: 4K, 16K, 32K tokens, loops 4, the three models (memory only: nothing timed);
#   memory_vs_depth: loops 1, 4, 16 at 8K tokens (memory only);
#   decode_speed: 4K context, loops 4, the three models and the hf_llama peer, eager decode
#     (bandwidth utilization against the measured copy bandwidth);
#   policies: every looped KV-cache design at loops 4, 4K tokens (memory only);
#   snapshot: one point (MELT, 4K tokens, loops 4) with PyTorch's CUDA memory history of its memory
#     pass (profile=snapshot), for pytorch.org/memory_viz;
#   estimates: the memory_vs_seq_len points again with the fake probe (on this machine's CPU; it can
#     also run later on another machine, next to memory_vs_seq_len's results), and
#     bench.report.estimates comparing fake and predicted peaks with the measured ones (target: 5 %).
# Steps to ask for by name (GPU_CHECK_ONLY), each several minutes on an H200:
#   decode_compiled: decode_speed with the compiled step and CUDA graphs (the standard model's compile
#     took about 45 s; the looped models' step unrolls loops x layers and took over 140 s each);
#   capacity: at 32K, loops 4, the largest batch within the GPU's free memory (about 12 s a trial for
#     the standard model, 9 trials) and the decode throughput at it (eager).
# GPU_CHECK_STEP_S=N stops a step after N seconds; the report is then made from the points it
# measured and the next step starts (a re-run resumes: measured points are skipped).
# Sweeps write to results/gpu_check/<gpu>/<step>/; their table, report, plots and config and the
# environment are then copied to results/reference/<gpu>/, ready to commit.
#   scripts/gpu_check.sh                    # uses .venv/bin/python, or PYTHON=...
#   scripts/gpu_check.sh repeats=3          # extra overrides go to every sweep
#   GPU_CHECK_SMOKE=1 scripts/gpu_check.sh  # the same steps on CPU at size tiny, in about a minute:
#                                           # writes under GPU_CHECK_OUT (default results/gpu_check/cpu_smoke)
#   GPU_CHECK_ONLY="decode_compiled capacity" GPU_CHECK_STEP_S=240 scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

declare -A experiment=([decode_compiled]=decode_speed)  # a step runs the named sweep of its name unless listed
if [[ "${GPU_CHECK_SMOKE:-0}" == 1 ]]; then
    # CPU smoke mode: the script's logic with tiny sizes and the tracked probe; no GPU, no commit.
    gpu=cpu_smoke
    out=${GPU_CHECK_OUT:-results/gpu_check/cpu_smoke}
    ref=$out/reference
    common=(device=cpu probe=tracked size=tiny dtype=float32 repeats=1 warmup=0)
    declare -A extra=(
        [memory_vs_seq_len]="seq_len=64 new_tokens=2"
        [memory_vs_depth]="loops=2 seq_len=64 new_tokens=2"
        [decode_speed]="seq_len=64 new_tokens=2 compile=false"
        [decode_compiled]="seq_len=64 new_tokens=2 compile=true model=standard"
        [capacity]="model=ouro,melt seq_len=256 new_tokens=2 chunk_size=32 budget_gb=0.003"
        [policies]="loops=2 seq_len=64 new_tokens=2 repeats=0"
    )
    snapshot_point=(model=melt size=tiny seq_len=64 new_tokens=2 loops=2 device=cpu)
else
    gpu=$("$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.cuda.get_device_name().replace(" ", "_"))')
    out=results/gpu_check/$gpu
    ref=results/reference/$gpu
    common=(device=cuda probe=cuda size=ouro-1.4b dtype=bfloat16)
    declare -A extra=(
        [memory_vs_seq_len]="seq_len=4096,16384,32768 batch=1 repeats=0"
        [memory_vs_depth]="loops=1,4,16 batch=1 repeats=0"
        [decode_speed]="seq_len=4096 batch=1 loops=4 compile=false"
        [decode_compiled]="seq_len=4096 batch=1 loops=4 compile=true"
        [capacity]="seq_len=32768 loops=4 compile=false repeats=1"
        [policies]="loops=4 seq_len=4096 repeats=0"
    )
    snapshot_point=(model=melt size=ouro-1.4b dtype=bfloat16 seq_len=4096 new_tokens=4 loops=4 device=cuda)
fi

# Runs a step's command under GPU_CHECK_STEP_S (when set); its exit status, 124 if it was stopped.
limited() {
    if [[ -n "${GPU_CHECK_STEP_S:-}" ]]; then timeout -k 10 "$GPU_CHECK_STEP_S" "$@"; else "$@"; fi
}

start=$SECONDS
steps=${GPU_CHECK_ONLY:-memory_vs_seq_len memory_vs_depth decode_speed policies snapshot estimates}
for step in $steps; do  # every name checked before any work
    [[ -v "extra[$step]" || $step == snapshot || $step == estimates ]] ||
        { echo "gpu_check: no step '$step'; allowed: ${!extra[*]} snapshot estimates" >&2; exit 2; }
done
for step in $steps; do
    [[ $step == snapshot || $step == estimates ]] && continue
    echo "gpu_check: $step ($((SECONDS - start)) s so far)"
    # shellcheck disable=SC2086  # the extra overrides are words on purpose
    rc=0
    limited "$PY" run_bench.py -m "experiment=${experiment[$step]:-$step}" "${common[@]}" ${extra[$step]} \
        "hydra.sweep.dir=$out/$step" "$@" || rc=$?
    if [[ $rc == 124 ]]; then  # stopped by GPU_CHECK_STEP_S: report the points it measured
        echo "gpu_check: $step stopped after GPU_CHECK_STEP_S=$GPU_CHECK_STEP_S s"
        "$PY" -m bench.report "$out/$step" || { echo "gpu_check: $step measured no point"; continue; }
    elif [[ $rc != 0 ]]; then
        exit "$rc"
    fi
    mkdir -p "$ref/$step"
    cp "$out/$step"/{table.csv,table.parquet,report.md} "$out/$step"/*.png "$ref/$step/"
    "$PY" -m bench.sweep.portable "$out/$step/multirun.yaml" "$ref/$step/multirun.yaml"
done
if [[ " $steps " == *" snapshot "* ]]; then
    echo "gpu_check: snapshot ($((SECONDS - start)) s so far)"
    limited "$PY" run_bench.py "${snapshot_point[@]}" profile=snapshot repeats=0 "hydra.run.dir=$out/snapshot" "$@" ||
        echo "gpu_check: snapshot stopped or failed (exit $?)"
    mkdir -p "$ref/snapshot"
    cp "$out/snapshot/result.json" "$ref/snapshot/" 2>/dev/null || true
    if [[ -f "$out/snapshot/memory_snapshot.pickle" ]]; then  # recorded on CUDA only; gzip it (memory_viz wants it unzipped)
        gzip -c "$out/snapshot/memory_snapshot.pickle" > "$ref/snapshot/memory_snapshot.pickle.gz"
    fi
fi
if [[ " $steps " == *" estimates "* ]]; then  # needs memory_vs_seq_len measured first (this run or an earlier one)
    echo "gpu_check: estimates ($((SECONDS - start)) s so far)"
    fake=(device=cpu probe=fake "${common[@]:2}")  # common starts with device=... probe=...
    # shellcheck disable=SC2086
    "$PY" run_bench.py -m experiment=memory_vs_seq_len "${fake[@]}" ${extra[memory_vs_seq_len]} \
        "hydra.sweep.dir=$out/estimates_fake" "$@"
    mkdir -p "$ref/estimates"
    "$PY" -m bench.report.estimates "$out/memory_vs_seq_len" "$out/estimates_fake" --out "$ref/estimates"
fi
seconds=$((SECONDS - start))
mkdir -p "$ref"
{
    echo "# scripts/gpu_check.sh $*: ${seconds} s${GPU_CHECK_SMOKE:+ (GPU_CHECK_SMOKE=$GPU_CHECK_SMOKE)}"
    echo "steps: $steps${GPU_CHECK_STEP_S:+ (GPU_CHECK_STEP_S=$GPU_CHECK_STEP_S)}"
    echo "git: $(git describe --always --dirty --abbrev=12 2>/dev/null || echo unknown)"
    if [[ $gpu != cpu_smoke ]]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    fi
    "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "CUDA", torch.version.cuda, "transformers", transformers.__version__)'
} > "$ref/environment.txt"
echo "gpu_check: ${seconds} s -> $out, copied to $ref"
