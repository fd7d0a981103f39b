"""What a benchmark needs to know about the machine it runs on, and measures of it.

- describe_machine(), library_versions(): what a report records so its numbers can be compared.
- measure_read_bandwidth(): the memory read bandwidth, the ceiling of a bandwidth-bound decode step.
- ResidentMemory: the process's resident memory, now and at its peak, with the peak resettable (on
  Linux) so that each phase of a run gets its own.
- GpuMemoryMonitor: the GPU memory this process holds and its peak, through NVML, whatever allocated it.

Needs numpy only; no torch, nothing imported that a measurement would then carry around.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

LIBRARIES = ("gptdeploy", "numpy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "transformers", "tensorrt")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    """Cores, not hardware threads: distinct (package, core) pairs in /proc/cpuinfo, else os.cpu_count()."""
    try:
        pairs, package = set(), None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                package = value.strip()
            elif key.strip() == "core id":
                pairs.add((package, value.strip()))
        if pairs:
            return len(pairs)
    except OSError:
        pass
    return os.cpu_count() or 1


def _memory_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def gpus() -> list[dict]:
    """The NVIDIA GPUs nvidia-smi lists (name, memory, driver); empty without a driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = [[field.strip() for field in line.split(",")] for line in out.stdout.splitlines() if line.strip()]
    return [{"name": r[0], "memory": r[1], "driver": r[2]} for r in rows if len(r) == 3]


def describe_machine() -> dict:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,  # what this process may run on (containers and taskset limit it)
        "memory_gib": _memory_total_gib(),
        "gpus": gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a measurement depends on (read from metadata, not imported)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews every timing."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def measure_read_bandwidth(size_mib: int = 512, repeats: int = 7, threads: int | None = None) -> dict:
    """Memory read bandwidth in GB/s (1e9 bytes/s): the best of two read kernels, each best of `repeats`.

    A float32 array of size_mib, far beyond the caches, is read by
    - "max": numpy's max-reduction, one chunk per thread (numpy releases the GIL in reductions);
    - "gemv": a matrix-vector product through numpy's BLAS, the access pattern of a decode step's
      matrix products (every weight read once per token).
    """
    threads = threads or physical_cores()
    data = np.ones(size_mib * 2**20 // 4, dtype=np.float32)  # ones, not empty: the pages must be resident
    chunks = np.array_split(data, threads)
    matrix, vector = data.reshape(-1, 4096), np.ones(4096, dtype=np.float32)

    def best_gb_per_s(read) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
        return data.nbytes / best / 1e9

    with ThreadPoolExecutor(threads) as pool:
        kernels = {
            "max": best_gb_per_s(lambda: list(pool.map(np.max, chunks))),
            "gemv": best_gb_per_s(lambda: matrix @ vector),
        }
    kernel = max(kernels, key=kernels.get)
    return {"gb_per_s": round(kernels[kernel], 2), "kernel": kernel,
            "kernels_gb_per_s": {k: round(v, 2) for k, v in kernels.items()},
            "array_mib": size_mib, "repeats": repeats, "threads": threads}


class ResidentMemory:
    """This process's resident set (RSS), in MB (1e6 bytes), now and at its peak.

    On Linux the peak (VmHWM) can be reset (/proc/self/clear_refs), so each phase of a run has its own
    peak; elsewhere the peak is the whole process's (getrusage) and `resettable` is False.
    """

    def __init__(self):
        self._status = Path("/proc/self/status")
        self.resettable = self._status.exists() and self._try_reset()

    @staticmethod
    def _try_reset() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
            return True
        except OSError:
            return False

    def _status_kib(self, field: str) -> int | None:
        try:
            for line in self._status.read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return None

    def reset_peak(self) -> None:
        if self.resettable:
            self._try_reset()

    def current_mb(self) -> float | None:
        kib = self._status_kib("VmRSS")
        return None if kib is None else round(kib * 1024 / 1e6, 1)

    def peak_mb(self) -> float:
        kib = self._status_kib("VmHWM") if self.resettable else None
        if kib is None:  # ru_maxrss: KiB on Linux, bytes on macOS
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            kib = maxrss / 1024 if sys.platform == "darwin" else maxrss
        return round(kib * 1024 / 1e6, 1)


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class GpuMemoryMonitor:
    """The GPU memory this process holds, and its peak, from NVML (so every allocator counts: PyTorch's,
    ONNX Runtime's, TensorRT's).

    NVML reports what the whole device uses, every process included. The monitor samples it (every
    `interval` seconds) only while this process works, inside `with monitor:`, and counts as this
    process's what the device holds beyond the others' share at the start of that block (the device's
    use then, minus what this process held). This is exact while no other process allocates or frees
    GPU memory during the block, as with gptdeploy bench's workers, which take turns; another user of
    the GPU at the same time would be counted too. available is False without an NVIDIA driver.
    """

    def __init__(self, cuda_index: int = 0, interval: float = 0.005):
        self.interval = interval
        self.held = self.peak = 0  # bytes this process holds now, and its peak since reset_peak()
        self._lib = self._handle = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._others = self._sampled = 0
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            handle = ctypes.c_void_p()
            if lib.nvmlInit_v2() == 0 and lib.nvmlDeviceGetHandleByIndex_v2(
                    self._nvml_index(cuda_index), ctypes.byref(handle)) == 0:
                self._lib, self._handle = lib, handle
        except (OSError, AttributeError):
            pass

    @staticmethod
    def _nvml_index(cuda_index: int) -> int:
        """NVML counts every GPU; CUDA only the visible ones (CUDA_VISIBLE_DEVICES as indices)."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if ids and all(v.isdigit() for v in ids) and cuda_index < len(ids):
            return int(ids[cuda_index])
        return cuda_index

    @property
    def available(self) -> bool:
        return self._handle is not None

    def _used(self) -> int:
        info = _NvmlMemory()
        self._lib.nvmlDeviceGetMemoryInfo(self._handle, ctypes.byref(info))
        return info.used

    def __enter__(self):
        if self.available:
            self._sampled = used = self._used()
            self._others = used - self.held
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._sampled = max(self._sampled, self._used())

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            used = self._used()
            self.held = max(used - self._others, 0)
            self.peak = max(self.peak, self._sampled - self._others, self.held)
        return False

    def peak_mb(self) -> float | None:
        """The peak this process held since reset_peak() (or creation), in MB; None without NVML."""
        return round(self.peak / 1e6, 1) if self.available else None

    def reset_peak(self) -> None:
        self.peak = self.held
