"""Sweeps through a real Slurm cluster (hydra/launcher=slurm_cpu; scripts/slurm_cluster.sh up makes
one on this machine): the same bytes as the basic launcher, a job id and node in every row, a
re-run that submits nothing already measured, and the scheduler's faults as rows (cancelled, past
the time limit, killed over its memory, killed by a signal) beside the points that survived.
Skipped, with the reason, where sbatch is missing or no cluster answers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest

from bench.rows.schema import MEMORY, PREDICTED
from conftest import ROOT

pytestmark = pytest.mark.slurm


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is missing: no Slurm here (scripts/slurm_cluster.sh up makes a local cluster)"
    up = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if up.returncode != 0 or not up.stdout.strip():
        return f"no Slurm cluster answers sinfo ({(up.stderr or 'no nodes').strip()[:200]})"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


TINY = ["size=tiny", "seq_len=64", "warmup=0", "new_tokens=4", "probe=tracked", "device=cpu"]
LONG = ["repeats=400", "new_tokens=32"]  # a point that runs for tens of seconds: time to act on it


def sweep(folder, *overrides: str, launcher: str = "slurm_cpu", wait: bool = True):
    cmd = [sys.executable, str(ROOT / "run_bench.py"), "-m", *overrides, f"hydra.sweep.dir={folder}"]
    if launcher:
        cmd.append(f"hydra/launcher={launcher}")
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def rows(folder) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("result.json"))]


def running_jobs(count: int, timeout: float = 180) -> list[str]:
    """The ids of `count` jobs of ours once they run (squeue), oldest first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True).stdout
        ids = sorted(out.split(), key=lambda i: [int(x) for x in i.split("_")])
        if len(ids) >= count:
            return ids[:count]
        time.sleep(1)
    raise AssertionError(f"fewer than {count} jobs running after {timeout} s: {out!r}")


def kill_python(job_id: str, timeout: float = 60) -> None:
    """SIGKILL the job's Python process (the point), as the kernel's OOM killer or an operator would."""
    import os
    import signal

    raw = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%A"], capture_output=True, text=True).stdout.strip()
    deadline = time.time() + timeout
    while time.time() < deadline:  # scontrol takes the array task's own job id
        out = subprocess.run(["scontrol", "listpids", raw or job_id], capture_output=True, text=True).stdout
        for pid in [int(line.split()[0]) for line in out.splitlines()[1:] if line.split()]:
            try:
                if open(f"/proc/{pid}/comm").read().startswith("python"):
                    os.kill(pid, signal.SIGKILL)
                    return
            except OSError:
                continue
        time.sleep(0.5)
    raise AssertionError(f"no Python process in job {job_id}")


def test_a_slurm_sweep_measures_the_same_bytes_as_the_basic_launcher(tmp_path):
    points = ["model=ouro,melt", "loops=2,4", "repeats=0", *TINY]
    slurm = sweep(tmp_path / "slurm", *points)
    assert slurm.returncode == 0, slurm.stderr[-3000:]
    basic = sweep(tmp_path / "basic", *points, launcher="")
    assert basic.returncode == 0, basic.stderr[-3000:]
    keys = ["model", "loops"]
    measured = pd.DataFrame(rows(tmp_path / "slurm")).sort_values(keys).reset_index(drop=True)
    local = pd.DataFrame(rows(tmp_path / "basic")).sort_values(keys).reset_index(drop=True)
    assert len(measured) == 4 and (measured.status == "ok").all()
    # every byte count of the probe and the memory model (the process's RSS is the OS's, not ours)
    columns = [c for c in MEMORY + PREDICTED if c.endswith("_bytes") and c != "process_peak_rss_bytes"
               and measured[c].notna().any()]
    pd.testing.assert_frame_equal(measured[keys + columns], local[keys + columns])
    assert measured.slurm_job_id.notna().all() and measured.node.notna().all()
    assert local.slurm_job_id.isna().all()
    assert (tmp_path / "slurm" / "table.csv").exists() and (tmp_path / "slurm" / "report.md").exists()

    again = sweep(tmp_path / "slurm", *points)
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr
    assert said.count("already measured") == 4 and "SUBMITTED" not in said
    assert sorted(r["slurm_job_id"] for r in rows(tmp_path / "slurm")) == sorted(measured.slurm_job_id)


