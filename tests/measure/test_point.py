"""One point measured in-process on the tiny models: ok, oom and error rows; resuming a sweep."""

import logging
from types import SimpleNamespace

import pytest
from hydra.types import RunMode

import bench.measure.point
from bench.config import BenchConfig, resolve
from bench.measure import machine
from bench.measure.point import measure
from bench.rows.files import RESULT_FILE, find_measured, write_row
from bench.rows.schema import COLUMNS, IDENTITY, identity
from bench.sweep import app


def _point(**kw):
    base = dict(size="tiny", seq_len=48, new_tokens=3, repeats=1, warmup=0)
    return resolve(BenchConfig(**{**base, **kw}))


@pytest.mark.parametrize("scenario", ["prefill", "decode", "generate"])
def test_measure_fills_the_row(scenario):
    row = measure(_point(model="ouro", loops=2, scenario=scenario))
    assert row["status"] == "ok", row["error"]
    assert list(row) == COLUMNS
    assert row["kv_bytes_measured"] == row["kv_bytes_analytic"]  # the probe agrees with the model
    assert row["baseline_bytes"] == row["weights_bytes"]  # nothing but weights after load
    assert row["peak_bytes"] > row["weights_bytes"] + row["kv_bytes_measured"]
    assert row["prefill_tokens_per_s"] > 0
    decodes = scenario != "prefill"
    assert (row["decode_tokens_per_s"] is not None) == decodes
    if decodes:
        assert row["token_latency_ms_p90"] >= row["token_latency_ms_p50"] > 0
    assert row["peak_bytes"] == max(v for k, v in row.items()
                                    if k in ("peak_prefill_bytes", "peak_decode_bytes") and v
                                    and (scenario == "generate" or k.startswith(f"peak_{scenario}")))


def test_memory_limit_gives_an_oom_row():
    row = measure(_point(model="ouro", loops=4, mem_limit_mib=0.2))
    assert row["status"] == "oom" and "out of memory" in row["error"]
    assert row["peak_bytes"] is None


