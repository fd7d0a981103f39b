"""The runtimes: their names, what each runs and needs, and a lazy factory for each.

    spec = require("ort")                       # or one GptDeployError naming everything missing here
    runner = spec.open(read_export("out/tiny"), OpenOptions(threads=2))

Adding a runtime is one module with a Runner subclass (its `open` classmethod builds it from what
it runs) plus one entry in RUNTIMES. Nothing is imported until a runtime is opened, so asking what
is available costs nothing; what each needs is checked through gptdeploy.environment, whose table
holds the one install hint for each missing thing. Opening a source that is not yet in the form a
runtime runs (a checkpoint for an ONNX runtime, an export without engines for trt) is the
application's: gptdeploy.app.sources.open_runner.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from gptdeploy.environment import missing
from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import NO_PAST, WITH_PAST
from gptdeploy.precision import CHECKPOINT, EXPORT
from gptdeploy.runtimes.base import OpenOptions, Runner


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    summary: str
    runs: str  # CHECKPOINT (the PyTorch model) or EXPORT (an export folder's ONNX graphs)
    requires: tuple[str, ...]  # keys of gptdeploy.environment.REQUIREMENTS
    factory: str  # "module:Class" of its Runner, imported on first use
    runs_variants: bool = False  # whether it runs an export's ONNX Runtime variants
    needs_engines: bool = False  # whether it runs the export's TensorRT engines (built before it opens)
    gpu: bool = False
    graphs: tuple[str, ...] = (WITH_PAST,)  # the export's graphs it reads (the files verified before it opens)

    def missing(self) -> list[str]:
        """What this machine lacks to run it, one line per thing; empty when it can run."""
        return missing(*self.requires)

    def runner_class(self) -> type[Runner]:
        module, _, name = self.factory.partition(":")
        return getattr(importlib.import_module(module), name)

    def open(self, target, options: OpenOptions = OpenOptions()) -> Runner:
        return self.runner_class().open(target, options)


RUNTIMES: dict[str, RuntimeSpec] = {
    spec.name: spec
    for spec in [
        RuntimeSpec("torch", "the PyTorch reference model, CPU or CUDA, fp32/fp16/bf16", CHECKPOINT, ("torch",),
                    "gptdeploy.runtimes.torch_runner:TorchRunner"),
        RuntimeSpec("hf", "Hugging Face transformers' GPT2LMHeadModel on the same weights, its own KV cache "
                    "(the baseline)", CHECKPOINT, ("torch", "transformers"), "gptdeploy.runtimes.hf:HfRunner"),
        RuntimeSpec("ort", "ONNX Runtime, CPUExecutionProvider", EXPORT, ("onnxruntime",),
                    "gptdeploy.runtimes.ort:OrtRunner", runs_variants=True),
        RuntimeSpec("ort-cuda", "ONNX Runtime, CUDAExecutionProvider, KV cache kept on the GPU", EXPORT,
                    ("onnxruntime-cuda", "gpu"), "gptdeploy.runtimes.ort:OrtCudaRunner", runs_variants=True, gpu=True),
        RuntimeSpec("trt", "TensorRT engines built from the export, KV cache kept on the GPU", EXPORT,
                    ("tensorrt", "gpu", "torch-cuda"), "gptdeploy.runtimes.trt:TrtRunner", needs_engines=True,
                    gpu=True, graphs=(NO_PAST, WITH_PAST)),
        RuntimeSpec("ort-trt", "ONNX Runtime, TensorrtExecutionProvider (CUDA fallback)", EXPORT,
                    ("onnxruntime-trt", "tensorrt", "gpu"), "gptdeploy.runtimes.ort_trt:OrtTrtRunner", gpu=True,
                    graphs=(NO_PAST, WITH_PAST)),
    ]
}


@dataclass(frozen=True)
class PeerSpec:
    """An engine users would pick instead of gptdeploy, measured beside the runtimes by `gptdeploy bench`
    (a baseline, not a Runner: see gptdeploy.runtimes.peers). `types`: the weight types its files are
    made in (bench names one as ENGINE:TYPE), the first the default."""
    name: str
    summary: str
    requires: tuple[str, ...]
    factory: str  # "module:Class" of its PeerEngine
    types: tuple[str, ...]
    device: str = "cpu"

    def missing(self) -> list[str]:
        return missing(*self.requires)

    def engine_class(self):
        module, _, name = self.factory.partition(":")
        return getattr(importlib.import_module(module), name)


PEERS: dict[str, PeerSpec] = {
    spec.name: spec
    for spec in [
        PeerSpec("ct2", "CTranslate2's Generator, converted by its transformers converter (bench baseline)",
                 ("ctranslate2", "transformers", "torch"), "gptdeploy.runtimes.peers:Ct2Engine",
                 ("float32", "int8", "int8_float32", "bfloat16", "int8_bfloat16")),
        PeerSpec("llama.cpp", "llama.cpp through llama-cpp-python, GGUF in llama.cpp's GPT-2 layout, quantized by "
                 "llama.cpp (bench baseline)", ("llama-cpp", "torch"), "gptdeploy.runtimes.peers:LlamaCppEngine",
                 ("f32", "f16", "q8_0", "q4_0")),
    ]
}


def spec_of(name: str) -> RuntimeSpec:
    """The runtime's spec; one GptDeployError for an unknown name."""
    if name in PEERS:
        raise GptDeployError(f"{name} is another engine, measured beside gptdeploy's runtimes by gptdeploy bench "
                             f"only; choose one of {', '.join(RUNTIMES)}")
    if name not in RUNTIMES:
        raise GptDeployError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def unavailable_reason(name: str) -> str | None:
    """Why runtime `name` cannot run here, as one line naming everything missing; None when it can."""
    problems = spec_of(name).missing()
    return "; ".join(problems) if problems else None


def require(name: str) -> RuntimeSpec:
    """The runtime's spec, or one GptDeployError saying everything it lacks here."""
    spec = spec_of(name)
    if reason := unavailable_reason(name):
        raise GptDeployError(f"runtime {name!r} cannot run on this machine: {reason}")
    return spec
