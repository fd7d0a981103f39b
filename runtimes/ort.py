"""The `ort` and `ort-cuda` runtimes: ONNX Runtime on an exported folder's decoder with KV cache.

Both run onnx/model.onnx (model_fp16.onnx for fp16 exports), or one of the folder's ONNX Runtime
variants (gptdeploy.export_folder.VARIANTS, written by gptdeploy optimize), through IO binding.

KV cache, two ways, as the graph allows (the manifest's variants.<name>.kv_cache):
- concat (model.onnx, the fp16 variant): the present keys/values of one step are bound, as they
  are, as the past of the next, and ONNX Runtime allocates each step's outputs on the runner's
  device. With CUDA the cache therefore never leaves the GPU; only the small int64 inputs go up and
  the logits come down. The first step binds past tensors of length 0. Each step copies the whole
  cache into its present (the graph's Concat).
- shared-buffer (the CPU variants, whose attention is GroupQueryAttention): one preallocated buffer
  per layer and per keys/values, [batch, n_head, capacity, head_dim], bound as both past and
  present, so ONNX Runtime writes each step's keys/values into it in place and nothing is copied
  per step. The capacity doubles (one copy) when a step needs more, up to block_size. A cache stays
  valid after later steps (they only write beyond its length); stepping from a cache that a later
  step has already extended copies it into fresh buffers first.
With a variant, generation asks for the last position's logits only, which saves the lm_head on the
others during the prefill: the variant's num_logits_to_keep initializer (0: every position) is
overridden with 1 in a session of its own (SessionOptions.add_initializer), made when a step first asks
for the last position only; a step that wants every position runs in the session that keeps the default.
With SessionConfig.huge_pages (CPU), the memory a session's creation mapped (its weights) is moved into huge
pages once it is made (runtimes/hugepages.py): fewer TLB misses in steps that stream every weight.
SessionConfig.spinning (default: $GPTDEPLOY_ORT_SPINNING, else ONNX Runtime's own default, on): whether the
worker threads spin-wait for the next operator's work or sleep. Spinning makes short operators faster on an
idle machine (q4 decode 22-24% faster, docs/ort-optimization.md) and holds the cores busy between them:
on a machine shared with other work, or one that runs many short sessions, off costs less CPU.

Needs onnxruntime and numpy only (no torch, no onnx).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gptdeploy.errors import GptDeployError, RuntimeFailed
from gptdeploy.export_folder import (
    INPUTS,
    KV_CONCAT,
    KV_SHARED_BUFFER,
    LOGITS_TO_KEEP,
    NO_PAST,
    WITH_PAST,
    ExportFolder,
    past_names,
    present_names,
    read_export,
)
from gptdeploy.runtimes.base import ModelInfo, OpenOptions, Runner, StepOutput
from gptdeploy.runtimes.hugepages import collapse_new_memory

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# The KV cache's dtype by the runner's precision: weight-only quantized variants keep an fp32 cache.
KV_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.float32, "int4": np.float32}
MIN_KV_CAPACITY = 64  # positions of the smallest shared KV buffer
SPINNING_VARIABLE = "GPTDEPLOY_ORT_SPINNING"


@dataclass(frozen=True)
class SessionConfig:
    """The onnxruntime.SessionOptions a runner is built with."""

    intra_op_threads: int = 0  # threads inside an operator; 0 lets ONNX Runtime choose (one per core)
    inter_op_threads: int = 0  # threads across independent operators (used in parallel execution mode)
    optimization_level: str = "all"  # one of OPTIMIZATION_LEVELS
    log_severity: int = 3  # 0 verbose ... 3 errors only: ONNX Runtime's warnings are noise to a user
    profile_prefix: str | None = None  # ONNX Runtime's profiler on: each session writes PREFIX_<time>.json
    huge_pages: bool = False  # CPU: the session's weights moved into huge pages once made (runtimes/hugepages.py)
    spinning: bool | None = None  # worker threads spin-wait between operators; None: $GPTDEPLOY_ORT_SPINNING, else on

    @classmethod
    def of(cls, options: OpenOptions) -> SessionConfig:
        return cls(intra_op_threads=options.threads, optimization_level=options.optimization,
                   huge_pages=options.huge_pages)

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
        spinning = self.resolved_spinning()
        if spinning is not None:
            for entry in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
                options.add_session_config_entry(entry, "1" if spinning else "0")
        if self.profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = self.profile_prefix
        return options

    def resolved_spinning(self) -> bool | None:
        """spinning, else what $GPTDEPLOY_ORT_SPINNING says (0 or 1), else None: ONNX Runtime's default (on)."""
        if self.spinning is not None:
            return self.spinning
        value = os.environ.get(SPINNING_VARIABLE, "").strip()
        if not value:
            return None
        if value not in ("0", "1"):
            raise GptDeployError(f"{SPINNING_VARIABLE} must be 0 (ONNX Runtime's threads sleep between operators) "
                                 f"or 1 (they spin, its default), not {value!r}")
        return value == "1"


