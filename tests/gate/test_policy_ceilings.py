"""The cache policies' CI memory gate: experiment=ci_policies (every cache design at loops 1 to 3,
size tiny) against the committed conf/ceilings/ci_policies.yaml, and a policy that keeps too much
caught at its point. A file of its own so that it runs beside the `ci` sweep's file, on another
worker."""

from pathlib import Path

import pytest

from bench.config import BenchConfig, resolve
from bench.gate.ceilings import check, load_ceilings, load_results
from bench.measure.point import measure

ROOT = Path(__file__).resolve().parents[2]

POLICIES_CEILINGS = ROOT / "conf" / "ceilings" / "ci_policies.yaml"


@pytest.fixture(scope="module")
def ci_policies(tmp_path_factory):
    """Every cache design at loops 1 to 3, size tiny (about half a minute on 2 cores)."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("ci_policies") / "results"
    done = subprocess.run([sys.executable, str(ROOT / "run_bench.py"), "-m", "experiment=ci_policies",
                           f"hydra.sweep.dir={folder}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return load_results(folder)


def test_policies_sweep_is_within_its_ceilings_and_guards(ci_policies):
    assert (ci_policies.status == "ok").all() and len(ci_policies) == 28
    findings = check(ci_policies, load_ceilings(POLICIES_CEILINGS))
    failed = [f"{f.check} {f.point}: {f.detail}" for f in findings if not f.ok]
    assert not failed, "\n".join(failed)
    kv = [f for f in findings if f.check == "policy_kv_is_formula"]
    assert {f.point.split()[0] for f in kv} == {f"policy={p}" for p in (
        "per_loop", "last_loop", "first_loop", "mean_loops", "ring", "anchor", "first_writes", "loopcoder")}
    flat = {f.point.split()[0] for f in findings if f.check == "policy_flat_in_loops"}
    assert {"policy=first_writes", "policy=ring", "policy=last_loop", "policy=mean_loops"} <= flat
    # and the memory model predicts every design's point
    for measured, predicted in [("peak_prefill_bytes", "predicted_prefill_bytes"),
                                ("peak_decode_bytes", "predicted_decode_bytes"), ("kv_bytes_measured", "predicted_kv_bytes")]:
        exact = ci_policies[ci_policies.policy != "loopcoder"]
        assert (exact[predicted] == exact[measured]).all(), measured
        error = (ci_policies[predicted] / ci_policies[measured] - 1).abs()
        assert error.max() <= 0.001, measured


def test_a_policy_that_keeps_too_much_is_caught_at_its_point(ci_policies, monkeypatch):
    """A ring that allocates one slot group per loop instead of K (the per-loop layout)."""
    from models import OuroLM

    monkeypatch.setattr(OuroLM, "_groups", lambda self: self.config.loops)
    row = measure(resolve(BenchConfig(size="tiny", model="ouro", kv_sharing="ring", kv_ring=2, loops=3, seq_len=96,
                                      chunk_size=64, new_tokens=2, batch=1, scenario="generate", dtype="float32",
                                      device="cpu", probe="tracked", repeats=0, warmup=0)))
    regressed = ci_policies.copy()
    where = (regressed.policy == "ring") & (regressed.loops == 3)
    for column, value in row.items():
        if column in regressed.columns:
            regressed.loc[where, column] = value
    failed = [f for f in check(regressed, load_ceilings(POLICIES_CEILINGS)) if not f.ok]
    assert {f.point.split()[0] + " " + f.point.split()[2] for f in failed} == {"policy=ring loops=3"}
    assert {f.check for f in failed} >= {"ceiling", "policy_kv_is_formula", "policy_flat_in_loops"}
