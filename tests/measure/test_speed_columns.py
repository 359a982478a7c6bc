"""Speed in the benchmark: the hf_llama peer row, the utilization columns against the measured
machine limits, compile settings, and the capacity search."""

from __future__ import annotations

import os

import pytest
import torch

import models
from bench.measure import machine, roofline
from bench.config import BenchConfig, ConfigError, resolve
from bench.measure.point import measure


def _point(**kw):
    base = dict(size="tiny", seq_len=48, new_tokens=3, repeats=1, warmup=0)
    return resolve(BenchConfig(**{**base, **kw}))


def test_hf_llama_row_through_the_same_probe_and_timers():
    row = measure(_point(model="hf_llama", loops=4, scenario="generate"))
    assert row["status"] == "ok", row["error"]
    assert row["loops"] == 1 and row["compile"] is False
    # DynamicCache allocates as it grows: at the end it holds exactly the analytic layout
    assert row["kv_bytes_measured"] == row["kv_bytes_analytic"] > 0
    assert row["kv_bytes_per_token"] == models.build_model("standard", "tiny").kv_bytes_per_token()
    assert row["peak_decode_bytes"] > row["weights_bytes"] + row["kv_bytes_measured"] // 2
    assert row["decode_tokens_per_s"] > 0 and row["bandwidth_utilization"] > 0


def test_hf_llama_refuses_the_fake_probe_and_checkpoints_before_any_work(tmp_path):
    for scenario in ("decode", "generate"):
        with pytest.raises(ConfigError, match=rf"^probe: fake cannot run hf_llama's {scenario} .*; "
                                              r"allowed: auto \| tracked \| cuda, or scenario=prefill$"):
            _point(model="hf_llama", probe="fake", scenario=scenario)
    assert _point(model="hf_llama", probe="fake", scenario="prefill").probe == "fake"  # no generate
    with pytest.raises(ConfigError, match=r"^checkpoint: hf_llama is built with random weights"):
        _point(model="hf_llama", checkpoint=str(tmp_path))


def test_hf_llama_rows_have_no_memory_prediction():
    row = measure(_point(model="hf_llama"))
    assert row["status"] == "ok" and row["predicted_peak_bytes"] is None


def test_bandwidth_utilization_is_bytes_times_steps_over_the_measured_copy_rate():
    p = _point(model="ouro", loops=2, scenario="decode")
    row = measure(p)
    assert row["copy_bytes_per_s"] > 0 and row["matmul_flops_per_s"] > 0
    # By hand, size tiny (d 64, f 128, 4 heads and 2 KV heads of 16, vocab 256, 2 layers), fp32:
    layer_params = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 4 * 64   # q, o; k, v; MLP; 4 norms
    weights = 4 * 2 * (2 * layer_params + 64 + 65) + 4 * 256 * 64   # 2 loops x (layers, final norm,
    #                                                                   exit gate); the head once
    kv = 2 * 2 * (2 * 2 * 16 * 4) * (48 + (3 - 1) / 2)   # loops x layers x K+V row x mean context
    steps_per_s = row["decode_tokens_per_s"] / p.batch
    expected = (weights + kv) * steps_per_s / row["copy_bytes_per_s"]
    assert row["bandwidth_utilization"] == pytest.approx(expected, rel=1e-9)
    assert row["decode_bound"] in ("weights", "kv", "compute")
    assert row["prefill_utilization"] > 0 and row["prefill_bound"] in ("weights", "kv", "compute")


def test_roofline_terms_and_bounds():
    """Decode reads the layers once per loop, and T slots x layers of KV over the context."""
    p = _point(model="ouro", loops=4, seq_len=100, new_tokens=1, batch=2, repeats=0)
    ouro = models.build_model("ouro", "tiny", loops=4)
    c = ouro.config
    terms = roofline.decode_terms(ouro, p)
    table = c.vocab_size * c.hidden_size * 4
    assert terms["weights"] == 4 * (ouro.weights_bytes() - 2 * table) + table
    assert terms["kv"] == 4 * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4 * 100 * 2
    melt = models.build_model("melt", "tiny", loops=4)
    assert roofline.decode_terms(melt, p)["kv"] == terms["kv"]  # every loop reads every past row
    bw, mm = 1e10, 1e11
    assert roofline.bound(dict(weights=1e6, kv=1e3, flops=1e3), bw, mm) == "weights"
    assert roofline.bound(dict(weights=1e6, kv=1e8, flops=1e3), bw, mm) == "kv"
    assert roofline.bound(roofline.prefill_terms(ouro, _point(model="ouro", seq_len=1000)), bw, mm) == "compute"