@dataclass(frozen=True)
class OrtCache:
    values: tuple[ort.OrtValue, ...]  # in past_names order: layer 0 key, layer 0 value, layer 1 key, ...
    length: int


class _KvBuffers:
    """The preallocated keys and values of a shared-buffer cache, and the IO bindings that bind them.

    arrays: per layer key then value, each [batch, n_head, capacity, head_dim]; the OrtValues are views
    of them (no copy), bound as both the past and the present of every step, in each session that runs one.
    """

    def __init__(self, arrays: list[np.ndarray], past: list[str], present: list[str]):
        self.arrays = arrays
        self.capacity = arrays[0].shape[2]
        self.filled = 0  # positions written by the steps so far
        self._names = past, present
        self._bindings: dict[int, ort.IOBinding] = {}

    def binding(self, session: ort.InferenceSession) -> ort.IOBinding:
        if id(session) not in self._bindings:
            binding = session.io_binding()
            binding.bind_output("logits", "cpu")  # first, so that get_outputs()[0] is the logits
            for past_name, present_name, array in zip(*self._names, self.arrays):
                value = ort.OrtValue.ortvalue_from_numpy(array)
                binding.bind_ortvalue_input(past_name, value)
                binding.bind_ortvalue_output(present_name, value)
            self._bindings[id(session)] = binding
        return self._bindings[id(session)]


@dataclass(frozen=True)
class SharedCache:
    """A shared-buffer KV cache: its first `length` positions of `buffers` (None before the first step)."""

    buffers: _KvBuffers | None
    batch: int
    length: int


