"""TensorRT engine settings as an export folder records them: shape profiles, cache keys, staleness.

Pure Python, no TensorRT: the builder (gptdeploy.exporters.tensorrt), the runtimes that run engines
(trt, ort-trt) and the application that decides when to build all read them from here.

Each engine's key is a sha256 over its ONNX graph and weights, its input shape profile, the
precision, the workspace limit, the TensorRT version, the GPU's compute capability and its name
(an engine is built for one device: an H100 and an H200 share compute capability 9.0). The key is
recorded in gptdeploy.json under "engines"; an engine whose key no longer matches (new graph, other
GPU, other TensorRT) is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import (
    DECODE, ENGINE_DIR, ENGINE_GRAPHS, PREFILL, ExportFolder, data_files, engine_file,
)
from gptdeploy.files import sha256_file

DEFAULT_WORKSPACE_GIB = 4.0
# Bump when something that shapes an engine changes without entering the key (builder flags, say).
KEY_VERSION = 2


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
    gpu: str  # the device's name, e.g. "NVIDIA H200"

    @property
    def file(self) -> str:
        return engine_file(self.engine, self.precision)

    @property
    def timing_cache_file(self) -> str:
        # one per TensorRT version and GPU: a timing cache from another one is of no use to this build
        return f"{ENGINE_DIR}/timing-trt{self.tensorrt}-sm{self.compute_capability.replace('.', '')}.cache"

    @property
    def key(self) -> str:
        payload = {
            "key_version": KEY_VERSION, "graph_sha256": list(self.graph_sha256), "shapes": self._shapes_json(),
            "precision": self.precision, "workspace_gib": self.settings.workspace_gib,
            "tensorrt": self.tensorrt, "compute_capability": self.compute_capability, "gpu": self.gpu,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _shapes_json(self) -> dict:
        return {name: {"min": list(lo), "opt": list(opt), "max": list(hi)}
                for name, (lo, opt, hi) in self.shapes.items()}

    def manifest_entry(self, size: int, build_seconds: float) -> dict:
        """The manifest's "engines" entry for this engine once built."""
        return {
            "file": self.file, "graph": ENGINE_GRAPHS[self.engine], "onnx": self.graph_file,
            "graph_sha256": list(self.graph_sha256), "precision": self.precision, "key": self.key,
            "tensorrt": self.tensorrt, "compute_capability": self.compute_capability, "gpu": self.gpu,
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
                           ("gpu", self.gpu), ("precision", self.precision)):
            if entry.get(field) != now:
                return f"built for {field.replace('_', ' ')} {entry.get(field)}, this is {now}"
        if entry.get("profile") != self._shapes_json():
            return "built for other input shapes"
        return "built with other settings"


def engine_spec(folder: ExportFolder, engine: str, settings: EngineSettings, tensorrt: str,
                compute_capability: str, gpu: str) -> EngineSpec:
    """The spec of one engine of an export folder (hashes its graph and weights: seconds for gpt2)."""
    role = ENGINE_GRAPHS[engine]
    graph = folder.manifest["graphs"].get(role)
    if graph is None:
        raise GptDeployError(f"{folder.path} has no {role} graph, which the {engine} engine is built from; "
                             "export it again with this gptdeploy")
    files = [graph["file"], *data_files(graph)]
    return EngineSpec(
        engine=engine, graph_file=graph["file"], graph_sha256=tuple(sha256_file(folder.path / f) for f in files),
        shapes=profile_shapes(graph, engine, settings), precision=folder.precision, settings=settings,
        tensorrt=tensorrt, compute_capability=compute_capability, gpu=gpu,
    )


def recorded_settings(folder: ExportFolder) -> EngineSettings | None:
    """The settings the folder's engines were built with, if it has any."""
    entries = folder.manifest.get("engines") or {}
    for engine in (PREFILL, DECODE):
        if engine in entries:
            return EngineSettings.from_dict(entries[engine]["settings"])
    return None