def test_env_limits_are_measured_once():
    first = machine.copy_bytes_per_s("cpu")
    assert first > 1e8 and machine.copy_bytes_per_s("cpu") is first  # cached: once per run
    assert machine.matmul_flops_per_s("cpu", "float32") > 1e8


def test_compiled_timing_pass(monkeypatch):
    """compile=true on CPU: the timed decode runs the compiled step (aot_eager here, for speed)."""
    from models.runtime import Engine

    made = []
    original = Engine.compiled_step
    monkeypatch.setattr(Engine, "compiled_step", lambda self: made.append(self.backend) or original(self))
    row = measure(_point(model="melt", loops=2, scenario="decode", compile=True, compile_backend="aot_eager"))
    assert row["status"] == "ok" and row["timing_status"] == "ok", row["error"] or row["timing_error"]
    assert row["compile"] is True and row["compile_backend"] == "aot_eager" and row["decode_tokens_per_s"] > 0
    assert made and set(made) == {"aot_eager"}  # every timed decode went through the compiled step


def test_compile_is_auto_off_on_cpu_and_never_for_the_peer():
    assert _point(model="melt").compile is False
    assert _point(model="melt", compile=True).compile is True


@pytest.mark.parametrize("kw, field", [
    (dict(model="hf_llama", compile=True), "compile"),
    (dict(budget_gb=1.0), "budget_gb"),
    (dict(capacity=True, budget_gb=-1.0), "budget_gb"),
    (dict(capacity=True), "budget_gb"),  # on a CPU there is no free memory to default to
    (dict(capacity=True, budget_gb=1.0, scenario="prefill"), "scenario"),
    (dict(capacity=True, budget_gb=1.0, mem_limit_mib=10.0), "mem_limit_mib"),
    (dict(model="llama"), "model"),
])
def test_bad_speed_settings_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=rf"^{field}: .*; allowed: "):
        _point(**kw)


# -- the capacity search -------------------------------------------------------------------------
def test_capacity_search_finds_the_largest_batch(tmp_path):
    """Doubling then bisection on the tracked probe's simulated budget; every trial is a row."""
    import json

    from bench.measure import capacity
    from bench.rows.files import load_rows

    point = _point(model="ouro", loops=2, seq_len=64, capacity=True, budget_gb=0.0012)
    row = capacity.search(point, tmp_path, measure)
    assert row["status"] == "ok", row["error"]
    best, first_oom = row["capacity_max_batch"], row["capacity_first_oom"]
    assert best >= 2 and first_oom == best + 1 and row["batch"] == best
    assert row["budget_bytes"] == 1_200_000 and row["mem_limit_mib"] == pytest.approx(1_200_000 / 2**20)
    assert row["peak_bytes"] <= row["budget_bytes"] and row["decode_tokens_per_s"] > 0
    trials = {int(p.parent.name.split("=")[1]): json.loads(p.read_text())
              for p in (tmp_path / "trials").rglob("result.json")}
    # doubling up to the first OOM, then bisection: every trial below best fits, the rest do not
    assert all(r["status"] == "ok" for b, r in trials.items() if b < best)
    assert all(r["status"] == "oom" and "out of memory" in r["error"] for b, r in trials.items() if b > best)
    assert {1, 2, first_oom} <= set(trials) | {best}  # doubling from 1, and the OOM that bounds it
    assert best not in trials  # its row is the timed final one, written by the caller
    assert all(r["peak_bytes"] <= 1_200_000 for r in trials.values() if r["status"] == "ok")
    assert load_rows(tmp_path).batch.is_unique


