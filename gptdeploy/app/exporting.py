"""Making what the runtimes run: an export folder, its ONNX Runtime variants, its TensorRT engines.

    result = export_model(gptdeploy.load("gpt2"), "gpt2-onnx", precision="fp16")
    optimize_export("gpt2-onnx", ["fp32-fused", "q4"])
    ensure_engines(read_export("gpt2-onnx"))

Each composes an exporter (gptdeploy.exporters) with the validation (gptdeploy.app.validation: parity
of ONNX Runtime against the reference) and the export-folder format's atomic writing
(gptdeploy.export_folder, gptdeploy.files), in that order: nothing is written where a reader would
see it before it has been validated.

An export is assembled in a hidden folder beside its destination (.NAME.<pid>-<random>.partial),
validated, its manifest written last, and moved into place whole. Variants are staged inside the
export (.optimize-...), validated, moved into onnx/, and recorded in the manifest last.
"""

from __future__ import annotations

import copy
import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gptdeploy
from gptdeploy.app.validation import validate_export, validate_variant
from gptdeploy.engines import EngineSettings, engine_spec, make_settings, recorded_settings
from gptdeploy.environment import gpu_identity, import_tensorrt
from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import (
    DECODE, FORMAT, FORMAT_VERSION, NO_PAST, PREFILL, VARIANTS, WITH_PAST, ExportFolder, check_destination, data_files,
    files_used,
    now, read_export, update_manifest, verify, write_manifest,
)
from gptdeploy.files import deferred_signals, remove_leftovers, replace_folder, sha256_file, staging_folder
from gptdeploy.progress import QUIET, Progress
from gptdeploy.steps import prefill_inputs

if TYPE_CHECKING:
    from gptdeploy.loading import LoadedModel


@dataclass
class ExportResult:
    path: Path  # the export folder
    manifest: dict  # what gptdeploy.json holds
    size_bytes: int  # all files of the folder
    seconds: float  # the whole export, validation included

    @property
    def validation(self) -> dict:
        return self.manifest["validation"]


def export_model(loaded: LoadedModel, out_dir: str | Path, *, precision: str = "fp32", opset: int | None = None,
                 force: bool = False, external_data: bool | None = None, progress: Progress = QUIET) -> ExportResult:
    """Exports `loaded` into the folder `out_dir` (see gptdeploy.export_folder for its layout).

    precision: "fp32" or "fp16" (graphs in fp16 keep LayerNorms and the logits in fp32).
    opset: the ONNX opset of the graphs, gptdeploy.exporters.onnx_export.DEFAULT_OPSET when None.
    force: replace an existing export folder at out_dir.
    external_data: the weights in one file that the graphs share (onnx/model.onnx_data), or inside each
        graph (False); None decides by size (gptdeploy.exporters.onnx_export.EXTERNAL_FROM).
    Raises GptDeployError for bad arguments, an unwritable or occupied destination, and a failed validation.
    """
    import torch

    from gptdeploy.exporters import onnx_export

    start = time.perf_counter()
    onnx_export.check_precision(precision)
    opset = onnx_export.DEFAULT_OPSET if opset is None else opset
    onnx_export.check_opset(opset)
    out_dir = Path(out_dir).expanduser().absolute()
    remove_leftovers(out_dir.parent)  # what killed runs left beside it (their own hidden names only)
    if out_dir.is_dir():
        remove_leftovers(out_dir)
    check_destination(out_dir, force)

    reference = loaded.model
    if next(reference.parameters()).dtype != torch.float32 or next(reference.parameters()).device.type != "cpu":
        reference = copy.deepcopy(reference).float().cpu()
    reference.eval()
    try:
        with staging_folder(out_dir) as tmp:
            shared = onnx_export.uses_external_data(reference, precision, external_data)
            specs = onnx_export.write_graphs(reference, tmp, precision=precision, opset=opset, progress=progress,
                                             external_data=shared)
            with progress.step("Writing config.json, generation_config.json and the tokenizer"):
                tokenizer_spec = onnx_export.write_side_files(loaded, tmp, precision, external_data=shared)
            with progress.step("Checking the graphs (onnx.checker, shape inference)"):
                onnx_export.check_graphs(tmp, specs)
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "gptdeploy_version": gptdeploy.__version__,
                "created": now(), "source": loaded.source_record(),
                "config": loaded.config.to_dict(), "precision": precision, "opset": opset,
                "versions": onnx_export.versions(), "tokenizer": tokenizer_spec,
                "fp16_kept_in_fp32": onnx_export.graphs.FP16_KEPT_IN_FP32 if precision == "fp16" else [],
                "graphs": specs,
            }
            with progress.step("Validating in ONNX Runtime against the reference model"):
                report = validate_export(ExportFolder(tmp, manifest), reference, loaded.tokenizer)
            if not report.passed:
                raise GptDeployError(f"export failed validation, nothing written: {report.failures()}")
            manifest["validation"] = report.to_dict()
            if precision == "fp16":  # the reference's headroom, on the sequences the validation ran
                manifest["validation"]["fp16_ranges"] = onnx_export.fp16_ranges(
                    reference, *prefill_inputs(report.sequences))
            manifest = write_manifest(tmp, manifest)
            replace_folder(tmp, out_dir)
    except OSError as e:
        raise GptDeployError(f"cannot write the export folder {out_dir}: {e.strerror or e}") from e
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    return ExportResult(out_dir, manifest, size, time.perf_counter() - start)