class OrtRunner(Runner):
    """ONNX Runtime with CPUExecutionProvider.

    variant: one of the folder's ONNX Runtime variants (gptdeploy.export_folder.VARIANTS); None runs
    the export's own graph (onnx/model.onnx, or model_fp16.onnx for an fp16 export).
    graph: NO_PAST runs the export's no-past graph (onnx/decoder_model.onnx) instead: a scorer that
    takes a whole sequence from an empty cache, and nothing after it.
    """

    name = "ort"
    provider = "CPUExecutionProvider"
    device_type = "cpu"  # where IO binding keeps the KV cache

    def __init__(self, folder: ExportFolder | str | Path, session_config: SessionConfig = SessionConfig(),
                 device_id: int = 0, *, variant: str | None = None, graph: str = WITH_PAST):
        self.folder = folder if isinstance(folder, ExportFolder) else read_export(folder)
        self.info = ModelInfo.from_config(self.folder.config)
        self.variant = variant
        self.role = graph if variant is None else WITH_PAST
        if variant is None:
            self.graph = self.folder.graph_path(self.role)
            self.precision, self.kv_cache = self.folder.precision, KV_CONCAT
        else:
            entry = self.folder.variant(variant)
            self.graph = self.folder.path / entry["file"]
            self.precision, self.kv_cache = entry["precision"], entry["kv_cache"]
        # a setting the environment gives is fixed here, when the runner is made: its sessions and describe() agree
        self.session_config = replace(session_config, spinning=session_config.resolved_spinning())
        self.device_id = device_id
        self.device = "cpu" if self.device_type == "cpu" else f"{self.device_type}:{device_id}"
        self._past_names = past_names(self.info.n_layer)
        self._present_names = present_names(self.info.n_layer)
        self._check_kv_cache()
        # A variant whose num_logits_to_keep is an initializer runs last-position steps in a session that
        # overrides it with 1; older variants took it as an input with a default (fed per step).
        entry = self.folder.variants.get(variant, {}) if variant else {}
        self._keep_initializer = "logits_to_keep" in entry
        self._sessions: dict[bool, ort.InferenceSession] = {}
        self.huge_page_bytes = 0  # of the sessions' memory moved into huge pages (SessionConfig.huge_pages)
        self.session = self._session(last_only=self._keep_initializer)
        self._check_session()
        self._logits_to_keep = LOGITS_TO_KEEP in {i.name for i in self.session.get_overridable_initializers()}
        self._keep = {n: ort.OrtValue.ortvalue_from_numpy(np.array(n, dtype=np.int64)) for n in (0, 1)}

    def _session(self, last_only: bool) -> ort.InferenceSession:
        """The session for steps that want the last position's logits only, or every position's."""
        key = last_only and self._keep_initializer
        if key not in self._sessions:
            options = self.session_config.session_options()
            if key:
                self._keep_one = ort.OrtValue.ortvalue_from_numpy(np.array(1, dtype=np.int64))
                options.add_initializer(LOGITS_TO_KEEP, self._keep_one)
            try:
                self._sessions[key] = self._new_session(options)
            except Exception as e:  # ONNX Runtime's own errors: a file it cannot read as a graph
                if not type(e).__module__.startswith("onnxruntime"):
                    raise
                raise GptDeployError(f"ONNX Runtime cannot load {self.graph}: {_first_line(e)}") from None
        return self._sessions[key]

    def _new_session(self, options: ort.SessionOptions) -> ort.InferenceSession:
        def create():
            return ort.InferenceSession(str(self.graph), options, providers=self._providers())

        if not (self.session_config.huge_pages and self.device_type == "cpu"):
            return create()
        session, moved = collapse_new_memory(create)
        self.huge_page_bytes += moved
        return session

    @classmethod
    def open(cls, target: ExportFolder, options: OpenOptions = OpenOptions()) -> OrtRunner:
        if options.device not in (None, "cpu"):
            raise GptDeployError(f"the ort runtime runs on the CPU; for {options.device!r} use --runtime ort-cuda")
        return cls(target, SessionConfig.of(options), variant=options.variant)

    def _check_kv_cache(self) -> None:
        if self.kv_cache not in (KV_CONCAT, KV_SHARED_BUFFER):
            raise GptDeployError(f"{self.graph} passes its KV cache as {self.kv_cache!r}, which this version of "
                                 f"gptdeploy does not know")

    def _providers(self) -> list:
        return [self.provider]

    def _check_session(self) -> None:
        """The graph must follow the export folder's IO contract; one clear error if it does not."""
        graph = self.graph
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        outputs = {o.name: o.type for o in self.session.get_outputs()}
        kv_type = "tensor(float16)" if self.precision == "fp16" else "tensor(float)"
        past = self._past_names if self.role == WITH_PAST else []
        expected_inputs = {**{n: "tensor(int64)" for n in INPUTS}, **{n: kv_type for n in past}}
        expected_outputs = {"logits": "tensor(float)", **{n: kv_type for n in self._present_names}}
        for kind, got, expected in (("input", inputs, expected_inputs), ("output", outputs, expected_outputs)):
            for name, onnx_type in expected.items():
                if got.get(name) != onnx_type:
                    raise GptDeployError(f"{graph} does not follow the export contract: {kind} {name} is "
                                         f"{got.get(name, 'missing')}, expected {onnx_type}")

    def describe(self) -> str:
        c = self.session_config
        threads = c.intra_op_threads or "default"
        graph = f"variant {self.variant}, " if self.variant else ""
        pages = f", huge pages {self.huge_page_bytes / 2**20:.0f} MiB" if c.huge_pages else ""
        spinning = ", no spinning" if c.spinning is False else ""
        return (f"{self.name} ({self.provider}, {graph}{self.precision}, {threads} threads, optimization "
                f"{c.optimization_level}{spinning}, KV cache {self.kv_cache}{pages})")

    def new_cache(self, batch: int) -> OrtCache | SharedCache:
        if self.kv_cache == KV_SHARED_BUFFER:
            return SharedCache(None, batch, 0)  # the buffers come with the first step, sized for it
        empty = np.zeros((batch, self.info.n_head, 0, self.info.head_dim), dtype=KV_DTYPES[self.precision])
        values = tuple(ort.OrtValue.ortvalue_from_numpy(empty, self.device_type, self.device_id)
                       for _ in self._past_names)
        return OrtCache(values, 0)

    def cache_length(self, cache: OrtCache | SharedCache) -> int:
        return cache.length

    def cache_to_numpy(self, cache: OrtCache | SharedCache) -> list[tuple[np.ndarray, np.ndarray]]:
        if isinstance(cache, SharedCache):
            if cache.buffers is None:
                empty = np.zeros((cache.batch, self.info.n_head, 0, self.info.head_dim), KV_DTYPES[self.precision])
                return [(empty, empty)] * self.info.n_layer
            arrays = [a[:, :, :cache.length].copy() for a in cache.buffers.arrays]
        else:
            arrays = [value.numpy() for value in cache.values]
        return list(zip(arrays[0::2], arrays[1::2]))

    def _step(self, input_ids, attention_mask, position_ids, cache: OrtCache | SharedCache, last_only) -> StepOutput:
        if isinstance(cache, SharedCache):
            return self._shared_step(input_ids, attention_mask, position_ids, cache, last_only)
        if self.role == NO_PAST and cache.length:
            raise ValueError(f"{self.graph.name} is the no-past graph: it runs a whole sequence from an empty "
                             f"cache, not a step after {cache.length} cached positions")
        session = self._session(last_only)
        binding = session.io_binding()
        for name, array in zip(INPUTS, (input_ids, attention_mask, position_ids)):
            binding.bind_cpu_input(name, array)
        if self.role == WITH_PAST:
            for name, value in zip(self._past_names, cache.values):
                binding.bind_ortvalue_input(name, value)
        # get_outputs() returns outputs in the order they were bound
        binding.bind_output("logits", "cpu")
        for name in self._present_names:
            binding.bind_output(name, self.device_type, self.device_id)
        if self._logits_to_keep:
            binding.bind_ortvalue_input(LOGITS_TO_KEEP, self._keep[int(last_only)])
        self._run(session, binding)
        logits, *presents = binding.get_outputs()
        logits = logits.numpy()
        if last_only:
            logits = logits[:, -1:]
        return StepOutput(logits, OrtCache(tuple(presents), cache.length + input_ids.shape[1]))

    def _shared_step(self, input_ids, attention_mask, position_ids, cache: SharedCache, last_only) -> StepOutput:
        batch, seq = input_ids.shape
        if batch > 1 and seq > 1 and cache.length:
            # GroupQueryAttention takes several new positions after a past for a single row only
            return self._token_by_token(input_ids, attention_mask, position_ids, cache, last_only)
        needed = cache.length + seq
        buffers = cache.buffers
        if buffers is None or buffers.filled != cache.length or buffers.capacity < needed:
            buffers = self._new_buffers(cache, needed)
        session = self._session(last_only)
        binding = buffers.binding(session)
        for name, array in zip(INPUTS, (input_ids, attention_mask, position_ids)):
            binding.bind_cpu_input(name, array)
        if self._logits_to_keep:
            binding.bind_ortvalue_input(LOGITS_TO_KEEP, self._keep[int(last_only)])
        binding.bind_output("logits", "cpu")  # a fresh logits tensor: the last one belongs to the caller
        self._run(session, binding)
        buffers.filled = needed
        logits = binding.get_outputs()[0].numpy()
        return StepOutput(logits[:, -1:] if last_only else logits, SharedCache(buffers, batch, needed))

    def _new_buffers(self, cache: SharedCache, needed: int) -> _KvBuffers:
        """Buffers for `needed` positions and more (twice, up to block_size), holding the cache's positions."""
        capacity = min(self.info.block_size, max(2 * needed, MIN_KV_CAPACITY))
        shape = (cache.batch, self.info.n_head, capacity, self.info.head_dim)
        arrays = [np.zeros(shape, dtype=KV_DTYPES[self.precision]) for _ in self._past_names]
        if cache.buffers is not None:
            for new, old in zip(arrays, cache.buffers.arrays):
                new[:, :, :cache.length] = old[:, :, :cache.length]
        return _KvBuffers(arrays, self._past_names, self._present_names)

    def _token_by_token(self, input_ids, attention_mask, position_ids, cache: SharedCache, last_only) -> StepOutput:
        logits = []
        for i in range(input_ids.shape[1]):
            out = self._shared_step(input_ids[:, i:i + 1], attention_mask[:, :cache.length + 1],
                                    position_ids[:, i:i + 1], cache, last_only=True)
            logits.append(out.logits)
            cache = out.cache
        return StepOutput(logits[-1] if last_only else np.concatenate(logits, axis=1), cache)

    def _run(self, session, binding) -> None:
        try:
            session.run_with_iobinding(binding)
        except Exception as e:  # ONNX Runtime failed on inputs the runner checked: the runtime failed
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            raise RuntimeFailed(f"ONNX Runtime failed running {self.graph.name}: {_first_line(e)}") from None

    def end_profiling(self) -> list[str]:
        """With SessionConfig.profile_prefix: ends each session's profile; the JSON files written."""
        return [session.end_profiling() for session in self._sessions.values()]

    def close(self) -> None:
        self.session = None
        self._sessions.clear()