def test_a_cancelled_and_a_killed_job_become_rows_and_a_rerun_measures_only_them(tmp_path):
    run = sweep(tmp_path, "model=standard", "seq_len=64,65,66", *LONG[:1], "new_tokens=32", "size=tiny",
                "warmup=0", "device=cpu", "hydra.launcher.cpus_per_task=1", wait=False)
    first, second = running_jobs(2)
    subprocess.run(["scancel", first], check=True)
    kill_python(second)
    out, _ = run.communicate(timeout=900)
    assert run.returncode == 0, out[-3000:]
    by_job = {r["slurm_job_id"]: r for r in rows(tmp_path)}
    assert by_job[first]["status"] == "cancelled" and "CANCELLED by" in by_job[first]["error"]
    assert by_job[second]["status"] == "failed" and "FAILED, exit code" in by_job[second]["error"]
    survivors = [r for r in by_job.values() if r["status"] == "ok"]
    assert len(survivors) == 1 and survivors[0]["peak_bytes"] > 0
    table = pd.read_csv(tmp_path / "table.csv")
    assert sorted(table.status) == ["cancelled", "failed", "ok"]
    assert all((tmp_path / plot).exists() for plot in ("memory_vs_seq_len.png", "report.md"))

    again = sweep(tmp_path, "model=standard", "seq_len=64,65,66", *LONG[:1], "new_tokens=32", "size=tiny",
                  "warmup=0", "device=cpu")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("already measured") == 1
    assert sorted(pd.read_csv(tmp_path / "table.csv").status) == ["ok", "ok", "ok"]


def test_a_job_over_its_memory_is_killed_and_its_row_says_so(tmp_path):
    """mem_gb=1 against a LoopLM cache of 16 loops x 8,000 tokens at size small (over 1 GB)."""
    run = sweep(tmp_path, "model=ouro", "loops=16", "size=small", "seq_len=8000", "new_tokens=2", "repeats=0",
                "warmup=0", "device=cpu", "hydra.launcher.mem_gb=1")
    assert run.returncode == 0, run.stderr[-3000:]
    (row,) = rows(tmp_path)
    assert row["status"] == "out_of_memory", row["error"]
    assert "killed over its memory limit" in row["error"] and row["slurm_job_id"]
    assert row["predicted_peak_bytes"] > 2**30  # what it would have taken


def test_a_job_past_its_time_limit_is_a_timeout_row(tmp_path):
    run = sweep(tmp_path, "model=standard", "repeats=100000", *TINY, "hydra.launcher.timeout_min=1")
    assert run.returncode == 0, run.stderr[-3000:]
    (row,) = rows(tmp_path)
    assert row["status"] == "timeout" and "TIMEOUT" in row["error"], row["error"]
    time.sleep(5)  # the point's process ends with its job: none is left running
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes of the timed-out job still run: {left}"


def test_a_request_the_cluster_can_never_run_is_an_error_at_once(tmp_path):
    for setting in ("hydra.launcher.cpus_per_task=64", "hydra.launcher.gpus_per_node=1", "hydra.launcher.mem_gb=4096"):
        started = time.time()
        run = sweep(tmp_path, "model=standard", *TINY, "repeats=0", setting)
        assert run.returncode == 2, run.stderr[-2000:]
        assert run.stderr.strip().splitlines()[-1].startswith(f"run_bench.py: error: {setting}: the Slurm cluster refused")
        assert time.time() - started < 60 and rows(tmp_path) == []
