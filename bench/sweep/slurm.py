"""Sweep points as Slurm jobs (hydra/launcher=slurm, one GPU a point; slurm_cpu, CPU partitions)
that always come back as rows.

What hydra_plugins/meltbench_launcher.py (Hydra finds launchers only there) does on top of
submitit's launcher, for a benchmark sweep on a real cluster:
- a request the cluster can never run (more CPUs, memory or GPUs than a node has, an unknown
  partition, account or qos) is refused by sbatch and stops the sweep at once, in one line that
  names the setting (the cluster needs EnforcePartLimits=ALL, or such a job pends forever);
- every job is waited for, with one log line per change of its state; a job the scheduler ended
  (cancelled, past its time limit, killed over its memory, killed by a signal) becomes its point's
  row, whose status and error give sacct's state, exit code and reason, so the other points'
  table, report and plots are written and a re-run measures the failed points only;
- a point is never requeued: submitit's warning signal before the time limit is ignored (a point
  cannot be checkpointed), so the scheduler ends it and sacct says TIMEOUT.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf, open_dict

from ..config import ConfigError, resolve
from ..measure import machine
from ..measure.point import blank_row
from ..rows.files import find_measured, same_code, write_row
from ..rows.schema import identity
from .preflight import fail, job_settings

log = logging.getLogger("bench")

POLL_S = 3.0  # how often the jobs' states are read (one sacct call for all of them)
MISSING_POLLS = 3  # polls a job may be unknown to both sacct and the queue before it counts as gone
# sbatch's refusals -> the launcher setting that asked for what the cluster cannot give
REFUSALS = [(r"CPU count|cpus|processors", "cpus_per_task"), (r"[Mm]emory", "mem_gb"), (r"gres|GRES|gpu", "gpus_per_node"),
            (r"[Pp]artition", "partition"), (r"[Aa]ccount", "account"), (r"qos|QOS", "qos"),
            (r"[Ff]eature|constraint", "constraint"), (r"[Tt]ime limit", "timeout_min")]
# sacct states of a job that ended without a result; the row's status is the state in lower case
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE")


def in_job() -> None:
    """In a point's job, before it runs: a point cannot be checkpointed, so submitit's warning
    signal before the time limit is ignored and the limit ends the job (sacct: TIMEOUT)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def launch(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    """Submit the points as one job array, wait for every job, and return a JobReturn per point:
    the job's own, or its fault row's. `launcher`: the Hydra launcher (its params, config and
    context; hydra_plugins/meltbench_launcher.py)."""
    import submitit

    executor = submitit.AutoExecutor(folder=launcher.params["submitit_folder"], cluster="slurm",
                                     slurm_max_num_timeout=0)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in launcher.params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    # The point runs in the batch shell, not in an srun step: the warning signal submitit asks for
    # (USR2, before the time limit) goes to steps only, so none reaches it and the limit ends it.
    executor.update_parameters(slurm_use_srun=False)
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    returns: dict[int, JobReturn] = {}
    to_run = []
    for i, overrides in enumerate(job_overrides):  # a point measured by this code needs no job
        cfg, point, folder = _point(launcher, list(overrides), initial_job_idx + i)
        done = find_measured(cfg.hydra.sweep.dir, identity(point), machine.info(point.device)["git_sha"])
        if done is not None and same_code(done.get("git_sha"), machine.info(point.device)["git_sha"]):
            log.info("point %d: already measured (slurm job %s), not submitted | %s", initial_job_idx + i + 1,
                     done.get("slurm_job_id"), " ".join(filter_overrides(overrides)))
            returns[i] = _returning(cfg, list(overrides), folder, done)
        else:
            to_run.append(i)
    params = [(list(job_overrides[i]), "hydra.sweep.dir", initial_job_idx + i, f"job_id_for_{initial_job_idx + i}",
               Singleton.get_state()) for i in to_run]
    jobs, lost = [], set()
    if params:
        try:
            jobs = executor.map_array(launcher, *zip(*params))
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError,
                subprocess.CalledProcessError, OSError) as e:
            fail(refusal(e, launcher.params))
        lost = wait(jobs, [" ".join(filter_overrides(job_overrides[i])) for i in to_run])
    for i, job in zip(to_run, jobs):
        if job.job_id in lost:
            returns[i] = fault(launcher, job, list(job_overrides[i]), initial_job_idx + i, "cancelled",
                               f"Slurm job {job.job_id}: cancelled before it started (no accounting record)")
        else:
            returns[i] = returned(launcher, job, list(job_overrides[i]), initial_job_idx + i)
    return [returns[i] for i in range(len(job_overrides))]


def refusal(e: Exception, params: dict) -> str:
    """One line: what sbatch said, and the launcher setting that asked for it."""
    text = " ".join(str(getattr(e, "stderr", None) or e).split())
    said = re.findall(r"sbatch: error: (.+?)(?= sbatch:|$)", text)
    reason = (said[-1] if said else text[-300:]).removeprefix("Batch job submission failed: ")
    setting = next((s for pattern, s in REFUSALS if re.search(pattern, reason)), None)
    asked = f"hydra.launcher.{setting}={params.get(setting)}" if setting else "hydra.launcher"
    return f"{asked}: the Slurm cluster refused the sweep's jobs ({reason}); allowed: what its nodes have (sinfo -N -l)"


