"""Runtime names, what each needs on this machine, and opening a runner for a model source.

    runner, tokenizer = open_runner("ort", "out/tiny")        # an export folder
    runner, tokenizer = open_runner("torch", "gpt2")          # anything gptdeploy.load takes
    runner, tokenizer = open_runner("ort", "gpt2")            # exported once into the export cache
    runner, tokenizer = open_runner("ort", "gpt2", variant="q4")   # + its ONNX Runtime variant, made once

Asking for a runtime this machine cannot run raises GptDeployError with one line: what is missing
and how to install it. A new runtime is a Runner subclass in its own module plus one entry in RUNTIMES.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import is_export_folder, read_export
from gptdeploy.tokenizer import Tokenizer
from runtimes.base import Runner

GPU_EXTRA = "pip install 'gptdeploy[gpu]'"
TRT_EXTRA = "pip install 'gptdeploy[trt]' (TensorRT comes from NVIDIA's package index, pypi.nvidia.com)"
CHECKPOINT, EXPORT = "checkpoint", "export folder"  # what a runtime runs


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    summary: str
    runs: str  # CHECKPOINT (the torch model) or EXPORT (the ONNX graphs)
    missing: Callable[[], str | None]  # what this machine lacks, with how to install it; None: ready
    implemented: bool = True


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _ort_providers() -> list[str]:
    import onnxruntime

    return onnxruntime.get_available_providers()


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


def _missing_torch() -> str | None:
    return None if _has_module("torch") else "PyTorch is not installed; install it: pip install torch"


def _missing_transformers() -> str | None:
    if not _has_module("transformers"):
        return "transformers is not installed; install it: pip install transformers"
    return _missing_torch()


def _missing_ort() -> str | None:
    if not _has_module("onnxruntime"):
        return "onnxruntime is not installed; install it: pip install onnxruntime"
    return None


def _missing_gpu() -> str | None:
    return None if cuda_device_count() > 0 else "no CUDA GPU is visible (no NVIDIA driver, or no device)"


def _missing_ort_cuda() -> str | None:
    if not _has_module("onnxruntime"):
        return f"onnxruntime-gpu is not installed; install it: {GPU_EXTRA}"
    if "CUDAExecutionProvider" not in _ort_providers():
        return (f"this onnxruntime has no CUDAExecutionProvider (it is the CPU build); install onnxruntime-gpu "
                f"in its place: pip uninstall -y onnxruntime && {GPU_EXTRA}")
    return _missing_gpu()


def _missing_trt() -> str | None:
    if not _has_module("tensorrt"):
        return f"TensorRT is not installed; install it: {TRT_EXTRA}"
    return _missing_gpu()


def _missing_ort_trt() -> str | None:
    if not _has_module("onnxruntime") or "TensorrtExecutionProvider" not in _ort_providers():
        return (f"this onnxruntime has no TensorrtExecutionProvider; install onnxruntime-gpu and TensorRT: "
                f"pip uninstall -y onnxruntime && {TRT_EXTRA}")
    return _missing_trt()


RUNTIMES: dict[str, RuntimeSpec] = {
    spec.name: spec
    for spec in [
        RuntimeSpec("torch", "the PyTorch reference model, CPU or CUDA, fp32/fp16/bf16", CHECKPOINT, _missing_torch),
        RuntimeSpec("hf", "Hugging Face transformers' GPT2LMHeadModel on the same weights, its own KV cache "
                    "(the baseline)", CHECKPOINT, _missing_transformers),
        RuntimeSpec("ort", "ONNX Runtime, CPUExecutionProvider", EXPORT, _missing_ort),
        RuntimeSpec("ort-cuda", "ONNX Runtime, CUDAExecutionProvider, KV cache kept on the GPU", EXPORT,
                    _missing_ort_cuda),
        RuntimeSpec("trt", "TensorRT engines built from the export, KV cache kept on the GPU", EXPORT, _missing_trt),
        RuntimeSpec("ort-trt", "ONNX Runtime, TensorrtExecutionProvider (CUDA fallback)", EXPORT, _missing_ort_trt),
    ]
}


def require(name: str) -> RuntimeSpec:
    """The runtime's spec, or one GptDeployError saying why it cannot run here."""
    if name not in RUNTIMES:
        raise GptDeployError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    spec = RUNTIMES[name]
    missing = spec.missing()
    if missing:
        raise GptDeployError(f"runtime {name!r} is not available on this machine: {missing}")
    if not spec.implemented:
        raise GptDeployError(f"runtime {name!r} is not implemented in this version of gptdeploy")
    return spec


