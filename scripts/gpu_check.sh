#!/usr/bin/env bash
# GPU check at Ouro-1.4B size, bfloat16, on one GPU, in one run (one device call). Default steps:
#   memory_vs_seq_len: 4K, 16K, 32K tokens, loops 4, batch 1, the three models (memory only);
#   policies: every cache design of conf/experiment/policies.yaml (the LoopLM's kv_sharing
#     policies, MELT, LoopCoder, the standard model) at loops 4, 4K tokens (memory only);
#   snapshot: one point (MELT, 4K tokens, loops 4) with PyTorch's CUDA memory history of its memory
#     pass (profile=snapshot), for pytorch.org/memory_viz;
#   estimates: the memory_vs_seq_len points again with the fake probe on this machine's CPU, and
#     bench.report.estimates comparing fake and predicted peaks with the measured ones (target: 5 %);
#   decode_compiled: decode at 4K context, batch 1, loops 4: the three models with the compiled
#     step (compile left unset: auto, on for our models on CUDA) and the hf_llama peer, which never
#     compiles (transformers' eager generate);
#   capacity: at 32K, loops 4, the three models: the largest batch within a fixed 32 GB budget (the
#     same on every GPU of 32 GB or more, and a short search: the LoopLM fits 1 sequence, the
#     others 4) and the decode throughput at that batch, eager (compiling would add a compile per
#     model to the run).
# Steps to ask for by name (GPU_CHECK_ONLY): memory_vs_depth (loops 1, 4, 16 at 8K, memory only)
# and decode_speed (decode_compiled with eager decode).
# Order: first the memory-only steps (memory_vs_seq_len as two sweeps, policies, snapshot,
# memory_vs_depth) and the estimates' fake sweep (CPU) side by side, a process each: a peak is its
# process's own, so they do not disturb each other, but NVML's columns count the other processes
# where nvml_scope is `device` (GPU_CHECK_SERIAL=1 runs them one after another). Then the timed
# steps, each alone, in the order named.
#
# Time on an H200, machine start aside: an ESTIMATE from the first H200 run's per-point wall times
# (results/reference/NVIDIA_H200: tables' wall_s, device_log.txt), not a measurement of this script.
#   side by side, about 2 min (the longest sweep; the GPU idles through most of a memory pass):
#     memory_vs_seq_len standard + melt: 6 points, 112 s measured, ~125 s with start-up and report;
#       ouro: 3 points, 78 s measured, ~100 s;
#     policies: 10 points at 4K, ~125 s (not measured: the first run stopped it in its first point;
#       taken as memory_vs_seq_len's 4K points, 7-12 s each, plus the CUDA start-up);
#     snapshot ~30 s; the estimates' fake sweep ~60 s (62 s on the 2-core reference CPU);
#   decode_compiled, about 3.7 min: standard 60 s measured (13 s eager + 47 s compile), ouro and melt
#     29-30 s eager + a compile each taken at its target, 40 s (the first run's whole-step compile
#     took over 140 s each: with that, about 7 min), hf_llama 14 s;
#   capacity, about 3.1 min: a 32K trial is one pass, ~10-12 s (standard) or ~18 s (ouro, melt;
#     half their memory_vs_seq_len point, which also warms up); standard and melt fit batch 1, 2, 4
#     and not 8, 6, 5 (an OOM trial ~1 s), ouro fits 1 and not 2; then each model's largest batch
#     again, timed (~15-20 s);
#   total about 9 minutes (about 12 with the looped compile at 140 s).
#
# GPU_CHECK_STEP_S=N stops each sweep after N s; the step's report is then made from the points
# measured and the check goes on (a re-run resumes: measured points are skipped). A failed step
# is reported and the others still run; the script then exits with its status.
# Sweeps write to results/gpu_check/<gpu>/<step>/ (a step of several sweeps: <step>/1/, <step>/2/,
# its report made from them all), their console output to logs/; tables, reports, plots, portable
# configs and the environment (with each sweep's wall time) are then copied to
# results/reference/<gpu>/, ready to commit.
#   scripts/gpu_check.sh                    # uses .venv/bin/python, or PYTHON=...
#   scripts/gpu_check.sh repeats=3          # extra overrides go to every sweep
#   GPU_CHECK_SMOKE=1 scripts/gpu_check.sh  # the same steps on CPU at size tiny, about a minute on 2
#                                           # cores: under GPU_CHECK_OUT (default results/gpu_check/cpu_smoke)
#   GPU_CHECK_DRY=1 scripts/gpu_check.sh    # prints each sweep's command line; runs nothing
#   GPU_CHECK_ONLY="decode_compiled capacity" GPU_CHECK_STEP_S=240 scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
args=("$@")
export PYTHONUNBUFFERED=1  # the sweeps' output in order, in the console and the logs