def test_capacity_when_not_even_one_sequence_fits(tmp_path):
    from bench.measure import capacity

    row = capacity.search(_point(model="melt", capacity=True, budget_gb=1e-5), tmp_path, measure)
    assert row["status"] == "oom" and row["capacity_max_batch"] == 0 and row["capacity_first_oom"] == 1


# -- scripts/gpu_check.sh, in its CPU smoke mode ----------------------------------------------------
@pytest.mark.slow  # the default steps' ten run_bench.py launches, five side by side: about a minute on 2 cores
def test_gpu_check_script_runs_in_cpu_smoke_mode(tmp_path):
    """The GPU check's default steps (sweeps side by side, then the timed ones, copies to the
    reference folder, environment) on CPU at size tiny: the logic a GPU run depends on, minus the
    GPU. Every default step leaves its results: a table per sweep step, the snapshot's row, the
    estimates' comparison."""
    import pandas as pd
    from omegaconf import OmegaConf

    from conftest import ROOT

    run = _gpu_check(tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ref = tmp_path / "reference"
    for step in ("memory_vs_seq_len", "policies", "decode_compiled", "capacity"):
        table = pd.read_csv(ref / step / "table.csv")
        assert len(table) and (table.status.isin(["ok", "oom"])).all(), step
        assert (ref / step / "report.md").exists() and list((ref / step).glob("multirun*.yaml")), step
    memory = pd.read_csv(ref / "memory_vs_seq_len" / "table.csv")
    assert set(memory.model) == {"standard", "ouro", "melt"}  # its two sweeps, side by side
    assert {p.name for p in (ref / "memory_vs_seq_len").glob("multirun*.yaml")} == {"multirun.1.yaml", "multirun.2.yaml"}
    designs = OmegaConf.load(ROOT / "conf" / "experiment" / "policies.yaml").hydra.sweeper.params.policy
    assert set(pd.read_csv(ref / "policies" / "table.csv").policy) == set(designs.split(","))
    decode = pd.read_csv(ref / "decode_compiled" / "table.csv").set_index("model")
    assert set(decode.index) == {"standard", "ouro", "melt", "hf_llama"}
    assert decode.compile.to_dict() == {"standard": True, "ouro": True, "melt": True, "hf_llama": False}
    assert set(decode.compile_backend.drop("hf_llama")) == {"aot_eager"}  # no inductor build on a CPU
    assert decode.timing_status.eq("ok").all() and decode.bandwidth_utilization.gt(0).all()
    assert decode.decode_bound.notna().all()
    assert "standard / hf_llama" in (ref / "decode_compiled" / "report.md").read_text()
    capacity = pd.read_csv(ref / "capacity" / "table.csv")
    finals = capacity[capacity.capacity_max_batch.notna()].set_index("model")
    assert set(finals.index) == {"standard", "ouro", "melt"}
    assert (capacity.status == "oom").any()  # the search's OOM trials are rows
    assert finals.capacity_max_batch["melt"] > finals.capacity_max_batch["ouro"] >= 1
    assert finals.decode_tokens_per_s.gt(0).all()  # the throughput at each model's largest batch
    assert (ref / "capacity" / "capacity.png").stat().st_size > 0
    assert (tmp_path / "snapshot" / "result.json").exists() and (ref / "snapshot" / "result.json").exists()
    estimates = pd.read_csv(ref / "estimates" / "estimate_vs_cuda.csv")
    assert set(estimates.model) == {"standard", "ouro", "melt"} and set(estimates.phase) == {"prefill", "decode"}
    assert estimates["fake error %"].abs().max() <= 1 and estimates["predicted error %"].abs().max() <= 1
    environment = (ref / "environment.txt").read_text()
    assert "GPU_CHECK_SMOKE=1" in environment
    sweeps = dict(line.strip().split(" ", 1) for line in environment.splitlines() if line.startswith("  "))
    assert list(sweeps) == ["memory_vs_seq_len.1", "memory_vs_seq_len.2", "policies", "snapshot", "estimates_fake",
                            "decode_compiled.1", "decode_compiled.2", "capacity"]  # each sweep's time, in order
    assert all(v.endswith(" s, exit 0") for v in sweeps.values()), sweeps


def test_a_reset_cache_decodes_a_new_prompt_as_a_fresh_cache_does():
    """The timing pass reuses the memory pass's cache (CUDA graphs need its buffers at fixed
    addresses): reset() gives back the slots last-loop sharing dropped and keeps the others where
    they are. Its rows still hold the previous prompt: a second prompt must decode exactly as in a
    fresh cache, for every decoded step's logits."""
    from models.runtime import Engine

    def decoded(engine, cache, prompt):  # the logits of every decode step of one round
        steps, step = [], engine.model.decode_step
        logits = engine.prefill(prompt, cache)
        engine.model.decode(logits.argmax(-1), cache, prompt.shape[1], 4,
                            step=lambda *a: steps.append(step(*a)) or steps[-1])
        return torch.cat(steps)

    torch.manual_seed(0)
    prompts = torch.randint(0, 256, (2, 2, 12))
    for options in (dict(), dict(kv_sharing="last_loop")):
        engine = Engine(models.build_model("ouro", "tiny", loops=2, **options), compile=True)
        with torch.inference_mode():
            cache = engine.new_cache(2, 16)
            decoded(engine, cache, prompts[0])
            kept = [id(t) for t in cache.buffers()]
            second = decoded(engine, cache.reset(), prompts[1])
            fresh = decoded(engine, engine.new_cache(2, 16), prompts[1])
        assert [id(t) for t in cache.buffers()] == kept  # the decode step saw the same buffers
        torch.testing.assert_close(second, fresh, rtol=0, atol=0)


def test_capacity_report_of_an_untimed_search(tmp_path):
    """probe=fake estimates the batches without timing: the report says so instead of failing."""
    from bench.report.build import build
    from bench.report.views import CAPACITY_PLOT
    from bench.rows.files import write_row
    from bench.rows.schema import COLUMNS

    for model, best in (("ouro", 2), ("melt", 9)):
        write_row(tmp_path / model, {**dict.fromkeys(COLUMNS), "model": model, "size": "tiny", "loops": 4,
                                     "seq_len": 64, "batch": best, "scenario": "generate", "status": "ok",
                                     "probe": "fake", "dtype": "float32", "device": "cpu", "peak_bytes": 10,
                                     "kv_bytes_analytic": 5, "budget_bytes": 100, "capacity_max_batch": best,
                                     "capacity_first_oom": best + 1, "timestamp": "2026-01-01T00:00:00+00:00"})
    build(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "MELT / LoopLM max batch 4.50, decode tok/s not timed (probe fake)" in text
    assert (tmp_path / CAPACITY_PLOT).stat().st_size > 0


def _gpu_check(tmp_path, timeout=120, **env):
    """scripts/gpu_check.sh in smoke mode (unless env says otherwise) with this interpreter."""
    import subprocess
    import sys

    from conftest import ROOT

    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SMOKE": "1",
                               "GPU_CHECK_OUT": str(tmp_path), **env})


