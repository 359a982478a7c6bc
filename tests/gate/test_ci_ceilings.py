"""The CI memory gate: the `ci` sweep (tracked and fake probes, size small, CPU) against the
committed conf/ceilings/ci.yaml, and the checks that make its numbers trustworthy: the fake
estimate equals the tracked measurement, the analytic memory model predicts both, a run repeats
its bytes exactly, and an injected regression is reported at exactly its point."""

from pathlib import Path

import pandas as pd
import pytest

from bench.gate.ceilings import DEFAULT_CEILINGS, check, load_ceilings, load_results
from bench.gate.cli import main
from bench.config import BenchConfig, resolve
from bench.measure.point import measure
from models import MeltLM

ROOT = Path(__file__).resolve().parents[2]
POINT = ("policy=melt size=small loops=16 seq_len=256 batch=1 scenario=generate dtype=float32 probe=tracked "
         "prefill=chunked")


@pytest.fixture(scope="module")
def ci_results(tmp_path_factory):
    """The `ci` sweep, run as CI runs it (about a minute on 2 cores)."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("ci") / "results"
    done = subprocess.run([sys.executable, str(ROOT / "run_bench.py"), "-m", "experiment=ci",
                           f"hydra.sweep.dir={folder}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return load_results(folder)


def test_ci_sweep_is_within_its_ceilings_and_guards(ci_results, capsys):
    assert (ci_results.status == "ok").all()
    findings = check(ci_results, load_ceilings(DEFAULT_CEILINGS))
    failed = [f"{f.check} {f.point}: {f.detail}" for f in findings if not f.ok]
    assert not failed, "\n".join(failed)
    # Every guard compared something: MELT at 16 loops vs 4, MELT at one loop vs the standard
    # model, and both looped models' caches vs the standard model's.
    assert {f.check for f in findings} == {"ceiling", "melt_flat_in_loops", "melt_one_loop_is_standard",
                                          "ouro_kv_is_loops_x_standard", "melt_kv_is_standard",
                                          "policy_kv_is_formula"}
    assert any(f.check == "melt_flat_in_loops" and "loops=16" in f.point for f in findings)
    assert sum(f.check == "melt_one_loop_is_standard" for f in findings) == 2 * 4  # 2 lengths x 2 probes x 2 peaks


def test_fake_estimate_equals_tracked_measurement(ci_results):
    columns = ["peak_prefill_bytes", "peak_decode_bytes", "kv_bytes_measured", "baseline_bytes"]
    key = ["model", "loops", "seq_len"]
    fake = ci_results[ci_results.probe == "fake"].set_index(key)[columns].sort_index()
    tracked = ci_results[ci_results.probe == "tracked"].set_index(key)[columns].sort_index()
    assert len(fake) == len(tracked) == 14
    relative = (fake / tracked - 1).abs()
    assert (relative <= 0.01).all().all(), relative[relative > 0.01].dropna(how="all")


def test_memory_model_predicts_every_point(ci_results):
    for measured, predicted in [("peak_prefill_bytes", "predicted_prefill_bytes"),
                                ("peak_decode_bytes", "predicted_decode_bytes"),
                                ("kv_bytes_measured", "predicted_kv_bytes")]:
        error = (ci_results[predicted] / ci_results[measured] - 1).abs()
        worst = ci_results.loc[error.idxmax()]
        assert error.max() <= 0.01, f"{measured}: {error.max():.4f} at {worst.model} {worst.loops} {worst.seq_len}"
    assert (ci_results.predicted_kv_bytes == ci_results.kv_bytes_measured).all()


def test_every_peak_splits_into_weights_kv_and_activations_as_predicted(ci_results):
    """Both probes, every point: the owners' bytes sum to the peak exactly, and the memory model
    predicts each category within 1 % (exactly, in fact)."""
    for phase in ("prefill", "decode"):
        parts = sum(ci_results[f"{phase}_{c}_bytes"] for c in ("weights", "kv", "activations"))
        assert (parts == ci_results[f"peak_{phase}_bytes"]).all(), phase
        kv = "predicted_kv_bytes" if phase == "prefill" else "predicted_kv_decode_bytes"
        for measured, predicted in ((f"{phase}_weights_bytes", "predicted_weights_bytes"), (f"{phase}_kv_bytes", kv),
                                    (f"{phase}_activations_bytes", f"predicted_{phase}_activations_bytes")):
            error = (ci_results[predicted] / ci_results[measured] - 1).abs()
            assert error.max() <= 0.01, (measured, error.max())


def _point(**kw):
    return resolve(BenchConfig(**{**dict(model="melt", size="small", loops=4, seq_len=256, batch=1,
                                          scenario="generate", new_tokens=4, dtype="float32",
                                          device="cpu", probe="tracked", repeats=0, warmup=0), **kw}))


def test_a_run_repeats_its_bytes_exactly():
    first, second = measure(_point()), measure(_point())
    assert first["status"] == second["status"] == "ok", (first["error"], second["error"])  # two error rows agree too
    for column in ("peak_bytes", "peak_prefill_bytes", "peak_decode_bytes", "kv_bytes_measured"):
        assert first[column] == second[column]


def test_injected_regression_is_reported_at_exactly_its_point(ci_results, monkeypatch):
    """A MELT cache that keeps one slot per loop (the LoopLM's layout) at one point."""
    monkeypatch.setattr(MeltLM, "num_cache_slots",
                        lambda self: self.config.num_hidden_layers * self.config.loops)
    row = measure(_point(loops=16))
    key = ["model", "loops", "seq_len", "probe"]
    regressed = ci_results.copy()
    where = (regressed[key] == pd.Series(dict(model="melt", loops=16, seq_len=256, probe="tracked"))).all(axis=1)
    assert where.sum() == 1
    for column, value in row.items():
        if column in regressed.columns:
            regressed.loc[where, column] = value
    failed = [f for f in check(regressed, load_ceilings(DEFAULT_CEILINGS)) if not f.ok]
    assert {f.point for f in failed} == {POINT}
    assert {f.check for f in failed} == {"ceiling", "melt_flat_in_loops", "melt_kv_is_standard"}
    excess = [f.detail for f in failed if f.check == "ceiling"]
    assert len(excess) == 2 and all("ceiling" in d and "%)" in d for d in excess)


def test_ceilings_command_passes_on_the_ci_sweep(ci_results, tmp_path, capsys):
    table = tmp_path / "table.parquet"
    ci_results.to_parquet(table)
    assert main(["check", str(table)]) == 0
    assert "0 FAIL" in capsys.readouterr().out