declare -A experiment=([decode_compiled]=decode_speed)  # a step runs the named sweep of its name unless listed
# A step of several sweeps, "|" between each sweep's own overrides; the others are one sweep.
declare -A parts=([memory_vs_seq_len]="model=standard,melt|model=ouro")  # two, side by side
gpu=
side_by_side=" memory_vs_seq_len memory_vs_depth policies snapshot estimates "  # memory only, or CPU only
if [[ "${GPU_CHECK_SMOKE:-0}" == 1 ]]; then
    # CPU smoke mode: the script's logic with tiny sizes and the tracked probe; no GPU, no commit.
    gpu=cpu_smoke
    out=${GPU_CHECK_OUT:-results/gpu_check/cpu_smoke}
    ref=$out/reference
    common=(device=cpu probe=tracked size=tiny dtype=float32 repeats=1 warmup=0)
    declare -A extra=(
        [memory_vs_seq_len]="seq_len=64 new_tokens=2"
        [memory_vs_depth]="loops=2 seq_len=64 new_tokens=2"
        [policies]="loops=4 seq_len=64 new_tokens=2 repeats=0"
        [decode_speed]="seq_len=64 new_tokens=2 compile=false"
        [decode_compiled]="seq_len=64 new_tokens=2"
        [capacity]="model=standard,ouro,melt seq_len=256 new_tokens=2 chunk_size=32 budget_gb=0.003 compile=false"
    )
    # compile=null is off on a CPU: our three models compile explicitly, with aot_eager (each layer
    # function captured whole, without inductor's slow C++ build), and the peer, which takes no
    # compile=true, is a sweep of its own.
    parts[decode_compiled]="model=standard,ouro,melt compile=true compile_backend=aot_eager|model=hf_llama"
    snapshot_point=(model=melt size=tiny seq_len=64 new_tokens=2 loops=4 device=cpu)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # sweeps side by side on a few cores
else
    common=(device=cuda probe=cuda size=ouro-1.4b dtype=bfloat16)
    declare -A extra=(
        [memory_vs_seq_len]="seq_len=4096,16384,32768 batch=1 repeats=0"
        [memory_vs_depth]="loops=1,4,16 batch=1 repeats=0"
        [policies]="loops=4 seq_len=4096 repeats=0"
        [decode_speed]="seq_len=4096 batch=1 loops=4 compile=false"
        [decode_compiled]="seq_len=4096 batch=1 loops=4"  # compile auto: on for ours, never the peer
        [capacity]="model=standard,ouro,melt seq_len=32768 loops=4 budget_gb=32 compile=false repeats=1"
    )
    snapshot_point=(model=melt size=ouro-1.4b dtype=bfloat16 seq_len=4096 new_tokens=4 loops=4 device=cuda)
fi

start=$SECONDS
steps=${GPU_CHECK_ONLY:-memory_vs_seq_len policies snapshot estimates decode_compiled capacity}
for step in $steps; do  # every name checked before any work
    [[ -v "extra[$step]" || $step == snapshot || $step == estimates ]] ||
        { echo "gpu_check: no step '$step'; allowed: ${!extra[*]} snapshot estimates" >&2; exit 2; }