def _first_line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


class OrtCudaRunner(OrtRunner):
    """ONNX Runtime with CUDAExecutionProvider (onnxruntime-gpu); the KV cache stays in GPU memory."""

    name = "ort-cuda"
    provider = "CUDAExecutionProvider"
    device_type = "cuda"

    @classmethod
    def open(cls, target: ExportFolder, options: OpenOptions = OpenOptions()) -> OrtCudaRunner:
        return cls(target, SessionConfig.of(options), device_id=options.cuda_index(cls.name), variant=options.variant)

    def _providers(self) -> list:
        # The CPU provider takes the few nodes CUDA has no kernel for (shape arithmetic).
        return [(self.provider, {"device_id": self.device_id}), "CPUExecutionProvider"]

    def _check_kv_cache(self) -> None:
        if self.kv_cache == KV_SHARED_BUFFER:
            raise GptDeployError(
                f"variant {self.variant} runs on the CPU only (--runtime ort): its GroupQueryAttention takes an "
                f"attention bias (the mask of left-padded prompts), which ONNX Runtime's CUDA kernel does not; "
                f"on CUDA run the fp16 variant or the export itself")
        super()._check_kv_cache()

    def _check_session(self) -> None:
        # ONNX Runtime falls back to the CPU, with only a log line, when CUDA cannot start.
        if self.session.get_providers()[0] != self.provider:
            raise GptDeployError(
                f"onnxruntime could not start CUDAExecutionProvider on GPU {self.device_id} (check the CUDA and "
                f"cuDNN libraries onnxruntime-gpu {ort.__version__} needs); it offered {self.session.get_providers()}"
            )
        super()._check_session()