# --- ONNX Runtime variants -------------------------------------------------------------------------


@dataclass
class OptimizeResult:
    folder: ExportFolder  # as it is after the manifest was written
    written: list[str]  # the variants made now
    kept: list[str]  # the variants asked for that the folder already held
    seconds: float


def optimize_export(folder: ExportFolder | str | Path, variants=None, *, reference=None,
                    quantization: dict | None = None, force: bool = False, progress: Progress = QUIET) -> OptimizeResult:
    """Writes the ONNX Runtime `variants` of an fp32 export folder into it (gptdeploy.exporters.ort_variants).

    reference: the PyTorch model (gptdeploy.GPT) the folder was exported from, to validate against;
        None validates against the folder's own model.onnx in ONNX Runtime.
    quantization: per quantized variant (int8, q4), QuantSettings in place of the defaults.
    force: make again the variants the folder already holds (otherwise they are kept as they are, unless
        a quantized one was made with other settings than those asked for now: then it is made again).
    Raises GptDeployError for a folder that is not an fp32 export, bad settings, or a variant that fails
    its validation (then nothing is written).
    """
    from gptdeploy.exporters import ort_variants

    start = time.perf_counter()
    folder = folder if isinstance(folder, ExportFolder) else read_export(folder)
    names = ort_variants.check_variants(variants or ort_variants.DEFAULT_VARIANTS)
    if folder.precision != "fp32":
        raise GptDeployError(f"{folder.path} is an {folder.precision} export; variants are made from an fp32 "
                             f"export (gptdeploy export SOURCE --precision fp32), fp16 included")
    quantization = {**ort_variants.DEFAULT_QUANTIZATION, **(quantization or {})}
    for settings in quantization.values():
        settings.check()
    kept = [n for n in names if n in folder.variants and not force
            and _same_quantization(folder.variants[n], quantization.get(n))]
    todo = [n for n in names if n not in kept]
    if not todo:
        return OptimizeResult(folder, [], kept, time.perf_counter() - start)

    verify(folder, files_used(folder))  # the graph the variants are made from, as it was written
    tokenizer = folder.tokenizer()
    try:
        remove_leftovers(folder.path)
        with staging_folder(folder.path / ".optimize") as tmp:
            with progress.step(f"Fusing {folder.graph_path(WITH_PAST).relative_to(folder.path)} for ONNX Runtime"):
                fused, fusions = ort_variants.fused_graph(folder)
            entries = {}
            for name in todo:
                variant = VARIANTS[name]
                with progress.step(f"Writing {variant.file} ({variant.summary})"):
                    entry = ort_variants.write_variant(fused, fusions, name, folder, tmp, quantization.get(name))
                staged = ExportFolder(tmp, {**folder.manifest, "variants": {name: entry}})
                against = "PyTorch model" if reference is not None else "portable model.onnx"
                with progress.step(f"Validating {variant.file} in ONNX Runtime against the {against}"):
                    validation = validate_variant(folder, staged, name, reference, tokenizer)
                for relative in data_files(entry):  # the export's shared weights, linked in for the validation
                    if relative in folder.manifest["files"]:
                        (tmp / relative).unlink(missing_ok=True)
                if not validation["passed"]:
                    failures = "; ".join(g.get("failures", "") for g in validation["graphs"].values())
                    raise GptDeployError(f"variant {name} failed validation, nothing written: {failures}")
                entries[name] = {**entry, "validation": validation}
                gc.collect()  # the variant's graph and sessions: gone before the next one is built
            folder = _move_variants_into_place(tmp, folder, entries)
    except OSError as e:
        raise GptDeployError(f"cannot write the variants into {folder.path}: {e.strerror or e}") from e
    return OptimizeResult(folder, todo, kept, time.perf_counter() - start)