def returned(launcher, job, overrides: list[str], num: int) -> JobReturn:
    """The job's own JobReturn, or, for a job that ended without one, its point's fault row."""
    if job.paths.result_pickle.exists():
        try:
            return job.results()[0]
        except Exception as e:  # noqa: BLE001 - the job raised: its row says how
            return fault(launcher, job, overrides, num, "error", f"{type(e).__name__}: {_last_line(e)}")
    info = sacct(job.job_id)
    memory = _memory_kill(job)
    status = "out_of_memory" if memory else info["State"].split()[0].lower()
    error = (f"Slurm job {job.job_id} on {info['NodeList']}: {info['State']}, exit code {info['ExitCode']}"
             f"{_signal(info['ExitCode'])}{memory or ''}{_reason(info['Reason'])}, after {info['Elapsed']}; "
             f"log {job.paths.stderr}")
    return fault(launcher, job, overrides, num, status, error, node=info["NodeList"])


def fault(launcher, job, overrides: list[str], num: int, status: str, error: str,
          node: str | None = None) -> JobReturn:
    """Write the point's row, with the scheduler's verdict, where its job would have."""
    cfg, point, folder = _point(launcher, overrides, num)
    # measured nowhere: no device name (blank_row names this machine's), the node Slurm gave it
    row = {**blank_row(point), "status": status, "error": error, "slurm_job_id": job.job_id, "node": node,
           "gpu_name": None}
    write_row(folder, row)
    log.warning("slurm job %s: %s -> %s: %s", job.job_id, status, folder / "result.json", error)
    return _returning(cfg, overrides, folder, row)


def _point(launcher, overrides: list[str], num: int):
    """(the job's composed config, its resolved point as its node will run it, its folder)."""
    cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, overrides)
    with open_dict(cfg.hydra.job):
        cfg.hydra.job.num = num
    try:
        point = resolve(job_settings(cfg), OmegaConf.select(cfg, "hydra.runtime.choices.hydra/launcher"))
    except ConfigError as e:  # checked before submission; cannot differ here
        fail(str(e))
    return cfg, point, Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)


def _returning(cfg, overrides: list[str], folder: Path, row: dict) -> JobReturn:
    return JobReturn(overrides=overrides, cfg=cfg, hydra_cfg=cfg, working_dir=str(folder),
                     task_name=str(cfg.hydra.job.name), status=JobStatus.COMPLETED, _return_value=row)


def wait(jobs: list, names: list[str]) -> set[str]:
    """Until every job has ended: one sacct call a poll for all of them, one log line per job per
    change of its state. -> the ids of array tasks cancelled before they started (Slurm keeps no
    record of those, so submitit would wait for them forever: a task neither in sacct nor in the
    queue for MISSING_POLLS polls in a row)."""
    seen: dict[str, str] = {}
    missing: dict[str, int] = {}
    while True:
        jobs[0].watcher.update()  # every job's state, in one sacct call
        queued = _queued(jobs) if any(job.state == "UNKNOWN" for job in jobs) else set()
        for job, name in zip(jobs, names):
            state = job.state
            if state == "UNKNOWN":  # not in the accounting database (yet)
                missing[job.job_id] = 0 if job.job_id in queued else missing.get(job.job_id, 0) + 1
                state = "CANCELLED before it started" if missing[job.job_id] >= MISSING_POLLS else "SUBMITTED"
            if job.paths.result_pickle.exists() and state in ("RUNNING", "COMPLETING"):
                state = "FINISHED"  # its result is in; Slurm says COMPLETED a moment later
            if seen.get(job.job_id) != state:
                seen[job.job_id] = state
                log.info("slurm job %s: %s | %s", job.job_id, state, name)
        lost = {job_id for job_id, polls in missing.items() if polls >= MISSING_POLLS}
        if all(job.job_id in lost or job.done() for job in jobs):
            return lost
        time.sleep(POLL_S)


def _queued(jobs: list) -> set[str]:
    """The ids of our array tasks and jobs that slurmctld still holds (pending, running, or ended
    within its MinJobAge)."""
    arrays = sorted({job.job_id.split("_")[0] for job in jobs})
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i", "-j", ",".join(arrays)],
                         capture_output=True, text=True, timeout=60).stdout
    return set(out.split())


def sacct(job_id: str) -> dict:
    """sacct's account of a job (its allocation line): State, ExitCode, Reason, NodeList, Elapsed."""
    fields = ["State", "ExitCode", "Reason", "NodeList", "Elapsed"]
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", ",".join(fields)],
                         capture_output=True, text=True, timeout=60).stdout.strip().splitlines()
    return dict(zip(fields, out[0].split("|"))) if out else dict.fromkeys(fields, "unknown")


def _memory_kill(job) -> str | None:
    """', killed over its memory limit (<used> > <limit> bytes)' when slurmstepd's memory
    accounting killed the job (without cgroups sacct says FAILED or CANCELLED, and the job's stderr
    says why), else None."""
    try:
        text = Path(job.paths.stderr).read_text(errors="replace")
    except OSError:
        return None
    found = re.search(r"exceeded memory limit \((\d+) > (\d+)\)", text)
    return f", killed over its memory limit ({found.group(1)} > {found.group(2)} bytes)" if found else None


def _signal(exit_code: str) -> str:
    """', killed by signal 9 (SIGKILL)' for sacct's exit code '0:9' (code:signal), else ''."""
    number = int(exit_code.partition(":")[2] or 0) if exit_code.partition(":")[2].isdigit() else 0
    try:
        return f" (killed by signal {number}, {signal.Signals(number).name})" if number else ""
    except ValueError:
        return f" (killed by signal {number})"


def _reason(reason: str) -> str:
    """', reason <sacct's Reason>' when it says one (for an ended job it mostly says None)."""
    return f", reason {reason}" if reason and reason not in ("None", "unknown") else ""


def _last_line(e: Exception) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
