"""Environment columns of a result row, and what NVML says about the GPU."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


@functools.cache
def _static() -> dict:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:  # CPU-only: name the processor, so reference rows say what they ran on
        name = "CPU: " + (_cpu_model() or platform.machine())
    return {"gpu_name": name, "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda, "git_sha": _git_sha()}


def info() -> dict:
    return {**_static(), "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}


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
    """NVML's handle for the current CUDA device (matched by UUID, so CUDA_VISIBLE_DEVICES and
    NVML's own numbering cannot disagree), or None without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID("GPU-" + uuid if not uuid.startswith("GPU-") else uuid)
    except Exception:  # no NVML, no driver, or an unknown UUID: the NVML columns stay empty
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


# -- the machine's measured limits: what bandwidth_utilization divides by ------------------------

def _best_seconds(fn, sync, repeats: int) -> float:
    """The fastest of `repeats` timed calls of fn after one untimed call (warm caches, clocks)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def copy_bytes_per_s(device: str) -> float | None:
    """Measured memory bandwidth, bytes moved (read + written) per second by the best of a few
    large copies: device-to-device on CUDA (2 x 512 MiB, far past any L2), memcpy on CPU
    (2 x 256 MiB). Measured once per process; None if the buffers do not fit."""
    nbytes = (512 if device == "cuda" else 256) * 2**20
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    src = dst = None
    try:
        src = torch.ones(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        seconds = _best_seconds(lambda: dst.copy_(src), sync, repeats=5)
    except (torch.OutOfMemoryError, RuntimeError):
        return None
    finally:
        src = dst = None
        if device == "cuda":
            torch.cuda.empty_cache()  # leave the allocator's pool as the point will find it
    return 2 * nbytes / seconds


@functools.cache
def matmul_flops_per_s(device: str, dtype: str) -> float | None:
    """Measured matrix-multiply rate in `dtype`: the best of a few square products (8192 on CUDA,
    1024 on CPU), 2 n^3 flops each. Measured once per process and dtype."""
    n = 8192 if device == "cuda" else 1024
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a = b = None
    try:
        a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
        b = torch.randn(n, n, device=device).to(a.dtype)
        seconds = _best_seconds(lambda: a @ b, sync, repeats=5)
    except (torch.OutOfMemoryError, RuntimeError):
        return None
    finally:
        a = b = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return 2 * n**3 / seconds


def limits(device: str, dtype: str) -> dict:
    """The environment columns copy_bytes_per_s and matmul_flops_per_s."""
    return {"copy_bytes_per_s": copy_bytes_per_s(device), "matmul_flops_per_s": matmul_flops_per_s(device, dtype)}
