"""TensorRT engines from an export folder.

    gptdeploy build-engine out/gpt2        # or: gptdeploy export gpt2 --trt

Two engines per export, each built from one of its ONNX graphs:

    trt/prefill.engine   from onnx/decoder_model.onnx (no past inputs): the prompt, past length 0
    trt/decode.engine    from onnx/model.onnx (with past): one new token after the cached positions

(fp16 exports: trt/prefill_fp16.engine and trt/decode_fp16.engine, from the fp16 graphs.) The first
step never passes an empty past to TensorRT, which handles zero-length dimensions poorly.

Networks are strongly typed: precision comes from the types in the ONNX graph, not from builder
flags. TensorRT 11 removed weak typing and BuilderFlag.FP16; on 10.x strong typing is the opt-in
NetworkDefinitionCreationFlag.STRONGLY_TYPED, on 11.x that flag is accepted and ignored, so passing
it is right on both. An fp16 engine is therefore built from an fp16 export. fp32 engines are built
without TF32, so that they compute in fp32 like the reference.

Engine cache: each engine's key is a sha256 over its ONNX graph and weights, its input shape profile,
the precision, the workspace limit, the TensorRT version and the GPU's compute capability. The key
is recorded in gptdeploy.json under "engines"; an engine whose key no longer matches (new graph,
other GPU, other TensorRT) or that TensorRT cannot load is rebuilt, never trusted. A timing cache per
TensorRT version and GPU lives beside the engines and makes rebuilds faster.

Only `ensure_engines`, `build_engine` and `load_engine` import tensorrt (and torch, for the GPU's
identity); shape profiles, keys and manifest entries are plain Python.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from exporters.files import sha256_file
from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import MANIFEST, NO_PAST, PRECISION_SUFFIXES, WITH_PAST, ExportFolder

ENGINE_DIR = "trt"
PREFILL, DECODE = "prefill", "decode"
ENGINE_GRAPHS = {PREFILL: NO_PAST, DECODE: WITH_PAST}  # engine name -> the graph it is built from
DEFAULT_WORKSPACE_GIB = 4.0
# Bump when something that shapes an engine changes without entering the key (builder flags, say).
KEY_VERSION = 1
TRT_INSTALL = ("pip install 'gptdeploy[trt]' (TensorRT's wheels come from NVIDIA's package index, "
               "pypi.nvidia.com, which pip must be able to reach)")


class Range(NamedTuple):
    """One dimension of an optimization profile: TensorRT tunes for opt and accepts min..max."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class EngineSettings:
    """What the user chooses about the engines: the shapes they accept and the workspace limit."""

    batch: Range  # rows per step
    sequence: Range  # prompt tokens of a prefill (past length 0)
    past: Range  # cached positions before a decode step of one new token
    workspace_gib: float = DEFAULT_WORKSPACE_GIB

    def to_dict(self) -> dict:
        return {"batch": list(self.batch), "sequence": list(self.sequence), "past": list(self.past),
                "workspace_gib": self.workspace_gib}

    @classmethod
    def from_dict(cls, d: dict) -> EngineSettings:
        return cls(Range(*d["batch"]), Range(*d["sequence"]), Range(*d["past"]), d["workspace_gib"])