done
if [[ $gpu != cpu_smoke ]]; then
    if [[ "${GPU_CHECK_DRY:-0}" == 1 ]]; then
        gpu=dry_run
    else
        gpu=$("$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.cuda.get_device_name().replace(" ", "_"))')
    fi
    out=results/gpu_check/$gpu
    ref=results/reference/$gpu
fi

# Runs a command under GPU_CHECK_STEP_S (when set); its exit status, 124 if it was stopped.
limited() {
    if [[ -n "${GPU_CHECK_STEP_S:-}" ]]; then timeout -k 10 "$GPU_CHECK_STEP_S" "$@"; else "$@"; fi
}

# timed LABEL COMMAND...: the command under GPU_CHECK_STEP_S, its time and exit status logged.
timed() {
    local label=$1 t=$SECONDS rc=0
    shift
    echo "gpu_check: $label ($((t - start)) s so far)"
    limited "$@" || rc=$?
    [[ $rc == 124 ]] && echo "gpu_check: $label stopped after GPU_CHECK_STEP_S=$GPU_CHECK_STEP_S s"
    echo "gpu_check: $label: $((SECONDS - t)) s, exit $rc"
    echo "$label $((SECONDS - t)) s, exit $rc" >> "$times"
    return "$rc"
}

# The sweeps of a step: "LABEL<TAB>FOLDER<TAB>OVERRIDES" a line.
sweeps_of() {
    local step=$1 k=0 part
    if [[ -z "${parts[$step]:-}" ]]; then
        printf '%s\t%s\t%s\n' "$step" "$out/$step" ""
        return
    fi
    local IFS='|'
    for part in ${parts[$step]}; do
        k=$((k + 1))
        printf '%s\t%s\t%s\n' "$step.$k" "$out/$step/$k" "$part"
    done
}

# The run_bench.py arguments (in CMD) of: a sweep of a step (STEP FOLDER OVERRIDES), the snapshot's
# point, the estimates' fake sweep (the memory_vs_seq_len points with the fake probe, on the CPU).
sweep_cmd() {
    local step=$1 dir=$2 own=$3
    # shellcheck disable=SC2086  # the overrides are words on purpose
    CMD=(run_bench.py -m "experiment=${experiment[$step]:-$step}" "${common[@]}" ${extra[$step]} $own
         "hydra.sweep.dir=$dir" "${args[@]}")
}
snapshot_cmd() {
    CMD=(run_bench.py "${snapshot_point[@]}" profile=snapshot repeats=0 "hydra.run.dir=$out/snapshot" "${args[@]}")
}
fake_cmd() {
    local fake=(device=cpu probe=fake "${common[@]:2}")  # common starts with device=... probe=...
    # shellcheck disable=SC2086
    CMD=(run_bench.py -m experiment=memory_vs_seq_len "${fake[@]}" ${extra[memory_vs_seq_len]}
         "hydra.sweep.dir=$out/estimates_fake" "${args[@]}")
}

# Jobs of this run: LABEL -> exit status; side by side, LABEL -> pid until it ends.
declare -A rc_of pid_of
lanes=() started=()
status=0  # the first failure's exit status, the script's at the end

# job BACKGROUND LABEL COMMAND...: run it now (BACKGROUND=0: output to the console) or in the
# background (1: output to logs/LABEL.log, shown when it ends), or only print it (dry).
job() {
    local background=$1 label=$2
    shift 2
    started+=("$label")
    if [[ $background == dry ]]; then
        printf '%s:' "$label"
        printf ' %q' "${@:2}"  # run_bench.py and its arguments
        echo
    elif [[ $background == 1 ]]; then
        timed "$label" "$@" < /dev/null > "$logs/$label.log" 2>&1 &
        pid_of[$label]=$!
        lanes+=("$label")
    else
        local rc=0
        timed "$label" "$@" 2>&1 | tee "$logs/$label.log" || rc=${PIPESTATUS[0]}
        rc_of[$label]=$rc
    fi
}

kill_tree() {  # a background job and every process under it (its sweep's Python)
    local child
    for child in $(pgrep -P "$1" 2>/dev/null); do kill_tree "$child"; done
    kill "$1" 2>/dev/null || true
}
trap 'for label in "${lanes[@]}"; do kill_tree "${pid_of[$label]}"; done; exit 130' INT TERM

# Waits for the background jobs and shows their output, one after another.
wait_lanes() {
    local label rc
    for label in "${lanes[@]}"; do
        rc=0
        wait "${pid_of[$label]}" || rc=$?
        rc_of[$label]=$rc
        echo "=== $label (logs/$label.log)"
        cat "$logs/$label.log"
    done
    lanes=()
}

start_step() {  # the sweeps (or the snapshot's run, the estimates' fake sweep) of a step
    local step=$1 background=$2 label dir own
    case $step in
        snapshot) snapshot_cmd; job "$background" snapshot "$PY" "${CMD[@]}" ;;
        estimates) fake_cmd; job "$background" estimates_fake "$PY" "${CMD[@]}" ;;
        *)
            while IFS=$'\t' read -r -u 3 label dir own; do  # fd 3: the sweeps keep the console's stdin
                sweep_cmd "$step" "$dir" "$own"
                job "$background" "$label" "$PY" "${CMD[@]}"
            done 3< <(sweeps_of "$step")
            ;;
    esac
}

failed() {  # failed STEP RC: say so; the check goes on, and exits with the first failure's status
    echo "gpu_check: $1 failed (exit $2); its output: $logs/" >&2
    [[ $status != 0 ]] || status=$2
}