def test_other_failures_give_an_error_row(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("broken on purpose")

    monkeypatch.setattr(bench.measure.point, "build_model", broken)
    row = measure(_point(model="melt"))
    assert row["status"] == "error" and row["error"] == "ValueError: broken on purpose"


@pytest.mark.parametrize("model", ["standard", "ouro", "melt"])
def test_fake_probe_estimates_what_tracked_measures(model):
    tracked = measure(_point(model=model, loops=2, probe="tracked"))
    fake = measure(_point(model=model, loops=2, probe="fake"))
    assert fake["status"] == "ok", fake["error"]
    for column in ("peak_bytes", "peak_prefill_bytes", "peak_decode_bytes", "kv_bytes_measured",
                   "baseline_bytes"):
        assert abs(fake[column] - tracked[column]) <= 0.01 * tracked[column], column
    assert fake["decode_tokens_per_s"] is None  # nothing ran, nothing is timed


def test_a_runtime_error_saying_out_of_memory_is_an_oom(monkeypatch):
    def cublas_failure(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory\nmore lines")

    monkeypatch.setattr(bench.measure.point, "build_model", cublas_failure)
    row = measure(_point(model="ouro"))
    assert row["status"] == "oom" and row["error"] == "RuntimeError: CUDA error: out of memory"


# -- resuming a sweep: which rows count as measured ---------------------------------------------

@pytest.fixture
def sweep_job(tmp_path, monkeypatch, caplog):
    """app.run as a multirun job over tmp_path, with a stand-in for measure() and the git
    version `sha`; -> run(cfg, sha) giving (returned row, progress line, whether it measured)."""
    measured = []

    def fake_measure(point, folder=None):
        measured.append(point)
        return {**dict.fromkeys(COLUMNS), **identity(point), "status": "ok", "peak_bytes": 2**20,
                "git_sha": machine.info()["git_sha"], "timestamp": "2026-02-01T00:00:00+00:00"}

    monkeypatch.setattr(app, "measure", fake_measure)

    def run(cfg, sha):
        monkeypatch.setattr(machine, "info", lambda device="cpu": {"git_sha": sha})
        out = tmp_path / "points" / f"seed={cfg.seed}"
        monkeypatch.setattr(app.HydraConfig, "get", staticmethod(lambda: SimpleNamespace(
            mode=RunMode.MULTIRUN, job=SimpleNamespace(num=0), sweep=SimpleNamespace(dir=str(tmp_path)),
            runtime=SimpleNamespace(output_dir=str(out)))))
        n, caplog.records[:] = len(measured), []
        with caplog.at_level(logging.INFO, logger="bench"):
            row = app.run(cfg)
        return row, caplog.records[-1].getMessage(), len(measured) > n

    return run


def _measured_row(cfg, folder, **kw):
    return write_row(folder, {**identity(resolve(cfg)), "status": "ok", "peak_bytes": 1,
                              "timestamp": "2026-01-01T00:00:00+00:00", **kw})


def test_resume_skips_a_row_of_the_same_identity_and_code(tmp_path, sweep_job):
    cfg = BenchConfig(size="tiny", model="melt", seq_len=48)
    path = _measured_row(cfg, tmp_path / "points" / "seed=0", git_sha="abc")
    before = path.read_text()
    row, line, measured = sweep_job(cfg, "abc")
    assert not measured and row["peak_bytes"] == 1 and "already measured, skipped" in line
    assert path.read_text() == before
    # An unknown version on either side counts as the same code.
    assert not sweep_job(cfg, None)[2]
    _measured_row(cfg, tmp_path / "points" / "seed=0", git_sha=None)
    assert not sweep_job(cfg, "def")[2]


def test_resume_measures_another_seed(tmp_path, sweep_job):
    _measured_row(BenchConfig(size="tiny", seq_len=48, seed=0), tmp_path / "points" / "seed=0", git_sha="abc")
    row, line, measured = sweep_job(BenchConfig(size="tiny", seq_len=48, seed=1), "abc")
    assert measured and row["seed"] == 1 and "skipped" not in line
    assert (tmp_path / "points" / "seed=1" / RESULT_FILE).exists()


def test_resume_measures_a_row_from_other_code_again(tmp_path, sweep_job):
    cfg = BenchConfig(size="tiny", seq_len=48)
    path = _measured_row(cfg, tmp_path / "points" / "seed=0", git_sha="abc")
    row, line, measured = sweep_job(cfg, "def")
    assert measured and row["git_sha"] == "def"
    assert "measured again: the row was from git abc, this is def" in line
    assert '"git_sha": "def"' in path.read_text()  # the stale row is replaced
    assert not sweep_job(cfg, "def")[2]  # and now counts as measured


# The identity columns, written out from docs/columns.md's "identity" group: a row counts as this
# point's only if every one of them agrees.
IDENTITY_COLUMNS = ["model", "size", "loops", "seq_len", "batch", "new_tokens", "scenario", "dtype", "device",
                    "probe", "prefill", "chunk_size", "cache_update", "init_latent", "ema_alpha", "kv_sharing",
                    "kv_ring", "kv_anchor", "kv_window", "exit_policy", "exit_threshold", "exit_step",
                    "mem_limit_mib", "seed", "checkpoint", "text", "compile", "compile_backend", "profile"]


def test_the_identity_is_the_documented_columns():
    assert sorted(IDENTITY) == sorted(IDENTITY_COLUMNS)
    assert sorted(identity(_point(model="melt"))) == sorted(IDENTITY_COLUMNS)


@pytest.mark.parametrize("column", IDENTITY_COLUMNS)
def test_resume_measures_again_when_any_identity_column_changes(tmp_path, column):
    ident = identity(_point(model="melt"))
    write_row(tmp_path / "point", {**ident, "status": "ok", "timestamp": "2026-01-01T00:00:00+00:00"})
    assert find_measured(tmp_path, ident) is not None
    assert find_measured(tmp_path, {**ident, column: f"{ident[column]}-other"}) is None


# What docs/settings-and-sweeps.md ("Re-runs, failures") says a re-run does with a row of this
# identity and code: ok and oom rows stand, an error is retried, and so is a timing pass that
# failed with an error (a timing oom is a result).
RESUME = [("ok", "ok", False), ("ok", None, False), ("oom", None, False), ("ok", "oom", False),
          ("error", None, True), ("ok", "error", True)]


@pytest.mark.parametrize("status, timing_status, measured_again", RESUME)
def test_resume_retries_errors_and_keeps_ok_and_oom_rows(tmp_path, sweep_job, status, timing_status, measured_again):
    cfg = BenchConfig(size="tiny", model="melt", seq_len=48)
    _measured_row(cfg, tmp_path / "points" / "seed=0", git_sha="abc", status=status, timing_status=timing_status)
    row, line, measured = sweep_job(cfg, "abc")
    assert measured == measured_again
    assert row["status"] == ("ok" if measured_again else status)  # the stand-in measures ok
    assert ("already measured, skipped" in line) != measured_again