def default_ranges(block_size: int) -> dict[str, Range]:
    """Profiles that cover the whole context, tuned for single-row generation of mid-length text."""
    return {
        "batch": Range(1, 1, 8),
        "sequence": Range(1, max(1, block_size // 8), block_size),
        "past": Range(1, max(1, block_size // 4), block_size - 1),
    }


def make_settings(block_size: int, *, batch=(None, None, None), sequence=(None, None, None),
                  past=(None, None, None), workspace_gib: float | None = None) -> EngineSettings:
    """Settings from (min, opt, max) options, None where the user gave none.

    Defaults come from block_size; an unset value is fitted inside the given ones (--min-batch 4
    alone moves opt and max up to 4, not into an error), but explicit contradictions are errors.
    """
    defaults = default_ranges(block_size)
    ranges = {}
    for name, given in (("batch", batch), ("sequence", sequence), ("past", past)):
        lo, opt, hi = given
        d = defaults[name]
        hi = hi if hi is not None else max(d.max, lo or 0, opt or 0)
        lo = lo if lo is not None else min(d.min, opt or hi, hi)
        opt = opt if opt is not None else min(max(d.opt, lo), hi)
        if not 1 <= lo <= opt <= hi:
            raise GptDeployError(f"{name} profile: need 1 <= min <= opt <= max, got min {lo}, opt {opt}, max {hi}")
        ranges[name] = Range(lo, opt, hi)
    if ranges["sequence"].max > block_size:
        raise GptDeployError(f"sequence max {ranges['sequence'].max} exceeds the model's context "
                             f"(block_size {block_size})")
    if ranges["past"].max > block_size - 1:
        raise GptDeployError(f"past max {ranges['past'].max} leaves no room for the new token: "
                             f"at most block_size - 1 = {block_size - 1}")
    workspace_gib = DEFAULT_WORKSPACE_GIB if workspace_gib is None else workspace_gib
    if not workspace_gib > 0:
        raise GptDeployError(f"workspace must be more than 0 GiB, got {workspace_gib}")
    return EngineSettings(**ranges, workspace_gib=workspace_gib)


def profile_shapes(graph: dict, engine: str, settings: EngineSettings) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every input of a graph, from its symbolic shapes in the manifest.

    `graph` is the manifest's "graphs" entry (inputs with dims such as "batch_size" or
    "past_sequence_length + sequence_length"). Each of the three points sets every dimension at
    once, so the shapes agree with each other (the attention mask is always past + new tokens).
    """
    points = []
    for k in range(3):
        if engine == PREFILL:
            dims = {"sequence_length": settings.sequence[k], "past_sequence_length": 0}
        else:
            dims = {"sequence_length": 1, "past_sequence_length": settings.past[k]}
        points.append({"batch_size": settings.batch[k], **dims})
    return {
        spec["name"]: tuple(tuple(_dim_value(d, dims, spec["name"]) for d in spec["shape"]) for dims in points)
        for spec in graph["inputs"]
    }


def _dim_value(dim: int | str, values: dict[str, int], tensor: str) -> int:
    if isinstance(dim, int):
        return dim
    total = 0
    for term in str(dim).split("+"):
        term = term.strip()
        if term.isdigit():
            total += int(term)
        elif term in values:
            total += values[term]
        else:
            raise GptDeployError(f"input {tensor} has a dimension {dim!r} that this gptdeploy does not know")
    return total


@dataclass(frozen=True)
class EngineSpec:
    """Everything that determines one engine, known before it is built; its key identifies it."""

    engine: str  # PREFILL or DECODE
    graph_file: str  # the ONNX graph, relative to the folder
    graph_sha256: tuple[str, ...]  # of the graph file and of its external weights, if any
    shapes: dict[str, tuple[tuple[int, ...], ...]]  # input name -> (min, opt, max)
    precision: str
    settings: EngineSettings
    tensorrt: str  # TensorRT version
    compute_capability: str  # e.g. "9.0"

    @property
    def file(self) -> str:
        return f"{ENGINE_DIR}/{self.engine}{PRECISION_SUFFIXES[self.precision]}.engine"

    @property
    def timing_cache_file(self) -> str:
        # one per TensorRT version and GPU: a timing cache from another one is of no use to this build
        return f"{ENGINE_DIR}/timing-trt{self.tensorrt}-sm{self.compute_capability.replace('.', '')}.cache"

    @property
    def key(self) -> str:
        payload = {
            "key_version": KEY_VERSION, "graph_sha256": list(self.graph_sha256), "shapes": self._shapes_json(),
            "precision": self.precision, "workspace_gib": self.settings.workspace_gib,
            "tensorrt": self.tensorrt, "compute_capability": self.compute_capability,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _shapes_json(self) -> dict:
        return {name: {"min": list(lo), "opt": list(opt), "max": list(hi)}
                for name, (lo, opt, hi) in self.shapes.items()}

    def manifest_entry(self, size: int, build_seconds: float, gpu: str) -> dict:
        """The manifest's "engines" entry for this engine once built."""
        return {
            "file": self.file, "graph": ENGINE_GRAPHS[self.engine], "onnx": self.graph_file,
            "graph_sha256": list(self.graph_sha256), "precision": self.precision, "key": self.key,
            "tensorrt": self.tensorrt, "compute_capability": self.compute_capability, "gpu": gpu,
            "settings": self.settings.to_dict(), "profile": self._shapes_json(), "bytes": size,
            "build_seconds": round(build_seconds, 1),
            "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def stale_reason(self, entry: dict | None, folder: Path) -> str | None:
        """Why the recorded engine cannot serve this spec, in words; None when it can."""
        if entry is None:
            return "none built yet"
        if not (folder / entry["file"]).is_file():
            return f"{entry['file']} is missing"
        if entry.get("key") == self.key:
            if (folder / entry["file"]).stat().st_size != entry.get("bytes"):
                return f"{entry['file']} changed since it was built"
            return None
        if entry.get("graph_sha256") != list(self.graph_sha256):
            return "the ONNX graph changed since it was built"
        for field, now in (("tensorrt", self.tensorrt), ("compute_capability", self.compute_capability),
                           ("precision", self.precision)):
            if entry.get(field) != now:
                return f"built for {field.replace('_', ' ')} {entry.get(field)}, this is {now}"
        if entry.get("profile") != self._shapes_json():
            return "built for other input shapes"
        return "built with other settings"


def engine_spec(folder: ExportFolder, engine: str, settings: EngineSettings, tensorrt: str,
                compute_capability: str) -> EngineSpec:
    """The spec of one engine of an export folder (hashes its graph and weights: seconds for gpt2)."""
    role = ENGINE_GRAPHS[engine]
    graph = folder.manifest["graphs"].get(role)
    if graph is None:
        raise GptDeployError(f"{folder.path} has no {role} graph, which the {engine} engine is built from; "
                             "export it again with this gptdeploy")
    files = [graph["file"]] + ([graph["external_data"]] if graph.get("external_data") else [])
    return EngineSpec(
        engine=engine, graph_file=graph["file"], graph_sha256=tuple(sha256_file(folder.path / f) for f in files),
        shapes=profile_shapes(graph, engine, settings), precision=folder.precision, settings=settings,
        tensorrt=tensorrt, compute_capability=compute_capability,
    )


def recorded_settings(folder: ExportFolder) -> EngineSettings | None:
    """The settings the folder's engines were built with, if it has any."""
    entries = folder.manifest.get("engines") or {}
    for engine in (PREFILL, DECODE):
        if engine in entries:
            return EngineSettings.from_dict(entries[engine]["settings"])
    return None


def write_atomic(path: Path, chunks) -> str:
    """Writes `chunks` (bytes-like objects) to a temporary file beside `path`, renames it onto `path`
    and returns the sha256 of what was written. Nothing half-written is ever left at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                h.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return h.hexdigest()


def record_in_manifest(folder: Path, engines: dict[str, dict], files: dict[str, str]) -> dict:
    """Adds engine entries and the sha256 of new or rewritten files to gptdeploy.json; returns it."""
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.setdefault("engines", {}).update(engines)
    manifest.setdefault("files", {}).update(files)
    manifest["files"] = dict(sorted(manifest["files"].items()))
    write_atomic(path, [(json.dumps(manifest, indent=2) + "\n").encode()])
    return manifest


# --- what needs TensorRT and a GPU ------------------------------------------------------------


def gpu_missing() -> str | None:
    """Why torch sees no CUDA GPU here, in words, or None if it sees one."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return "no CUDA GPU (this torch is a CPU-only build; a CUDA build of torch is needed to see one)"
    return "no CUDA GPU visible (torch.cuda.is_available() is False)"


def tensorrt_missing() -> str | None:
    """What keeps TensorRT engines from being built or run here, as one line, or None."""
    problems = []
    if gpu := gpu_missing():
        problems.append(gpu)
    if importlib.util.find_spec("tensorrt") is None:
        problems.append(f"tensorrt is not installed: {TRT_INSTALL}")
    if problems:
        return "TensorRT cannot run here: " + "; ".join(problems)
    return None


def import_tensorrt():
    """The tensorrt module, or one GptDeployError that says what is missing."""
    if problem := tensorrt_missing():
        raise GptDeployError(problem)
    import tensorrt as trt

    return trt


def gpu_identity() -> tuple[str, str]:
    """(compute capability such as "9.0", GPU name) of the current CUDA device."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}", torch.cuda.get_device_name()


def make_logger(trt):
    """A TensorRT logger that keeps errors for our error messages instead of printing them;
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

    return Logger()


def _progress_monitor(trt, progress):
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
                self.tasks[phase_name] = (progress.add_task("  " * depth + phase_name, total=num_steps), depth)
            except KeyboardInterrupt:
                self.cancelled = True
            except Exception:  # noqa: BLE001 - a display problem must not break the build
                pass

        def step_complete(self, phase_name, step):
            try:
                progress.update(self.tasks[phase_name][0], completed=step + 1)
            except KeyboardInterrupt:
                self.cancelled = True
            except Exception:  # noqa: BLE001
                pass
            return not self.cancelled  # False asks TensorRT to cancel the build

        def phase_finish(self, phase_name):
            try:
                progress.remove_task(self.tasks.pop(phase_name)[0])
            except KeyboardInterrupt:
                self.cancelled = True
            except Exception:  # noqa: BLE001
                pass

    return Monitor()


def build_engine(trt, folder: Path, spec: EngineSpec, console) -> tuple[dict, dict[str, str]]:
    """Builds one engine into the folder; returns its manifest entry and {file: sha256} written."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    logger = make_logger(trt)
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
    blob = timing_path.read_bytes() if timing_path.is_file() else b""
    timing_cache = config.create_timing_cache(blob) if blob else None
    if timing_cache is None:  # none yet, or unreadable: start an empty one
        timing_cache = config.create_timing_cache(b"")
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    logger.errors.clear()  # a rejected timing cache is not the reason a build fails

    started = time.perf_counter()
    label = f"building the {spec.engine} engine from {spec.graph_file}"
    if hasattr(trt, "IProgressMonitor"):
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            progress.add_task(label, total=None)
            monitor = _progress_monitor(trt, progress)
            config.progress_monitor = monitor
            serialized = builder.build_serialized_network(network, config)
        if serialized is None and monitor.cancelled:
            raise KeyboardInterrupt
    else:
        with console.status(label + " (this takes minutes)"):
            serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        reason = logger.errors[0] if logger.errors else "no reason given"
        raise GptDeployError(f"TensorRT {trt.__version__} could not build the {spec.engine} engine: {reason}")
    seconds = time.perf_counter() - started

    written = {spec.file: write_atomic(folder / spec.file, [memoryview(serialized)])}
    written[spec.timing_cache_file] = write_atomic(timing_path, [memoryview(config.get_timing_cache().serialize())])
    entry = spec.manifest_entry(size=(folder / spec.file).stat().st_size, build_seconds=seconds, gpu=gpu_identity()[1])
    return entry, written


def ensure_engines(folder: ExportFolder, settings: EngineSettings | None = None, *, force: bool = False,
                   console=None) -> dict[str, Path]:
    """The folder's prefill and decode engines, reused when their key matches, else (re)built.

    settings: None reuses the settings the engines were last built with, or the defaults.
    Returns engine name -> engine file. Updates folder.manifest.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    trt = import_tensorrt()
    compute_capability, gpu = gpu_identity()
    settings = settings or recorded_settings(folder) or make_settings(folder.config["block_size"])
    for engine in (PREFILL, DECODE):
        spec = engine_spec(folder, engine, settings, trt.__version__, compute_capability)
        entry = (folder.manifest.get("engines") or {}).get(engine)
        reason = "rebuild asked for" if force else spec.stale_reason(entry, folder.path)
        if reason is None:
            console.print(f"TensorRT: using the cached {engine} engine {spec.file} "
                          f"(built {entry['built']}, TensorRT {entry['tensorrt']}, {entry['gpu']})")
            continue
        if not os.access(folder.path, os.W_OK):
            raise GptDeployError(f"the {engine} engine must be built ({reason}) but {folder.path} is not writable")
        console.print(f"TensorRT {trt.__version__}: building the {engine} engine for {gpu} ({reason}); "
                      "this takes minutes")
        entry, written = build_engine(trt, folder.path, spec, console)
        folder.manifest = record_in_manifest(folder.path, {engine: entry}, written)
        console.print(f"TensorRT: wrote {spec.file} ({entry['bytes'] / 2**20:.1f} MiB) in {entry['build_seconds']} s")
    return {engine: folder.path / folder.manifest["engines"][engine]["file"] for engine in (PREFILL, DECODE)}


def load_engine(trt, path: Path, logger):
    """(runtime, engine) deserialized from an engine file; engine is None when TensorRT cannot load it
    (a corrupt file, or one from another TensorRT). The runtime must outlive the engine."""
    runtime = trt.Runtime(logger)
    return runtime, runtime.deserialize_cuda_engine(path.read_bytes())
