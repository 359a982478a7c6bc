"""Environment columns of a result row, and what NVML says about the GPU."""

from __future__ import annotations

import functools
import math
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch


@functools.cache
def _static(device: str) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:  # a CPU run, even on a machine with a GPU: name the processor it ran on
        name = "CPU: " + (_cpu_model() or platform.machine())
    return {"gpu_name": name, "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda, "git_sha": _git_sha()}


def info(device: str = "cpu") -> dict:
    """The environment columns of a row measured on `device` (cpu | cuda)."""
    return {**_static(device), "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "node": os.environ.get("SLURMD_NODENAME") or platform.node(), "slurm_job_id": slurm_job_id()}


def slurm_job_id() -> str | None:
    """The Slurm job running this process as sacct names it (`<array job>_<task>` for an array
    task, as submitit submits a sweep), or None outside Slurm."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"],
                             cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def pynvml_error() -> type[Exception]:
    """pynvml.NVMLError, the base of every NVML failure; ImportError stands in without pynvml."""
    try:
        import pynvml
    except ImportError:
        return ImportError
    return pynvml.NVMLError


@functools.cache
def _nvml_handle():
    """NVML's handle for the current CUDA device, matched by UUID (so CUDA_VISIBLE_DEVICES and
    NVML's own numbering cannot disagree), or None without a driver. torch gives the UUID without
    its prefix: NVML names a whole GPU "GPU-<uuid>" and a MIG slice "MIG-<uuid>"."""
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    except Exception:  # no NVML, no driver: the NVML columns stay empty
        return None
    bare = uuid.removeprefix("GPU-").removeprefix("MIG-")
    for name in dict.fromkeys([uuid, "GPU-" + bare, "MIG-" + bare]):
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(name)
        except Exception:  # not this form of the UUID
            continue
    return None


def nvml_used_bytes() -> tuple[int | None, str | None]:
    """(bytes, "process") for this process, or (bytes, "device") for the whole GPU when NVML
    does not list our pid (a container's pid namespace), or (None, None) without NVML or when a
    query fails (unsupported in some containers, a driver older than nvidia-ml-py): the NVML
    columns stay empty and the point keeps its other numbers."""
    handle = _nvml_handle()
    if handle is None:
        return None, None
    try:
        import pynvml

        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory:
                return int(proc.usedGpuMemory), "process"
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used), "device"
    except (ImportError, pynvml_error()):
        return None, None


@functools.cache
def peak_bandwidth_bytes_per_s() -> float | None:
    """The GPU's theoretical memory bandwidth: 2 transfers per clock x max memory clock x bus
    width. None on CPU or without NVML."""
    handle = _nvml_handle() if torch.cuda.is_available() else None
    if handle is None:
        return None
    try:
        import pynvml

        mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
    except (ImportError, pynvml_error()):
        return None
    return 2 * mhz * 1e6 * bus_bits / 8


# -- the machine's measured limits: what bandwidth_utilization divides by -------------------------

SAMPLE_S = 0.02  # each timed sample runs the work enough times to take at least this long


def _best_seconds(fn, device: str, samples: int = 5) -> float:
    """Seconds of one call of fn: the best of `samples` timed samples, each repeating fn enough
    times to last SAMPLE_S (a single large copy on a GPU is a fraction of a millisecond, too short
    to time on its own), after an untimed call (warm caches, clocks). Timed with CUDA events on a
    GPU, perf_counter on CPU (models/runtime.StepTimer)."""
    from models.runtime import StepTimer

    def timed(repeats: int) -> float:
        timer = StepTimer(device)
        timer.mark()
        for _ in range(repeats):
            fn()
        timer.mark()
        return timer.intervals()[0] / repeats

    fn()
    repeats = max(1, math.ceil(SAMPLE_S / max(timed(1), 1e-9)))
    return min(timed(repeats) for _ in range(samples))


@functools.cache
def copy_bytes_per_s(device: str) -> float | None:
    """Measured memory bandwidth, bytes moved (read + written) per second by large copies:
    device-to-device on CUDA (2 x 512 MiB, far past any L2), memcpy on CPU (2 x 256 MiB).
    Measured once per process; None if the buffers do not fit."""
    nbytes = (512 if device == "cuda" else 256) * 2**20
    src = dst = None
    try:
        src = torch.ones(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        seconds = _best_seconds(lambda: dst.copy_(src), device)
    except (torch.OutOfMemoryError, RuntimeError):
        return None
    finally:
        src = dst = None
        if device == "cuda":
            torch.cuda.empty_cache()  # leave the allocator's pool as the point will find it
    return 2 * nbytes / seconds


@functools.cache
def matmul_flops_per_s(device: str, dtype: str) -> float | None:
    """Measured matrix-multiply rate in `dtype`: square products (8192 on CUDA, 1024 on CPU),
    2 n^3 flops each. Measured once per process and dtype."""
    n = 8192 if device == "cuda" else 1024
    a = b = None
    try:
        a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
        b = torch.randn(n, n, device=device).to(a.dtype)
        seconds = _best_seconds(lambda: a @ b, device)
    except (torch.OutOfMemoryError, RuntimeError):
        return None
    finally:
        a = b = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return 2 * n**3 / seconds


def limits(device: str, dtype: str) -> dict:
    """The environment columns copy_bytes_per_s and matmul_flops_per_s (measured), and the GPU's
    theoretical bandwidth device_bandwidth_bytes_per_s (NVML; empty on CPU)."""
    return {"copy_bytes_per_s": copy_bytes_per_s(device), "matmul_flops_per_s": matmul_flops_per_s(device, dtype),
            "device_bandwidth_bytes_per_s": peak_bandwidth_bytes_per_s() if device == "cuda" else None}
