"""The `ort-trt` runtime: ONNX Runtime's TensorrtExecutionProvider, a second TensorRT path to compare
with `trt` (gptdeploy's own engines).

Like `trt`, it runs the prompt through the no-past graph (onnx/decoder_model.onnx) and every later
step through the with-past graph (onnx/model.onnx), each with an explicit shape profile, because
TensorRT handles the zero-length past of a first step poorly. Nodes TensorRT cannot take fall back
to CUDAExecutionProvider. ONNX Runtime keeps its engines and timing cache in the export folder under
trt/ort/, so only the first session creation builds them. The KV cache stays on the GPU through IO
binding, as with ort-cuda.

Differences from `trt`: ONNX Runtime builds the engines with its own flags. Precision comes from the
graph's types, as with `trt`: trt_fp16_enable is not set (it asks TensorRT for a weakly typed
network, which TensorRT 11 removed, and would let TensorRT 10 pick fp16 kernels where the fp16 export
keeps fp32). TensorRT's default TF32 stays on for fp32 graphs, so fp32 results differ from the
reference by more than with `trt`, which disables TF32.

The provider is a library of onnxruntime-gpu's that links one TensorRT major version (libnvinfer.so.10
for onnxruntime-gpu 1.18 to 1.31 at least) and one CUDA runtime; where it cannot load, ONNX Runtime
falls back to CUDA with only a log line. The runner refuses that fallback and names the library the
provider could not find.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from gptdeploy.engines import EngineSettings, make_settings, profile_shapes, recorded_settings
from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import DECODE, ENGINE_DIR, ENGINE_GRAPHS, INPUTS, PREFILL, ExportFolder, read_export
from gptdeploy.runtimes.base import OpenOptions, StepOutput
from gptdeploy.runtimes.ort import OrtCache, OrtCudaRunner, OrtRunner, SessionConfig

ORT_CACHE_DIR = f"{ENGINE_DIR}/ort"
PROFILE_POINTS = ("min", "opt", "max")


PROVIDER_LIBRARY = "libonnxruntime_providers_tensorrt.so"


def provider_problem(library: Path | None = None) -> str:
    """Why ONNX Runtime's TensorRT provider library does not load, in the dynamic loader's words (which name
    the missing library, such as libnvinfer.so.10); or that it does load."""
    import ctypes

    library = library or Path(ort.__file__).parent / "capi" / PROVIDER_LIBRARY
    if not library.is_file():
        return f"{library.name} is not in this onnxruntime (the CPU build?)"
    try:
        ctypes.CDLL(str(library))
    except OSError as e:
        return f"{library.name} cannot load: {e}"
    return f"{library.name} loads, but the provider did not start (GPTDEPLOY_DEBUG=1 and ONNX Runtime's log say why)"


def profile_options(shapes: dict[str, tuple[tuple[int, ...], ...]]) -> dict[str, str]:
    """ONNX Runtime's trt_profile_{min,opt,max}_shapes options: "input_ids:1x1,attention_mask:1x2,..."."""
    return {
        f"trt_profile_{point}_shapes": ",".join(f"{name}:{'x'.join(map(str, shape[k]))}" for name, shape in shapes.items())
        for k, point in enumerate(PROFILE_POINTS)
    }


def provider_options(shapes, *, device_id: int, cache_dir: Path, workspace_gib: float) -> dict:
    """TensorrtExecutionProvider's options for one graph."""
    return {
        "device_id": device_id,
        "trt_max_workspace_size": int(workspace_gib * 2**30),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        **profile_options(shapes),
    }


class OrtTrtRunner(OrtCudaRunner):
    """ONNX Runtime with TensorrtExecutionProvider (then CUDA, then CPU for what is left)."""

    name = "ort-trt"
    provider = "TensorrtExecutionProvider"

    def __init__(self, folder: ExportFolder | str | Path, session_config: SessionConfig = SessionConfig(),
                 device_id: int = 0, settings: EngineSettings | None = None):
        folder = folder if isinstance(folder, ExportFolder) else read_export(folder)
        self.settings = settings or recorded_settings(folder) or make_settings(folder.config["block_size"])
        self.cache_dir = folder.path / ORT_CACHE_DIR
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GptDeployError(f"cannot create ONNX Runtime's TensorRT engine cache {self.cache_dir}: {e}") from None
        if not os.access(self.cache_dir, os.W_OK):
            raise GptDeployError(f"ONNX Runtime's TensorRT engine cache {self.cache_dir} is not writable")
        super().__init__(folder, session_config, device_id)  # the decode session, on the with-past graph
        self.prefill_session = ort.InferenceSession(
            str(folder.graph_path(ENGINE_GRAPHS[PREFILL])), self.session_config.session_options(),
            providers=self._providers(PREFILL),
        )
        self._check_provider(self.prefill_session)

    @classmethod
    def open(cls, target: ExportFolder, options: OpenOptions = OpenOptions()) -> OrtTrtRunner:
        if options.variant is not None:
            raise GptDeployError(f"the {cls.name} runtime runs the export's own graphs, not variant {options.variant}")
        return cls(target, SessionConfig.of(options), device_id=options.cuda_index(cls.name))

    def _providers(self, engine: str = DECODE) -> list:
        shapes = profile_shapes(self.folder.manifest["graphs"][ENGINE_GRAPHS[engine]], engine, self.settings)
        options = provider_options(shapes, device_id=self.device_id, cache_dir=self.cache_dir,
                                   workspace_gib=self.settings.workspace_gib)
        return [(self.provider, options), ("CUDAExecutionProvider", {"device_id": self.device_id}),
                "CPUExecutionProvider"]

    def _check_session(self) -> None:
        self._check_provider(self.session)
        OrtRunner._check_session(self)  # the IO contract

    def _check_provider(self, session) -> None:
        # ONNX Runtime falls back to CUDA or the CPU, with only a log line, when TensorRT cannot start.
        if session.get_providers()[0] != self.provider:
            raise GptDeployError(f"onnxruntime {ort.__version__} could not start TensorrtExecutionProvider on GPU "
                                 f"{self.device_id}: {provider_problem()}; it offered {session.get_providers()}")

    def describe(self) -> str:
        return f"{self.name} (TensorrtExecutionProvider, {self.precision}, engines in {self.cache_dir})"

    def _step(self, input_ids, attention_mask, position_ids, cache: OrtCache, last_only) -> StepOutput:
        if cache.length:
            return super()._step(input_ids, attention_mask, position_ids, cache, last_only)
        binding = self.prefill_session.io_binding()
        for name, array in zip(INPUTS, (input_ids, attention_mask, position_ids)):
            binding.bind_cpu_input(name, array)
        binding.bind_output("logits", "cpu")  # get_outputs() returns outputs in the order they were bound
        for name in self._present_names:
            binding.bind_output(name, self.device_type, self.device_id)
        self.prefill_session.run_with_iobinding(binding)
        logits, *presents = binding.get_outputs()
        logits = logits.numpy()
        return StepOutput(logits[:, -1:] if last_only else logits, OrtCache(tuple(presents), input_ids.shape[1]))

    def close(self) -> None:
        self.prefill_session = None
        super().close()