finish_step() {  # a step's report (from the points measured, when a sweep was stopped or it has several) and copies
    local step=$1 label dir own rc several=0 stopped=0 worst=0
    case $step in
        snapshot)
            rc=${rc_of[snapshot]}
            [[ $rc == 0 ]] || echo "gpu_check: snapshot stopped or failed (exit $rc)"
            mkdir -p "$ref/snapshot"
            cp "$out/snapshot/result.json" "$ref/snapshot/" 2>/dev/null || true
            if [[ -f "$out/snapshot/memory_snapshot.pickle" ]]; then  # recorded on CUDA only; gzip it (memory_viz wants it unzipped)
                gzip -c "$out/snapshot/memory_snapshot.pickle" > "$ref/snapshot/memory_snapshot.pickle.gz"
            fi
            return ;;
        estimates)  # needs memory_vs_seq_len measured first (this run or an earlier one)
            rc=${rc_of[estimates_fake]}
            if [[ $rc != 0 && $rc != 124 ]]; then failed estimates "$rc"; return; fi
            mkdir -p "$ref/estimates"
            "$PY" -m bench.report.estimates "$out/memory_vs_seq_len" "$out/estimates_fake" --out "$ref/estimates" ||
                failed estimates $?
            return ;;
    esac
    [[ -z "${parts[$step]:-}" ]] || several=1
    while IFS=$'\t' read -r -u 3 label dir own; do
        rc=${rc_of[$label]}
        if [[ $rc == 124 ]]; then stopped=1; elif [[ $rc != 0 && $worst == 0 ]]; then worst=$rc; fi
    done 3< <(sweeps_of "$step")
    if [[ $worst != 0 ]]; then failed "$step" "$worst"; return; fi
    if [[ $several == 1 || $stopped == 1 ]]; then
        "$PY" -m bench.report "$out/$step" || { echo "gpu_check: $step measured no point"; return; }
    fi
    mkdir -p "$ref/$step"
    cp "$out/$step"/{table.csv,table.parquet,report.md} "$out/$step"/*.png "$ref/$step/"
    while IFS=$'\t' read -r -u 3 label dir own; do  # each sweep's settings, without this machine's paths
        if [[ -f "$dir/multirun.yaml" ]]; then
            "$PY" -m bench.sweep.portable "$dir/multirun.yaml" "$ref/$step/multirun${label#"$step"}.yaml"
        fi
    done 3< <(sweeps_of "$step")
}

# The memory-only steps side by side (or one after another with GPU_CHECK_SERIAL=1), then the
# timed steps alone, in the order named.
first=() then=()
for step in $steps; do
    if [[ $side_by_side == *" $step "* ]]; then first+=("$step"); else then+=("$step"); fi
done
if [[ "${GPU_CHECK_DRY:-0}" == 1 ]]; then  # each sweep's command line, in that order; nothing runs
    for step in "${first[@]}" "${then[@]}"; do start_step "$step" dry; done
    exit 0
fi
logs=$out/logs
times=$logs/times.txt
mkdir -p "$logs"
rm -f "$times"
background=1
[[ "${GPU_CHECK_SERIAL:-0}" != 1 ]] || background=0
for step in "${first[@]}"; do start_step "$step" "$background"; done
wait_lanes
for step in "${first[@]}"; do finish_step "$step"; done
for step in "${then[@]}"; do
    start_step "$step" 0
    finish_step "$step"
done

seconds=$((SECONDS - start))
mkdir -p "$ref"
{
    echo "# scripts/gpu_check.sh ${args[*]}: ${seconds} s${GPU_CHECK_SMOKE:+ (GPU_CHECK_SMOKE=$GPU_CHECK_SMOKE)}"
    echo "steps: $steps${GPU_CHECK_STEP_S:+ (GPU_CHECK_STEP_S=$GPU_CHECK_STEP_S)}${GPU_CHECK_SERIAL:+ (GPU_CHECK_SERIAL=$GPU_CHECK_SERIAL)}"
    echo "sweeps (wall time, exit status), in the order they started; memory-only steps side by side unless GPU_CHECK_SERIAL=1:"
    for label in "${started[@]}"; do
        grep "^$label " "$times" | sed 's/^/  /' || echo "  $label: no time recorded"
    done
    echo "git: $(git describe --always --dirty --abbrev=12 2>/dev/null || echo unknown)"
    if [[ $gpu != cpu_smoke ]]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    fi
    "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "CUDA", torch.version.cuda, "transformers", transformers.__version__)'
} > "$ref/environment.txt"
echo "gpu_check: ${seconds} s -> $out, copied to $ref"
exit "$status"
