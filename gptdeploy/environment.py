"""What this machine has: the one GPU probe, the one table of install hints, and TensorRT's loading.

    missing("onnxruntime-cuda", "gpu")   -> [] when ort-cuda can run here, else one line per missing thing

Every "cannot run here" message of gptdeploy comes from REQUIREMENTS, so a missing library is
always named the same way, with the same install line. Checks are cheap and import nothing heavy:
GPUs are counted by asking the CUDA driver (libcuda), not torch; libraries are found, not imported,
except onnxruntime, whose execution providers can only be asked at import.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gptdeploy.errors import GptDeployError

TORCH_CPU = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
# The base install runs export folders (onnxruntime, numpy, tiktoken); loading checkpoints, exporting,
# optimizing and the torch runtime need the export extra.
EXPORT_EXTRA = "pip install 'gptdeploy[export]'"
EXPORT_MODULES = {"torch": "PyTorch", "onnx": "onnx", "onnxscript": "onnxscript", "onnx_ir": "onnx-ir",
                  "safetensors": "safetensors", "huggingface_hub": "huggingface_hub"}
GPU_EXTRA = "pip install 'gptdeploy[gpu]'"
TRT_EXTRA = "pip install 'gptdeploy[trt]' (TensorRT comes from NVIDIA's package index, pypi.nvidia.com)"
ORT_TRT_EXTRA = ("pip install 'gptdeploy[ort-trt]' (onnxruntime-gpu with the TensorRT 10 its TensorRT provider links; "
                 "TensorRT comes from NVIDIA's package index, pypi.nvidia.com)")


@functools.cache
def cuda_device_count() -> int:
    """GPUs the CUDA driver sees, asked of the driver itself (no torch, no CUDA toolkit needed)."""
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    for lib_name in names:
        try:
            lib = ctypes.CDLL(lib_name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def available_memory_bytes() -> int | None:
    """Memory the system can give a new allocation without swapping (Linux MemAvailable); None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def has_tensorrt() -> bool:
    """The real TensorRT Python bindings, not a package of type stubs or an unfinished install: the
    `tensorrt` package must hold its compiled extension module."""
    spec = importlib.util.find_spec("tensorrt")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(any(Path(location).glob(pattern)) for location in spec.submodule_search_locations
               for pattern in ("tensorrt*.so", "tensorrt*.pyd"))


@functools.cache
def ort_providers() -> tuple[str, ...]:
    import onnxruntime

    return tuple(onnxruntime.get_available_providers())


@dataclass(frozen=True)
class Requirement:
    present: Callable[[], bool]
    problem: str  # what is missing, with how to get it


REQUIREMENTS: dict[str, Requirement] = {
    "torch": Requirement(lambda: has_module("torch"),
                         f"PyTorch is not installed; install it: {EXPORT_EXTRA} (with {TORCH_CPU} first for a "
                         f"CPU-only build)"),
    "transformers": Requirement(lambda: has_module("transformers"),
                                "transformers is not installed; install it: pip install transformers"),
    "onnxruntime": Requirement(lambda: has_module("onnxruntime"),
                               "onnxruntime is not installed; install it: pip install onnxruntime"),
    "onnxruntime-cuda": Requirement(
        lambda: has_module("onnxruntime") and "CUDAExecutionProvider" in ort_providers(),
        f"this onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu is not installed); install it in place "
        f"of onnxruntime: pip uninstall -y onnxruntime && {GPU_EXTRA}"),
    "onnxruntime-trt": Requirement(
        lambda: has_module("onnxruntime") and "TensorrtExecutionProvider" in ort_providers(),
        f"this onnxruntime has no TensorrtExecutionProvider (onnxruntime-gpu is not installed); install it in "
        f"place of onnxruntime: pip uninstall -y onnxruntime && {ORT_TRT_EXTRA}"),
    "tensorrt": Requirement(has_tensorrt, f"TensorRT is not installed; install it: {TRT_EXTRA}"),
    "ctranslate2": Requirement(lambda: has_module("ctranslate2"),
                               "CTranslate2 is not installed; install it: pip install 'gptdeploy[ct2]'"),
    "llama-cpp": Requirement(lambda: has_module("llama_cpp") and has_module("gguf"),
                             "llama-cpp-python (and gguf) is not installed; install it: pip install "
                             "'gptdeploy[llama-cpp]' (llama-cpp-python compiles llama.cpp from source: half an "
                             "hour on 2 cores)"),
    "gpu": Requirement(lambda: cuda_device_count() > 0,
                       "no CUDA GPU is visible (no NVIDIA driver, or no device)"),
    "torch-cuda": Requirement(
        lambda: has_module("torch") and torch_sees_cuda(),
        "this PyTorch cannot use a CUDA GPU (a CPU-only build, or no GPU); the CUDA build: pip install torch"),
}


def torch_sees_cuda() -> bool:
    """Whether PyTorch can use a CUDA GPU: the one place gptdeploy asks torch (imported here, lazily)."""
    import torch

    return torch.cuda.is_available()


def export_extra_problem(error: ImportError) -> str | None:
    """What a failed import of one of the export extra's libraries means, or None for any other import."""
    name = (error.name or "").split(".")[0]
    if name not in EXPORT_MODULES:
        return None
    return (f"{EXPORT_MODULES[name]} is not installed (this is gptdeploy's base install, which runs export folders); "
            f"loading checkpoints, export and optimize need the export extra: {EXPORT_EXTRA}")


def missing(*requirements: str) -> list[str]:
    """One line per requirement this machine lacks, in the order given; empty when all are met."""
    return [REQUIREMENTS[r].problem for r in requirements if not REQUIREMENTS[r].present()]


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(compute capability such as "9.0", name such as "NVIDIA H200") of a CUDA device, asked of PyTorch."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}", torch.cuda.get_device_name(device)


def import_tensorrt():
    """The tensorrt module, or one GptDeployError naming everything TensorRT lacks here."""
    problems = missing("tensorrt", "gpu")
    if problems:
        raise GptDeployError("TensorRT cannot run here: " + "; ".join(problems))
    import tensorrt as trt

    return trt


def tensorrt_logger(trt):
    """A TensorRT logger that keeps errors for gptdeploy's error messages instead of printing them;
    warnings are printed when GPTDEPLOY_DEBUG is set."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.Severity.WARNING and os.environ.get("GPTDEPLOY_DEBUG"):
                print(f"TensorRT: {msg}", file=sys.stderr)

        def last_error(self) -> str:
            return self.errors[-1] if self.errors else "no reason given"

    return Logger()