def test_gpu_check_step_limit_moves_on_and_records_the_limit(tmp_path):
    """A sweep stopped by GPU_CHECK_STEP_S (here before its first point: 1 s is less than Python's
    start-up) is reported and the check goes on to the next step and its environment file: on a
    GPU lease, one slow step must not cost the others."""
    run = _gpu_check(tmp_path, GPU_CHECK_ONLY="memory_vs_seq_len snapshot", GPU_CHECK_STEP_S="1")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    for sweep in ("memory_vs_seq_len.1", "memory_vs_seq_len.2"):  # its two sweeps, side by side
        assert f"gpu_check: {sweep} stopped after GPU_CHECK_STEP_S=1 s" in run.stdout
    assert "gpu_check: memory_vs_seq_len measured no point" in run.stdout
    assert "gpu_check: snapshot stopped or failed (exit 124)" in run.stdout
    environment = (tmp_path / "reference" / "environment.txt").read_text()
    assert "(GPU_CHECK_STEP_S=1)" in environment and "  memory_vs_seq_len.1 " in environment
    assert environment.count(", exit 124") == 3


@pytest.mark.parametrize("smoke", ["1", "0"])
def test_gpu_check_names_the_steps_it_has(tmp_path, smoke):
    """An unknown step name stops the check before any work: one line, nothing written, and on
    the GPU path not even the GPU's name asked for (PYTHON=false would fail it)."""
    python = {} if smoke == "1" else {"PYTHON": "false"}
    run = _gpu_check(tmp_path / "out", GPU_CHECK_SMOKE=smoke, GPU_CHECK_ONLY="memory_vs_seq_len decode_fast", **python)
    assert run.returncode == 2
    assert run.stderr.startswith("gpu_check: no step 'decode_fast'; allowed:") and run.stderr.count("\n") == 1
    assert "decode_compiled" in run.stderr and "capacity" in run.stderr
    assert run.stdout == "" and not (tmp_path / "out").exists()