def _same_quantization(entry: dict, settings) -> bool:
    """Whether a variant the folder holds was quantized as `settings` asks (True for unquantized ones)."""
    if settings is None:
        return True
    recorded = entry.get("quantization") or {}
    return all(recorded.get(k) == getattr(settings, k) for k in ("bits", "block_size", "symmetric", "accuracy_level"))


def _move_variants_into_place(tmp: Path, folder: ExportFolder, entries: dict[str, dict]) -> ExportFolder:
    """The variant files into onnx/ (renames), then the manifest, rewritten last. Hashed before; Ctrl-C and
    SIGTERM wait for the renames and the manifest (only a SIGKILL in between leaves files it does not list)."""
    import onnxruntime
    import onnxscript

    # every file staged for the variants, those that replace a variant's old file included; the export's shared
    # weights, which the variants reference, are in place already (their links were removed from the stage)
    staged = {relative: sha256_file(tmp / relative) for entry in entries.values()
              for relative in (entry["file"], *data_files(entry)) if (tmp / relative).is_file()}
    variants = {**folder.variants, **entries}
    with deferred_signals():
        for relative in staged:
            os.replace(tmp / relative, folder.path / relative)
        return update_manifest(folder, {
            "variants": {name: variants[name] for name in VARIANTS if name in variants},
            "versions": {"onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__},
            "optimized": now(),
        }, staged)


def ensure_variants(folder: ExportFolder, variants, *, reference=None, progress: Progress = QUIET) -> ExportFolder:
    """The export folder with `variants` made now if it lacks them (the export cache's way)."""
    return optimize_export(folder, variants, reference=reference, progress=progress).folder


# --- TensorRT engines ------------------------------------------------------------------------------


def ensure_engines(folder: ExportFolder, settings: EngineSettings | None = None, *, force: bool = False,
                   only: tuple[str, ...] = (PREFILL, DECODE), progress: Progress = QUIET) -> ExportFolder:
    """The folder with its prefill and decode engines, reused when their key matches, else (re)built.

    settings: None reuses the settings the engines were last built with, or the defaults.
    only: the engines to look at (a rebuild of one engine the runtime could not load).
    Returns the folder as it now is; the caller's ExportFolder is not changed.
    """
    from gptdeploy.exporters.tensorrt import build_engine

    trt = import_tensorrt()
    compute_capability, gpu = gpu_identity()
    verify(folder, files_used(folder, graphs=(NO_PAST, WITH_PAST)))
    settings = settings or recorded_settings(folder) or make_settings(folder.config["block_size"])
    for engine in only:
        spec = engine_spec(folder, engine, settings, trt.__version__, compute_capability, gpu)
        entry = folder.engines.get(engine)
        reason = "rebuild asked for" if force else spec.stale_reason(entry, folder.path)
        if reason is None:
            progress.note(f"TensorRT: using the cached {engine} engine {spec.file} (built {entry['built']}, "
                          f"TensorRT {entry['tensorrt']}, {entry['gpu']})")
            continue
        if not os.access(folder.path, os.W_OK):
            raise GptDeployError(f"the {engine} engine must be built ({reason}) but {folder.path} is not writable")
        progress.note(f"TensorRT {trt.__version__}: building the {engine} engine for {gpu} ({reason})")
        entry, written = build_engine(trt, folder.path, spec, progress)
        folder = update_manifest(folder, {"engines": {engine: entry}}, written)
        progress.note(f"TensorRT: wrote {spec.file} ({entry['bytes'] / 2**20:.1f} MiB) in {entry['build_seconds']} s")
    return folder

