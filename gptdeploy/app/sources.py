"""From a source to a runner: the one place that turns what a user names into something a runtime runs.

    runner, tokenizer = open_runner("ort", "out/tiny")                # an export folder
    runner, tokenizer = open_runner("torch", "gpt2", precision="fp16", device="cuda")
    runner, tokenizer = open_runner("ort", "gpt2")                    # exported once into the export cache
    runner, tokenizer = open_runner("ort", "gpt2", variant="q4")      # + its ONNX Runtime variant, made once
    runner, tokenizer = open_runner("trt", "out/gpt2")                # + its TensorRT engines, built once

A source is an export folder, or anything gptdeploy.load takes. What the runtime needs and the source
lacks is made first, in this order: the export (the export cache), the variant, the engines. The
runtime then opens what exists (gptdeploy.runtimes.registry). --precision and --variant are
resolved once, by gptdeploy.precision.resolve.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from gptdeploy.app.export_cache import ExportCache
from gptdeploy.app.exporting import ensure_engines, ensure_variants
from gptdeploy.errors import EngineUnusable, GptDeployError
from gptdeploy.export_folder import ExportFolder, files_used, is_export_folder, read_export, verify
from gptdeploy.precision import CHECKPOINT, EXPORT, Resolved, resolve
from gptdeploy.progress import QUIET, Progress
from gptdeploy.runtimes.base import OpenOptions, Runner
from gptdeploy.runtimes.registry import RuntimeSpec, require
from gptdeploy.tokenizer import Tokenizer


def open_runner(
    name: str,
    source: str | Path,
    *,
    precision: str | None = None,
    variant: str | None = None,
    device: str | None = None,
    threads: int = 0,
    optimization: str = "all",
    huge_pages: bool = False,
    weights: str | None = None,
    weights_seed: int = 0,
    cache: ExportCache | None = None,
    progress: Progress = QUIET,
) -> tuple[Runner, Tokenizer]:
    """A runner of runtime `name` for `source`, and the model's tokenizer.

    source: an export folder, or anything gptdeploy.load takes (with weights="random" and weights_seed
        for a preset's architecture with random weights).
    precision, variant: see gptdeploy.precision.resolve (torch: fp32, fp16, bf16; ONNX runtimes: the
        export's precision, or int8 / int4 / fp32-fused for those variants).
    device: torch: "cpu" (default), "cuda", "cuda:1", ...; ort-cuda, trt, ort-trt: "cuda:N" picks the GPU.
    threads, optimization: ONNX Runtime's intra-op threads (0: its default) and graph optimization level.
    huge_pages: ONNX Runtime on CPU moves the session's weights into huge pages once loaded
        (gptdeploy.runtimes.hugepages): faster steps, slower to open.
    cache: where checkpoints are exported for the ONNX runtimes (default: ExportCache()).
    """
    spec = require(name)
    options = OpenOptions(device=device, variant=None, threads=threads, optimization=optimization,
                          huge_pages=huge_pages)
    options.check_huge_pages(name)
    cache = cache or ExportCache()
    if is_export_folder(Path(source)):
        return _open_export_folder(spec, read_export(source), precision, variant, options, cache, progress)
    if spec.runs == CHECKPOINT:
        resolved = resolve(CHECKPOINT, precision, variant, runtime=name)
        return _open_checkpoint(spec, source, resolved, options, weights, weights_seed)

    from gptdeploy.loading import load

    resolved = resolve(EXPORT, precision, variant, runtime=name, runs_variants=spec.runs_variants)
    loaded = load(source, weights=weights, seed=weights_seed, progress=progress)
    folder = cache.export(loaded, resolved.export_precision, progress)
    if resolved.variant is not None:  # made once in the cached export, validated against the checkpoint
        folder = ensure_variants(folder, [resolved.variant], reference=loaded.model, progress=progress)
    return _open_folder(spec, folder, resolved, options, cache, progress), folder.tokenizer()


def _open_export_folder(spec: RuntimeSpec, folder: ExportFolder, precision, variant, options, cache, progress):
    if spec.runs == CHECKPOINT:
        exported_from = folder.source.get("source", "its checkpoint")
        raise GptDeployError(f"the {spec.name} runtime runs a checkpoint, and {folder.path} is an export folder "
                             f"(ONNX graphs, no torch weights); pass the checkpoint or preset it was exported from "
                             f"({exported_from})")
    resolved = resolve(EXPORT, precision, variant, runtime=spec.name, runs_variants=spec.runs_variants,
                       folder_precision=folder.precision, folder_variants=folder.variants)
    if resolved.variant is not None:
        folder.variant(resolved.variant)  # one clear error if the folder does not hold it
    return _open_folder(spec, folder, resolved, options, cache, progress), folder.tokenizer()


@dataclass(frozen=True)
class Checkpoint:
    """What gptdeploy.load takes to give a model's weights: a source, and random weights' seed if any."""

    source: str
    random_seed: int | None = None

    @property
    def weights(self) -> str | None:
        return None if self.random_seed is None else "random"

    def load(self, **options):
        from gptdeploy.loading import load

        return load(self.source, weights=self.weights, seed=self.random_seed or 0, **options)


PARITY_ADVICE = ("; pass the checkpoint or preset it was exported from as SOURCE and the folder with --export, or "
                 "compare ONNX runtimes only (--reference ort)")
BENCH_ADVICE = "; pass the checkpoint or preset it was exported from as SOURCE to measure torch and hf"


def checkpoint_of(folder: ExportFolder, progress: Progress = QUIET, advice: str = PARITY_ADVICE) -> Checkpoint:
    """The checkpoint an export folder was made from, when it is still there with the same weights (sha256);
    otherwise one GptDeployError that says what is wrong, then `advice`: what to pass instead."""
    import re

    from gptdeploy.loading import random_fingerprint
    from gptdeploy.presets import PRESETS

    recorded = folder.source
    source, origin = str(recorded.get("source", "")), str(recorded.get("origin", "its checkpoint"))
    seed = recorded.get("random_seed")
    if seed is None and origin.startswith("random weights") and (found := re.search(r"seed (\d+)", origin)):
        seed = int(found.group(1))  # exports made before the manifest recorded the seed
    what = f"{folder.path} was exported from {source or 'an unknown source'} ({origin})"
    if seed is not None:
        if source in PRESETS and random_fingerprint(source, seed) == recorded.get("sha256"):
            return Checkpoint(source, seed)
        raise GptDeployError(f"{what}, whose random weights gptdeploy cannot make again{advice}")
    checkpoint = Checkpoint(source)
    try:
        loaded = checkpoint.load(progress=progress)
    except GptDeployError as e:
        raise GptDeployError(f"{what}, which cannot be loaded now ({e}){advice}") from None
    if loaded.fingerprint != recorded.get("sha256"):
        raise GptDeployError(f"{what}, whose weights have changed since (their sha256 differs){advice}")
    return checkpoint


def _open_checkpoint(spec: RuntimeSpec, source, resolved: Resolved, options: OpenOptions, weights, weights_seed):
    import torch

    from gptdeploy.environment import torch_sees_cuda
    from gptdeploy.loading import load

    device = options.device or "cpu"
    if device.startswith("cuda") and not torch_sees_cuda():
        raise GptDeployError(f"device {device!r}: this PyTorch ({torch.__version__}) sees no CUDA GPU")
    loaded = load(source, weights=weights, seed=weights_seed, dtype=resolved.precision, device=device)
    return spec.open(loaded.model, options), loaded.tokenizer


def _open_folder(spec: RuntimeSpec, folder: ExportFolder, resolved: Resolved, options: OpenOptions,
                 cache: ExportCache, progress: Progress) -> Runner:
    """The runtime on the folder, every file it reads verified against the manifest first."""
    options = replace(options, variant=resolved.variant)
    verify(folder, files_used(folder, variant=resolved.variant, graphs=spec.graphs), memo=cache.memo())
    if not spec.needs_engines:
        return spec.open(folder, options)
    folder = ensure_engines(folder, progress=progress)
    verify(folder, files_used(folder, engines=True), memo=cache.memo())
    try:
        return spec.open(folder, options)
    except EngineUnusable as e:  # built, but TensorRT cannot load it (corrupt, another build): rebuild it alone
        progress.note(f"TensorRT: {e}; rebuilding the {e.engine} engine")
        folder = ensure_engines(folder, force=True, only=(e.engine,), progress=progress)
        return spec.open(folder, options)