def test_gpu_check_gpu_sweeps_resolve_for_a_gpu(tmp_path):
    """GPU_CHECK_DRY=1 prints the GPU run's command lines, in the order they run, without a GPU;
    each point composes and resolves as on a GPU node (hydra/launcher=slurm checks a point for the
    GPU it will get), so a bad override fails here, not on a device lease."""
    import shlex

    from bench.config import register
    from bench.sweep.preflight import CONF, expand

    register()  # the schema the configs build on, as run_bench.py does
    run = _gpu_check(tmp_path, GPU_CHECK_SMOKE="0", GPU_CHECK_DRY="1")
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    assert list(lines) == ["memory_vs_seq_len.1", "memory_vs_seq_len.2", "policies", "snapshot", "estimates_fake",
                           "decode_compiled", "capacity"]
    assert not (tmp_path / "reference").exists()
    points = {}
    for label, line in lines.items():
        argv = shlex.split(line)
        assert argv[0] == "run_bench.py"
        overrides = [a for a in argv[1:] if a != "-m"]  # one point without -m: a sweep of one
        points[label] = expand(overrides + ["hydra/launcher=slurm"], True, CONF, "config")
    on_gpu = [p for label, ps in points.items() if label != "estimates_fake" for p in ps]
    assert {(p.device, p.probe, p.size, p.dtype) for p in on_gpu} == {("cuda", "cuda", "ouro-1.4b", "bfloat16")}
    memory = points["memory_vs_seq_len.1"] + points["memory_vs_seq_len.2"]
    assert sorted((p.model, p.seq_len) for p in memory) == sorted(
        (m, s) for m in ("standard", "ouro", "melt") for s in (4096, 16384, 32768))
    assert {(p.loops, p.batch, p.repeats) for p in memory if p.model != "standard"} == {(4, 1, 0)}
    fake = points["estimates_fake"]
    assert {(p.device, p.probe) for p in fake} == {("cpu", "fake")}
    assert sorted((p.model, p.seq_len) for p in fake) == sorted((p.model, p.seq_len) for p in memory)
    assert len(points["policies"]) == 10
    assert {(p.seq_len, p.loops, p.repeats) for p in points["policies"] if p.model != "standard"} == {(4096, 4, 0)}
    (snapshot,) = points["snapshot"]
    assert (snapshot.model, snapshot.profile, snapshot.seq_len, snapshot.loops) == ("melt", "snapshot", 4096, 4)
    decode = {p.model: p for p in points["decode_compiled"]}
    assert {m: (p.compile, p.seq_len, p.batch) for m, p in decode.items()} == {
        "standard": (True, 4096, 1), "ouro": (True, 4096, 1), "melt": (True, 4096, 1), "hf_llama": (False, 4096, 1)}
    assert decode["ouro"].loops == decode["melt"].loops == 4 and decode["ouro"].compile_backend == "inductor"
    capacity = {p.model: p for p in points["capacity"]}
    assert set(capacity) == {"standard", "ouro", "melt"}
    assert {(p.capacity, p.seq_len, p.budget_gb, p.compile) for p in capacity.values()} == {(True, 32768, 32, False)}
    assert capacity["ouro"].loops == capacity["melt"].loops == 4
