"""The result row: one sweep point's settings and measurements, one value per column, bytes as
integers. Plain names only (no torch): the report and the gate read rows without building a model.
"""

from __future__ import annotations

import dataclasses

# The options only one model takes (models.config.MODEL_OPTIONS, in its order; a test keeps the two
# equal): identity columns, empty for the models that do not have them.
MODEL_OPTION_COLUMNS = ["chunk_size", "cache_update", "init_latent", "ema_alpha", "kv_sharing", "kv_ring",
                        "kv_anchor", "kv_window", "exit_policy", "exit_threshold", "exit_step"]

# A point is identified by these; a sweep skips a point whose identity already has a result
# measured by the same code (git_sha, see find_measured and same_code).
IDENTITY = ["model", "size", "loops", "seq_len", "batch", "new_tokens", "scenario", "dtype",
            "device", "probe", "prefill", *MODEL_OPTION_COLUMNS, "mem_limit_mib", "seed", "checkpoint", "text", "compile",
            "compile_backend", "profile"]
# status: the memory pass (ok | oom | error); timing_status: the timing pass after it (empty when
# the point is not timed). A failed timing pass keeps the memory columns.
STATUS = ["status", "error", "timing_status", "timing_error"]
# The cache design the row measures (models.cache_policies.policy_name: derived from model and kv_sharing).
DESIGN = ["policy"]
MEMORY = ["weights_bytes", "baseline_bytes", "kv_bytes_analytic", "kv_decode_bytes_analytic", "kv_bytes_measured",
          "kv_bytes_per_token", "peak_bytes", "peak_prefill_bytes", "peak_decode_bytes",
          "reserved_bytes", "nvml_used_bytes", "nvml_scope", "non_torch_bytes"]
# Where each phase's peak goes (bench/measure/probes.py): by owner, summing to the tracked peak; on CUDA
# also the allocator's cached, unused share and what the process holds outside PyTorch (NVML).
BREAKDOWN_CATEGORIES = ["weights", "kv", "activations", "allocator", "outside_torch"]
MEMORY += [f"{phase}_{category}_bytes" for phase in ("prefill", "decode") for category in BREAKDOWN_CATEGORIES]
MEMORY += ["process_peak_rss_bytes"]  # the process's peak resident set (its whole life, on CPU and GPU)
# bench.measure.memory_model's analytic prediction for the point (empty for a model it does not cover).
PREDICTED = ["predicted_kv_bytes", "predicted_prefill_bytes", "predicted_decode_bytes",
             "predicted_peak_bytes", "predicted_weights_bytes", "predicted_kv_decode_bytes",
             "predicted_prefill_activations_bytes", "predicted_decode_activations_bytes"]
# Speed: medians over the repeats, and their range (_min, _max).
SPEED = ["prefill_tokens_per_s", "prefill_tokens_per_s_min", "prefill_tokens_per_s_max",
         "decode_tokens_per_s", "decode_tokens_per_s_min", "decode_tokens_per_s_max",
         "token_latency_ms_p50", "token_latency_ms_p90", "bandwidth_utilization", "compile_s"]
# Against the machine's measured limits (bench/measure/roofline.py): weights | kv | compute.
SPEED += ["decode_bound", "prefill_utilization", "prefill_bound"]
# scenario=score: the text's teacher-forced likelihood through the point's cache path (nats).
SCORE = ["scored_tokens", "nll", "perplexity"]
# The capacity search (bench/measure/capacity.py), on its final row: the largest batch within the budget.
CAPACITY = ["budget_bytes", "capacity_max_batch", "capacity_first_oom"]
ENV = ["gpu_name", "torch_version", "cuda_version", "git_sha", "timestamp", "wall_s"]
ENV += ["node", "slurm_job_id"]  # the machine that measured the row, and its Slurm job (empty outside Slurm)
ENV += ["copy_bytes_per_s", "matmul_flops_per_s",  # measured once per run (bench/measure/machine.py)
        "device_bandwidth_bytes_per_s"]              # the GPU's theoretical bandwidth (NVML)
COLUMNS = IDENTITY + DESIGN + STATUS + MEMORY + PREDICTED + SPEED + SCORE + CAPACITY + ENV


def identity(point) -> dict:
    """The identity columns of a resolved point (a bench.config.BenchConfig, see resolve)."""
    values = dataclasses.asdict(point)
    return {k: values[k] for k in IDENTITY}
