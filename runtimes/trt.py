"""The `trt` runtime: an export folder's TensorRT engines, run with TensorRT's Python API.

Two engines (gptdeploy.exporters.tensorrt builds them into the export folder; this runner only loads
them): the prefill engine runs the first step (the prompt, past length 0), the decode engine every
later step (one new token).

Device memory, streams and CUDA graphs come from torch, a gptdeploy dependency: its tensors give
device pointers, host copies and dtype handling in one call each, where cuda-python would need an
explicit allocation, copy, free and error check for every buffer.

Every buffer is allocated once, for the largest shapes of the engines' profiles: the int64 inputs,
the logits, and two KV "slots". A cache is a slot plus its length: TensorRT writes a step's presents
into a free slot, which the next step reads as its past, so the KV cache never leaves the GPU. A
slot is free when no cache refers to it any more; a caller that keeps old caches alive (the runner
interface allows it) gets a new slot, never one that is still in use.

cuda_graphs=True captures each decode step (one CUDA graph per batch size, past length and slot
pair, on first use) and replays it later: fewer kernel launches from Python per token. A graph fixes
shapes and addresses, so it is reused only where all of them repeat (a second request, a benchmark
repeat); the GPU tests compare it with plain execution. At most MAX_CUDA_GRAPHS are kept (least
recently used evicted), since every new past length would add one. Where capture fails (a kernel
that cannot be captured), the runner turns CUDA graphs off, says why in `graph_failure`, and goes on
with plain execution: the step that failed to capture had already run plainly.

After the input shapes are set, the output shapes TensorRT reports are checked against the buffers
allocated for them, so an engine that would write past them is refused instead of corrupting memory.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptdeploy.environment import import_tensorrt, tensorrt_logger
from gptdeploy.errors import EngineUnusable, GptDeployError
from gptdeploy.export_folder import DECODE, INPUTS, PREFILL, ExportFolder, past_names, present_names, read_export
from gptdeploy.runtimes.base import ModelInfo, OpenOptions, Runner, StepOutput

MAX_CUDA_GRAPHS = 64  # captured decode steps kept, least recently used evicted first
TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
                np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}


class _Slot:
    """Room for one KV cache of the largest profile shape: one row per past/present tensor."""

    def __init__(self, index: int, tensors: int, elements: int, dtype: torch.dtype, device: torch.device):
        self.index = index
        self.buffer = torch.empty(tensors, elements, dtype=dtype, device=device)
        self.owner: weakref.ref | None = None  # the cache that holds this slot

    def is_free(self) -> bool:
        return self.owner is None or self.owner() is None

    def view(self, i: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self.buffer[i, : math.prod(shape)].view(shape)


@dataclass(eq=False)  # compared by identity; slots keep weak references to caches
class TrtCache:
    slot: _Slot | None  # None while empty
    length: int
    batch: int


class _Engine:
    """One engine, its execution context and its input buffers."""

    def __init__(self, trt, engine, stream: torch.cuda.Stream, device: torch.device):
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise GptDeployError("TensorRT could not create an execution context (out of GPU memory?)")
        self.context.set_optimization_profile_async(0, stream.cuda_stream)  # the one profile they are built with
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.dtypes = {n: TORCH_DTYPES[np.dtype(trt.nptype(engine.get_tensor_dtype(n)))] for n in names}
        self.min_shapes = {n: tuple(engine.get_tensor_profile_shape(n, 0)[0]) for n in self.inputs}
        self.max_shapes = {n: tuple(engine.get_tensor_profile_shape(n, 0)[2]) for n in self.inputs}
        self.buffers = {n: torch.empty(math.prod(self.max_shapes[n]), dtype=self.dtypes[n], device=device)
                        for n in INPUTS}

    def check(self, name: str, shape: tuple[int, ...], engine: str) -> None:
        lo, hi = self.min_shapes[name], self.max_shapes[name]
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            raise GptDeployError(
                f"the {engine} engine takes {name} from {list(lo)} to {list(hi)}, not {list(shape)}; rebuild "
                "the engines for these shapes: gptdeploy build-engine DIR --max-batch ... --max-seq ... --max-past ..."
            )


class TrtRunner(Runner):
    """The export's TensorRT engines on a CUDA GPU; the KV cache stays in GPU memory.

    The engines must be in the folder (gptdeploy build-engine, or the application builds them before it
    opens this runner). An engine that is missing or that TensorRT cannot load raises EngineUnusable
    naming it, so that the application can rebuild that engine alone.
    """

    name = "trt"

    def __init__(self, folder: ExportFolder | str | Path, *, device_id: int = 0, cuda_graphs: bool = False):
        self.folder = folder if isinstance(folder, ExportFolder) else read_export(folder)
        self.info = ModelInfo.from_config(self.folder.config)
        self.precision = self.folder.precision
        self.cuda_graphs = cuda_graphs
        self.graph_failure: str | None = None  # why CUDA graphs were turned off, if capture failed
        trt = import_tensorrt()
        if not 0 <= device_id < torch.cuda.device_count():
            raise GptDeployError(f"no CUDA device cuda:{device_id}; this machine has {torch.cuda.device_count()}")
        self._device = torch.device("cuda", device_id)
        self.device = str(self._device)
        self._trt_version = trt.__version__
        self._past_names = past_names(self.info.n_layer)
        self._present_names = present_names(self.info.n_layer)
        self._graphs: OrderedDict[tuple, torch.cuda.CUDAGraph] = OrderedDict()
        with torch.cuda.device(self._device):
            self.stream = torch.cuda.Stream()
            self._logger = tensorrt_logger(trt)
            engines = self._load_engines(trt)
            self._engines = {name: _Engine(trt, engine, self.stream, self._device) for name, engine in engines.items()}
            self._allocate()

    @classmethod
    def open(cls, target: ExportFolder, options: OpenOptions = OpenOptions()) -> TrtRunner:
        if options.variant is not None:
            raise GptDeployError(f"the {cls.name} runtime runs the export's own graphs, not variant {options.variant}")
        return cls(target, device_id=options.cuda_index(cls.name))

    def _load_engines(self, trt) -> dict:
        """Each engine deserialized; EngineUnusable for the first that is missing or that TensorRT cannot load."""
        self._runtimes, engines = [], {}
        for name in (PREFILL, DECODE):
            entry = self.folder.engines.get(name)
            if entry is None or not (self.folder.path / entry["file"]).is_file():
                raise EngineUnusable(name, f"{self.folder.path} has no {name} engine; build it: gptdeploy "
                                           f"build-engine {self.folder.path}")
            path = self.folder.path / entry["file"]
            runtime = trt.Runtime(self._logger)
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise EngineUnusable(name, f"TensorRT {trt.__version__} cannot load {path}: {self._logger.last_error()}")
            self._runtimes.append(runtime)  # a runtime must outlive its engine
            engines[name] = engine
        return engines

    def _allocate(self) -> None:
        prefill, decode = self._engines[PREFILL], self._engines[DECODE]
        self.max_batch = min(prefill.max_shapes["input_ids"][0], decode.max_shapes["input_ids"][0])
        max_len = max(prefill.max_shapes["input_ids"][1], decode.max_shapes["attention_mask"][1])
        self._kv_dtype = prefill.dtypes[self._present_names[0]]
        # rows of 128 elements keep every tensor's start aligned to 256 bytes and more
        self._kv_elements = -(-self.max_batch * self.info.n_head * max_len * self.info.head_dim // 128) * 128
        self._slots: list[_Slot] = []
        for _ in range(2):  # the past of a step and its presents
            self._slots.append(self._new_slot())
        if prefill.dtypes["logits"] != torch.float32 or decode.dtypes["logits"] != torch.float32:
            raise GptDeployError(f"{self.folder.path}'s engines do not return float32 logits, as the export contract says")
        logits = max(math.prod(e.max_shapes["input_ids"]) for e in self._engines.values()) * self.info.vocab_size
        self._logits = torch.empty(logits, dtype=torch.float32, device=self._device)

    def _new_slot(self) -> _Slot:
        return _Slot(len(self._slots), len(self._past_names), self._kv_elements, self._kv_dtype, self._device)

    def _free_slot(self, busy: _Slot | None) -> _Slot:
        for slot in self._slots:
            if slot is not busy and slot.is_free():
                return slot
        with torch.cuda.device(self._device):  # the caller keeps older caches alive: make room
            self._slots.append(self._new_slot())
        return self._slots[-1]

    def describe(self) -> str:
        graphs = ", CUDA graphs" if self.cuda_graphs else (" (CUDA graphs off: capture failed)" if self.graph_failure
                                                           else "")
        return f"{self.name} (TensorRT {self._trt_version}, {torch.cuda.get_device_name(self._device)}, " \
               f"{self.precision}{graphs})"

    def new_cache(self, batch: int) -> TrtCache:
        return TrtCache(None, 0, batch)

    def cache_length(self, cache: TrtCache) -> int:
        return cache.length

    def _kv_shape(self, batch: int, length: int) -> tuple[int, ...]:
        return (batch, self.info.n_head, length, self.info.head_dim)

    def cache_to_numpy(self, cache: TrtCache) -> list[tuple[np.ndarray, np.ndarray]]:
        shape = self._kv_shape(cache.batch, cache.length)
        if cache.slot is None:
            empty = np.zeros(shape, dtype=np.float16 if self.precision == "fp16" else np.float32)
            return [(empty, empty) for _ in range(self.info.n_layer)]
        with torch.cuda.stream(self.stream):
            arrays = [cache.slot.view(i, shape).cpu().numpy() for i in range(len(self._past_names))]
        return list(zip(arrays[0::2], arrays[1::2]))

    def _step(self, input_ids, attention_mask, position_ids, cache: TrtCache, last_only) -> StepOutput:
        batch, seq = input_ids.shape
        past = cache.length
        if past and batch != cache.batch:
            raise ValueError(f"the cache holds {cache.batch} rows, the inputs {batch}")
        engine_name = PREFILL if past == 0 else DECODE
        run = self._engines[engine_name]
        shapes = {"input_ids": input_ids.shape, "attention_mask": attention_mask.shape, "position_ids": position_ids.shape}
        if past:
            shapes |= {name: self._kv_shape(batch, past) for name in self._past_names}
        for name, shape in shapes.items():
            run.check(name, shape, engine_name)
        out_slot = self._free_slot(cache.slot)
        ctx = run.context
        with torch.cuda.device(self._device), torch.cuda.stream(self.stream):
            for name, array in zip(INPUTS, (input_ids, attention_mask, position_ids)):
                run.buffers[name][: array.size].copy_(torch.from_numpy(array).view(-1))  # casts to the engine's dtype
            for name, shape in shapes.items():
                if not ctx.set_input_shape(name, shape):
                    raise GptDeployError(f"TensorRT refused shape {list(shape)} for {name} of the {engine_name} engine")
            self._check_output_shapes(ctx, engine_name, batch, seq, past)
            graph_key = (batch, past, cache.slot.index if cache.slot else -1, out_slot.index)
            graph = self._graphs.get(graph_key) if self.cuda_graphs and past else None
            if graph is None:
                self._bind(run, shapes, cache.slot, out_slot)
                self._execute(ctx)
                if self.cuda_graphs and past:
                    self._remember(graph_key, self._capture(ctx))
            else:
                self._graphs.move_to_end(graph_key)
                graph.replay()
            logits = self._logits[: batch * seq * self.info.vocab_size].view(batch, seq, self.info.vocab_size)
            logits = (logits[:, -1:] if last_only else logits).cpu().numpy()  # waits for the stream
        new_cache = TrtCache(out_slot, past + seq, batch)
        out_slot.owner = weakref.ref(new_cache)
        return StepOutput(logits, new_cache)

    def _bind(self, run: _Engine, shapes, past_slot: _Slot | None, out_slot: _Slot) -> None:
        ctx = run.context
        for name in INPUTS:
            ctx.set_tensor_address(name, run.buffers[name].data_ptr())
        for i, name in enumerate(self._past_names):
            if name in shapes:
                ctx.set_tensor_address(name, past_slot.buffer[i].data_ptr())
        ctx.set_tensor_address("logits", self._logits.data_ptr())
        for i, name in enumerate(self._present_names):
            ctx.set_tensor_address(name, out_slot.buffer[i].data_ptr())

    def _execute(self, ctx) -> None:
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise GptDeployError(f"TensorRT could not run the step: {self._logger.last_error()}")

    def _check_output_shapes(self, ctx, engine_name: str, batch: int, seq: int, past: int) -> None:
        """The shapes TensorRT will write, against the buffers allocated for them."""
        expected = {"logits": (batch, seq, self.info.vocab_size),
                    **{name: self._kv_shape(batch, past + seq) for name in self._present_names}}
        for name, shape in expected.items():
            got = tuple(ctx.get_tensor_shape(name))
            if got != shape:
                raise GptDeployError(f"the {engine_name} engine would write {name} as {list(got)}, not {list(shape)}: "
                                     f"it does not follow the export contract; rebuild it (gptdeploy build-engine "
                                     f"{self.folder.path} --force)")
        if math.prod(expected["logits"]) > self._logits.numel() or \
                math.prod(expected[self._present_names[0]]) > self._kv_elements:
            raise GptDeployError(f"the {engine_name} engine's outputs for batch {batch}, {past + seq} positions "
                                 f"exceed the buffers allocated for its profile")

    def _capture(self, ctx) -> torch.cuda.CUDAGraph | None:
        """A CUDA graph of the step just executed (TensorRT wants one plain run after a shape change
        before capture; that run's results are this step's). None, and CUDA graphs off, if capture fails."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self._execute(ctx)
        except Exception as e:  # noqa: BLE001 - any capture failure: run plainly from now on
            self.cuda_graphs = False
            self.graph_failure = f"{type(e).__name__}: {e}"
            self._graphs.clear()
            torch.cuda.synchronize(self._device)
            return None
        return graph

    def _remember(self, key: tuple, graph: torch.cuda.CUDAGraph | None) -> None:
        if graph is None:
            return
        self._graphs[key] = graph
        while len(self._graphs) > MAX_CUDA_GRAPHS:
            self._graphs.popitem(last=False)

    def close(self) -> None:
        self._graphs.clear()
        self._engines.clear()
        self._slots.clear()
        self._runtimes.clear()
        self._logits = None