def open_runner(
    name: str,
    source: str | Path,
    *,
    precision: str | None = None,
    device: str | None = None,
    session_config=None,
    weights: str | None = None,
    weights_seed: int = 0,
    progress: bool = True,
    variant: str | None = None,
) -> tuple[Runner, Tokenizer]:
    """A runner of runtime `name` for `source`, and the model's tokenizer.

    source: an export folder, or anything gptdeploy.load takes (with weights="random" and
        weights_seed for a preset's architecture with random weights).
    precision: torch: fp32 (default), fp16 or bf16. ONNX runtimes: an export folder's own precision
        (asking for another is an error); a checkpoint is exported in it (fp32 default, or fp16);
        int8, int4 (q4) and fp32-fused stand for those variants, and fp16 for an fp32 export's fp16
        variant.
    variant: ort and ort-cuda: an ONNX Runtime variant of the export (gptdeploy.export_folder.VARIANTS).
        A checkpoint's export in the export cache gets it made (and validated) once.
    device: torch: "cpu" (default), "cuda", "cuda:1", ...; ort-cuda: "cuda:N" picks the GPU.
    session_config: runtimes.ort.SessionConfig for the ONNX Runtime runners.
    """
    spec = require(name)
    variant = _variant(name, source, precision, variant)
    if spec.runs == CHECKPOINT:
        runner, tokenizer = _open_torch(source, precision, device, weights, weights_seed)
        if name == "hf":  # transformers' GPT-2 on the reference model's weights
            from runtimes.hf import HfRunner

            runner = HfRunner.from_gpt(runner.model)
        return runner, tokenizer
    if is_export_folder(Path(source)):
        folder = read_export(source)
        if variant is None and precision not in (None, folder.precision):
            raise GptDeployError(f"{source} is a {folder.precision} export; it cannot run in {precision} "
                                 f"(export the checkpoint again with precision {precision})")
    else:
        from gptdeploy.export_cache import cached_export
        from gptdeploy.loading import load

        loaded = load(source, weights=weights, seed=weights_seed)
        folder = read_export(cached_export(loaded, "fp32" if variant else precision or "fp32", progress=progress))
        if variant is not None:  # made once in the cached export, validated against the checkpoint
            from exporters.ort_optimize import ensure_variants

            folder = ensure_variants(folder.path, [variant], reference=loaded.model, progress=progress)
    return _open_ort(name, folder, device, session_config, variant), folder.tokenizer()


def _variant(name: str, source, precision: str | None, variant: str | None) -> str | None:
    """The ONNX Runtime variant that `variant` or `precision` asks for; None: the export's own graph."""
    from gptdeploy.export_folder import VARIANT_OF_PRECISION, VARIANTS

    named = VARIANT_OF_PRECISION.get(precision)
    if variant is None and named is None and precision == "fp16" and is_export_folder(Path(source)):
        folder = read_export(source)  # an fp32 export runs in fp16 through its fp16 variant, if it has one
        named = "fp16" if folder.precision == "fp32" and "fp16" in folder.variants else None
    variant = variant or named
    if variant is None:
        return None
    if variant not in VARIANTS:
        raise GptDeployError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if precision not in (None, VARIANTS[variant].precision) and named != variant:
        raise GptDeployError(f"variant {variant} runs in {VARIANTS[variant].precision}, not {precision}")
    if name not in ("ort", "ort-cuda"):
        raise GptDeployError(f"variants are ONNX Runtime graphs: the {name} runtime cannot run variant {variant} "
                             f"(use --runtime ort, or ort-cuda for fp16)")
    return variant


def _open_torch(source, precision, device, weights, weights_seed):
    if is_export_folder(Path(source)):
        exported_from = read_export(source).manifest.get("source", {}).get("source", "its checkpoint")
        raise GptDeployError(f"the torch runtime runs a checkpoint, and {source} is an export folder (ONNX "
                             f"graphs, no torch weights); pass the checkpoint or preset it was exported from "
                             f"({exported_from})")
    import torch

    from gptdeploy.loading import load
    from runtimes.torch_runner import TorchRunner

    device = device or "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GptDeployError(f"device {device!r}: this PyTorch ({torch.__version__}) sees no CUDA GPU")
    loaded = load(source, weights=weights, seed=weights_seed, dtype=precision or "fp32", device=device)
    return TorchRunner(loaded.model), loaded.tokenizer


def _open_ort(name, folder, device, session_config, variant=None):
    from runtimes.ort import OrtCudaRunner, OrtRunner, SessionConfig

    session_config = session_config or SessionConfig()
    if name == "ort":
        if device not in (None, "cpu"):
            raise GptDeployError(f"the ort runtime runs on the CPU; for {device!r} use --runtime ort-cuda")
        return OrtRunner(folder, session_config, variant=variant)
    device = device or "cuda:0"
    if device == "cuda":
        device = "cuda:0"
    if not device.startswith("cuda:") or not device[5:].isdigit():
        raise GptDeployError(f"device {device!r}: {name} takes cuda or cuda:N")
    if name == "trt":
        from runtimes.trt import TrtRunner

        return TrtRunner(folder, device_id=int(device[5:]))
    if name == "ort-trt":
        from runtimes.ort_trt import OrtTrtRunner

        return OrtTrtRunner(folder, session_config, device_id=int(device[5:]))
    return OrtCudaRunner(folder, session_config, device_id=int(device[5:]), variant=variant)
