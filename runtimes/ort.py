"""The `ort` and `ort-cuda` runtimes: ONNX Runtime on an exported folder's decoder with KV cache.

Both run onnx/model.onnx (model_fp16.onnx for fp16 exports) through IO binding: the inputs of a step
are bound from host arrays, the present keys/values of one step are bound, as they are, as the past
of the next, and ONNX Runtime allocates each step's outputs on the runner's device. With CUDA the KV
cache therefore never leaves the GPU; only the small int64 inputs go up and the logits come down.
The first step binds past tensors of length 0.

Needs onnxruntime and numpy only (no torch, no onnx).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import WITH_PAST, ExportFolder, past_names, present_names, read_export
from runtimes.base import ModelInfo, Runner, StepOutput

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
KV_DTYPES = {"fp32": np.float32, "fp16": np.float16}
INPUTS = ["input_ids", "attention_mask", "position_ids"]


@dataclass(frozen=True)
class SessionConfig:
    """The onnxruntime.SessionOptions a runner is built with."""

    intra_op_threads: int = 0  # threads inside an operator; 0 lets ONNX Runtime choose (one per core)
    inter_op_threads: int = 0  # threads across independent operators (used in parallel execution mode)
    optimization_level: str = "all"  # one of OPTIMIZATION_LEVELS
    log_severity: int = 3  # 0 verbose ... 3 errors only: ONNX Runtime's warnings are noise to a user

    def session_options(self) -> ort.SessionOptions:
        if self.optimization_level not in OPTIMIZATION_LEVELS:
            raise GptDeployError(f"unknown graph optimization level {self.optimization_level!r}; "
                                 f"choose one of {', '.join(OPTIMIZATION_LEVELS)}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise GptDeployError("thread counts must be >= 0 (0: ONNX Runtime's default)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.graph_optimization_level = OPTIMIZATION_LEVELS[self.optimization_level]
        options.log_severity_level = self.log_severity
        return options


@dataclass(frozen=True)
class OrtCache:
    values: tuple[ort.OrtValue, ...]  # in past_names order: layer 0 key, layer 0 value, layer 1 key, ...
    length: int


class OrtRunner(Runner):
    """ONNX Runtime with CPUExecutionProvider."""

    name = "ort"
    provider = "CPUExecutionProvider"
    device_type = "cpu"  # where IO binding keeps the KV cache

    def __init__(self, folder: ExportFolder | str | Path, session_config: SessionConfig = SessionConfig(),
                 device_id: int = 0):
        self.folder = folder if isinstance(folder, ExportFolder) else read_export(folder)
        self.info = ModelInfo.from_config(self.folder.config)
        self.precision = self.folder.precision
        self.session_config = session_config
        self.device_id = device_id
        self.device = "cpu" if self.device_type == "cpu" else f"{self.device_type}:{device_id}"
        self._past_names = past_names(self.info.n_layer)
        self._present_names = present_names(self.info.n_layer)
        self.session = ort.InferenceSession(
            str(self.folder.graph_path(WITH_PAST)), session_config.session_options(), providers=self._providers()
        )
        self._check_session()

    def _providers(self) -> list:
        return [self.provider]

    def _check_session(self) -> None:
        """The graph must follow the export folder's IO contract; one clear error if it does not."""
        graph = self.folder.graph_path(WITH_PAST)
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        outputs = {o.name: o.type for o in self.session.get_outputs()}
        kv_type = "tensor(float16)" if self.precision == "fp16" else "tensor(float)"
        expected_inputs = {**{n: "tensor(int64)" for n in INPUTS}, **{n: kv_type for n in self._past_names}}
        expected_outputs = {"logits": "tensor(float)", **{n: kv_type for n in self._present_names}}
        for kind, got, expected in (("input", inputs, expected_inputs), ("output", outputs, expected_outputs)):
            for name, onnx_type in expected.items():
                if got.get(name) != onnx_type:
                    raise GptDeployError(f"{graph} does not follow the export contract: {kind} {name} is "
                                         f"{got.get(name, 'missing')}, expected {onnx_type}")

    def describe(self) -> str:
        c = self.session_config
        threads = c.intra_op_threads or "default"
        return f"{self.name} ({self.provider}, {self.precision}, {threads} threads, optimization {c.optimization_level})"

    def new_cache(self, batch: int) -> OrtCache:
        empty = np.zeros((batch, self.info.n_head, 0, self.info.head_dim), dtype=KV_DTYPES[self.precision])
        values = tuple(ort.OrtValue.ortvalue_from_numpy(empty, self.device_type, self.device_id)
                       for _ in self._past_names)
        return OrtCache(values, 0)

    def cache_length(self, cache: OrtCache) -> int:
        return cache.length

    def cache_to_numpy(self, cache: OrtCache) -> list[tuple[np.ndarray, np.ndarray]]:
        arrays = [value.numpy() for value in cache.values]
        return list(zip(arrays[0::2], arrays[1::2]))

    def _step(self, input_ids, attention_mask, position_ids, cache: OrtCache, last_only) -> StepOutput:
        binding = self.session.io_binding()
        for name, array in zip(INPUTS, (input_ids, attention_mask, position_ids)):
            binding.bind_cpu_input(name, array)
        for name, value in zip(self._past_names, cache.values):
            binding.bind_ortvalue_input(name, value)
        # get_outputs() returns outputs in the order they were bound
        binding.bind_output("logits", "cpu")
        for name in self._present_names:
            binding.bind_output(name, self.device_type, self.device_id)
        self.session.run_with_iobinding(binding)
        logits, *presents = binding.get_outputs()
        logits = logits.numpy()
        if last_only:
            logits = logits[:, -1:]
        return StepOutput(logits, OrtCache(tuple(presents), cache.length + input_ids.shape[1]))

    def close(self) -> None:
        self.session = None


class OrtCudaRunner(OrtRunner):
    """ONNX Runtime with CUDAExecutionProvider (onnxruntime-gpu); the KV cache stays in GPU memory."""

    name = "ort-cuda"
    provider = "CUDAExecutionProvider"
    device_type = "cuda"

    def _providers(self) -> list:
        # The CPU provider takes the few nodes CUDA has no kernel for (shape arithmetic).
        return [(self.provider, {"device_id": self.device_id}), "CPUExecutionProvider"]

    def _check_session(self) -> None:
        # ONNX Runtime falls back to the CPU, with only a log line, when CUDA cannot start.
        if self.session.get_providers()[0] != self.provider:
            raise GptDeployError(
                f"onnxruntime could not start CUDAExecutionProvider on GPU {self.device_id} (check the CUDA and "
                f"cuDNN libraries onnxruntime-gpu {ort.__version__} needs); it offered {self.session.get_providers()}"
            )
        super()._check_session()
