"""TensorRT engines from an export folder's ONNX graphs.

    trt/prefill.engine   from onnx/decoder_model.onnx (no past inputs): the prompt, past length 0
    trt/decode.engine    from onnx/model.onnx (with past): one new token after the cached positions

(fp16 exports: trt/prefill_fp16.engine and trt/decode_fp16.engine, from the fp16 graphs.) The first
step never passes an empty past to TensorRT, which handles zero-length dimensions poorly.

Networks are strongly typed: precision comes from the types in the ONNX graph, not from builder
flags. TensorRT 11 removed weak typing and BuilderFlag.FP16; on 10.x strong typing is the opt-in
NetworkDefinitionCreationFlag.STRONGLY_TYPED, on 11.x that flag is accepted and ignored, so passing
it is right on both. An fp16 engine is therefore built from an fp16 export. fp32 engines are built
without TF32, so that they compute in fp32 like the reference.

A timing cache per TensorRT version and GPU lives beside the engines and makes rebuilds faster. A
cache that TensorRT refuses (set_timing_cache returns False: it was made on a device with other
properties, which two GPUs of the same compute capability can be) is replaced by an empty one.

This module builds; which engines to build, and when, is the application's (gptdeploy.app.exporting).
"""

from __future__ import annotations

import time
from pathlib import Path

from gptdeploy.engines import EngineSpec
from gptdeploy.environment import tensorrt_logger
from gptdeploy.errors import GptDeployError
from gptdeploy.files import write_atomic
from gptdeploy.progress import Progress


def _progress_monitor(trt, bar):
    """An IProgressMonitor that shows each build phase as a rich progress bar; Ctrl-C cancels."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.tasks: dict[str, tuple[int, int]] = {}  # phase -> (rich task id, depth)
            self.cancelled = False

        # TensorRT calls these from its own code, possibly from several threads: never raise into it.
        def phase_start(self, phase_name, parent_phase, num_steps):
            try:
                depth = self.tasks[parent_phase][1] + 1 if parent_phase in self.tasks else 0
                self.tasks[phase_name] = (bar.add_task("  " * depth + phase_name, total=num_steps), depth)
            except KeyboardInterrupt:
                self.cancelled = True
            except Exception:  # noqa: BLE001 - a display problem must not break the build
                pass

        def step_complete(self, phase_name, step):
            try:
                bar.update(self.tasks[phase_name][0], completed=step + 1)
            except KeyboardInterrupt:
                self.cancelled = True
            except Exception:  # noqa: BLE001
                pass
            return not self.cancelled  # False asks TensorRT to cancel the build

        def phase_finish(self, phase_name):
            try:
                bar.remove_task(self.tasks.pop(phase_name)[0])
            except KeyboardInterrupt:
                self.cancelled = True
            except Exception:  # noqa: BLE001
                pass

    return Monitor()


def set_timing_cache(config, blob: bytes) -> bool:
    """Gives the builder config a timing cache from `blob` (b"": a new one). TensorRT refuses a cache made
    on a device with other properties (set_timing_cache returns False); then an empty one is used.
    Returns whether the given cache was used."""
    cache = config.create_timing_cache(blob) if blob else None
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return True
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise GptDeployError("TensorRT refused even an empty timing cache")
    return False


def build_engine(trt, folder: Path, spec: EngineSpec, progress: Progress) -> tuple[dict, dict[str, str]]:
    """Builds one engine into the folder; returns its manifest entry and {file: sha256} of what was written."""
    logger = tensorrt_logger(trt)
    builder = trt.Builder(logger)
    # Strongly typed: required opt-in on TensorRT 10.x, accepted and ignored on 11.x (always on there).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file, not parse(bytes): the parser then finds external weights beside the graph
    if not parser.parse_from_file(str(folder / spec.graph_file)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] + logger.errors
        raise GptDeployError(f"TensorRT {trt.__version__} cannot parse {spec.graph_file}: "
                             f"{errors[0] if errors else 'no reason given'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.settings.workspace_gib * 2**30))
    if spec.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 rounds fp32 matmul inputs to 10 mantissa bits
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in spec.shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    timing_path = folder / spec.timing_cache_file
    if not set_timing_cache(config, timing_path.read_bytes() if timing_path.is_file() else b"") \
            and timing_path.is_file():
        progress.note(f"TensorRT: {spec.timing_cache_file} was made on another device; building with a new one")
    logger.errors.clear()  # a rejected timing cache is not the reason a build fails

    started = time.perf_counter()
    label = f"building the {spec.engine} engine from {spec.graph_file}"
    with progress.step(label + " (this takes minutes)"):
        if hasattr(trt, "IProgressMonitor") and progress.interactive:
            with progress.bar() as bar:
                bar.add_task(label, total=None)
                monitor = _progress_monitor(trt, bar)
                config.progress_monitor = monitor
                serialized = builder.build_serialized_network(network, config)
            if serialized is None and monitor.cancelled:
                raise KeyboardInterrupt
        else:
            serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        reason = logger.errors[0] if logger.errors else "no reason given"
        raise GptDeployError(f"TensorRT {trt.__version__} could not build the {spec.engine} engine: {reason}")
    seconds = time.perf_counter() - started

    (folder / spec.file).parent.mkdir(parents=True, exist_ok=True)
    written = {spec.file: write_atomic(folder / spec.file, memoryview(serialized))}
    timing_cache = config.get_timing_cache()
    if timing_cache is not None:
        written[spec.timing_cache_file] = write_atomic(timing_path, memoryview(timing_cache.serialize()))
    entry = spec.manifest_entry(size=(folder / spec.file).stat().st_size, build_seconds=seconds)
    return entry, written

