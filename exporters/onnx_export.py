"""`export_onnx`: a loaded GPT to a self-describing ONNX model folder, validated before it exists.

The steps: trace both graphs with torch.onnx (dynamo) into a temporary folder beside the
destination, write the Hugging Face side files and the tokenizer, check the graphs (onnx.checker
with shape inference), run them in ONNX Runtime against the reference model (exporters.validate),
write the manifest last, and only then rename the folder into place. A failure at any step removes
the temporary folder, so no folder ever claims a success that did not happen.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import gptdeploy
from exporters import graphs
from exporters.hf_files import generation_config, hf_config, hf_tokenizer_files
from exporters.validate import ValidationReport, validate_export
from exporters.files import Steps, sha256_file
from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    NO_PAST,
    PRECISION_SUFFIXES,
    WITH_PAST,
    graph_file,
    io_signature,
)
from gptdeploy.loading import LoadedModel
from gptdeploy.tokenizer import GPT2_RANKS_FILE, CharTokenizer, read_tiktoken_ranks

# torchlib, the exporter's operator library, is written for opset 18; the exporter converts to
# later opsets itself. 18 runs on ONNX Runtime >= 1.14 and TensorRT >= 8.6.
DEFAULT_OPSET = 18
MIN_OPSET = 18
# Protobuf cannot hold a file over 2 GiB: above this many bytes of weights, they go to <graph>.onnx_data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass
class ExportResult:
    path: Path  # the export folder
    manifest: dict  # what gptdeploy.json holds
    validation: ValidationReport
    size_bytes: int  # all files of the folder
    seconds: float  # the whole export, validation included


def export_onnx(loaded: LoadedModel, out_dir: str | Path, *, precision: str = "fp32", opset: int | None = None,
                force: bool = False, progress: bool = True) -> ExportResult:
    """Exports `loaded` into the folder `out_dir` (see gptdeploy.export_folder for its layout).

    precision: "fp32" or "fp16" (graphs in fp16 keep graphs.FP16_KEPT_IN_FP32 in fp32).
    opset: the ONNX opset of the graphs, DEFAULT_OPSET when None.
    force: replace an existing export folder at out_dir.
    Raises GptDeployError for bad arguments, an unwritable or occupied destination, and a failed validation.
    """
    start = time.perf_counter()
    check_precision(precision)
    opset = DEFAULT_OPSET if opset is None else opset
    check_opset(opset)
    out_dir = Path(out_dir).expanduser().absolute()
    check_destination(out_dir, force)
    steps = Steps(progress)

    reference = loaded.model
    if next(reference.parameters()).dtype != torch.float32 or next(reference.parameters()).device.type != "cpu":
        reference = copy.deepcopy(reference).float().cpu()
    reference.eval()

    tmp = _make_temp_folder(out_dir)
    try:
        graph_model = graphs.fp16_model(reference) if precision == "fp16" else reference
        graph_specs = {}
        for role in (WITH_PAST, NO_PAST):
            file = graph_file(role, precision)
            signature = io_signature(loaded.config.to_dict(), role, precision)
            with steps.step(f"Tracing {file}"):
                ir_model = _trace(role, graph_model, opset, signature)
            with steps.step(f"Saving {file}"):
                external = _save(ir_model, tmp / file)
            del ir_model
            graph_specs[role] = {"file": file, "external_data": external, **signature}
        del graph_model

        with steps.step("Writing config.json, generation_config.json and the tokenizer"):
            tokenizer_spec = _write_side_files(loaded, tmp, precision)
        with steps.step("Checking the graphs (onnx.checker, shape inference)"):
            for spec in graph_specs.values():
                _check_graph(tmp / spec["file"])
        with steps.step("Validating in ONNX Runtime against the reference model"):
            report = validate_export(tmp, reference, precision, token_limit=loaded.tokenizer.vocab_size)
        if not report.passed:
            raise GptDeployError(f"export failed validation, nothing written: {report.failures()}")

        manifest = _manifest(loaded, precision, opset, graph_specs, tokenizer_spec, report, tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GptDeployError(f"cannot write the export folder {out_dir}: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    return ExportResult(out_dir, manifest, report, size, time.perf_counter() - start)


def check_precision(precision: str) -> None:
    if precision not in PRECISION_SUFFIXES:
        raise GptDeployError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_SUFFIXES)}")


def check_opset(opset: int) -> None:
    """One clear error for an opset that the installed onnx or torch.onnx cannot write."""
    import onnx
    from torch.onnx._constants import ONNX_MAX_OPSET

    highest = min(onnx.defs.onnx_opset_version(), ONNX_MAX_OPSET)
    if not MIN_OPSET <= opset <= highest:
        raise GptDeployError(
            f"opset {opset} cannot be written: the installed onnx {onnx.__version__} and torch {torch.__version__} "
            f"export opsets {MIN_OPSET} to {highest}"
        )


def check_destination(out_dir: Path, force: bool) -> None:
    """Refuses, before any work, a destination that exists (without force) or that is not ours to replace."""
    if not out_dir.exists():
        return
    if not force:
        raise GptDeployError(f"{out_dir} already exists; pass --force to replace it")
    if not out_dir.is_dir():
        raise GptDeployError(f"{out_dir} exists and is not a folder; refusing to replace it")
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise GptDeployError(f"{out_dir} is not an export folder (no {MANIFEST}); refusing to replace it, even with --force")


def _make_temp_folder(out_dir: Path) -> Path:
    """An empty folder beside out_dir, so that the final rename stays on one file system."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    except OSError as e:
        raise GptDeployError(f"cannot write the export folder in {out_dir.parent}: {e.strerror or e}") from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the export from other users
    return tmp


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    os.replace(out_dir, old / out_dir.name)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        os.replace(old / out_dir.name, out_dir)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx's own progress lines, its warnings and its optional-dependency logs would bury ours."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")) as devnull:  # noqa: SIM115
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
            devnull.close()


def _trace(role: str, model, opset: int, signature: dict):
    """The ONNX graph of `role` as an onnx_ir model, its IO shapes set to the contract's names."""
    import onnx_ir as ir

    n_layer = model.config.n_layer
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                graphs.graph_module(role, model), graphs.example_inputs(role, model), dynamo=True,
                dynamic_shapes=graphs.dynamic_shapes(role, n_layer), input_names=graphs.input_names(role, n_layer),
                output_names=graphs.output_names(n_layer), opset_version=opset, optimize=True, verbose=False,
            )
    except Exception as e:
        if os.environ.get("GPTDEPLOY_DEBUG"):
            raise
        first_line = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise GptDeployError(f"torch.onnx could not export {role}: {first_line} (GPTDEPLOY_DEBUG=1 shows more)") from e
    ir_model = program.model
    opsets = ir_model.opset_imports.get("", None)
    if opsets != opset:
        raise GptDeployError(f"torch.onnx wrote opset {opsets} instead of the requested {opset}")
    # torch.onnx names derived dimensions as it pleases ("sequence_length + past_sequence_length"):
    # the graph's IO says the contract's names.
    for values, specs in ((ir_model.graph.inputs, signature["inputs"]), (ir_model.graph.outputs, signature["outputs"])):
        for value, spec in zip(values, specs, strict=True):
            if value.name != spec["name"] or str(value.dtype).lower() != _IR_DTYPES[spec["dtype"]]:
                raise GptDeployError(f"exported {role} graph has {value.name} {value.dtype}, expected {spec}")
            value.shape = ir.Shape(spec["shape"])
    ir_model.producer_name = "gptdeploy"
    ir_model.producer_version = gptdeploy.__version__
    return ir_model


_IR_DTYPES = {"int64": "int64", "float32": "float", "float16": "float16"}


def _save(ir_model, path: Path) -> str | None:
    """Saves the graph; weights past EXTERNAL_DATA_THRESHOLD go to <name>_data beside it. Returns that file."""
    import onnx_ir as ir

    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)
    if weight_bytes <= EXTERNAL_DATA_THRESHOLD:
        ir.save(ir_model, path)
        return None
    data = path.with_name(path.name + "_data")  # model.onnx_data: the name Optimum and transformers.js use
    ir.save(ir_model, path, external_data=data.name)  # the reference in the graph is relative to the graph
    return data.relative_to(path.parent.parent).as_posix()


def _check_graph(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)  # full_check: strict shape inference too
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise GptDeployError(f"{path.name} fails onnx.checker: {str(e).splitlines()[0]}") from e


def _write_side_files(loaded: LoadedModel, folder: Path, precision: str) -> dict:
    """config.json, generation_config.json and the tokenizer file(s); returns the manifest's tokenizer entry.

    GPT-2 BPE also gets tokenizer.json and tokenizer_config.json, for transformers and transformers.js.
    """
    tokenizer = loaded.tokenizer
    (folder / "config.json").write_text(json.dumps(hf_config(loaded.config, tokenizer, precision), indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(generation_config(loaded.config, tokenizer), indent=2) + "\n")
    if isinstance(tokenizer, CharTokenizer):
        source = next((f for f in loaded.files if f.name == "meta.pkl"), None)
        if source is None:
            raise GptDeployError("the model's char-level tokenizer has no meta.pkl file to copy")
        kind, name = "char", "meta.pkl"
    else:
        source, kind, name = tokenizer.ranks_path, "gpt2-bpe", GPT2_RANKS_FILE
        ranks = read_tiktoken_ranks(source, None)
        hf_tokenizer, hf_tokenizer_config = hf_tokenizer_files(ranks, tokenizer.eot_id, loaded.config.block_size)
        (folder / "tokenizer.json").write_text(json.dumps(hf_tokenizer, ensure_ascii=False), encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps(hf_tokenizer_config, indent=2) + "\n")
    shutil.copyfile(source, folder / name)
    return {"type": kind, "file": name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id}


def _manifest(loaded: LoadedModel, precision: str, opset: int, graph_specs: dict, tokenizer_spec: dict,
              report: ValidationReport, folder: Path) -> dict:
    import onnx
    import onnxruntime
    import onnxscript

    files = sorted(f for f in folder.rglob("*") if f.is_file())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gptdeploy_version": gptdeploy.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"source": loaded.source, "origin": loaded.origin, "sha256": loaded.fingerprint},
        "config": loaded.config.to_dict(),
        "precision": precision,
        "opset": opset,
        "versions": {"gptdeploy": gptdeploy.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__},
        "tokenizer": tokenizer_spec,
        "fp16_kept_in_fp32": graphs.FP16_KEPT_IN_FP32 if precision == "fp16" else [],
        "graphs": graph_specs,
        "files": {f.relative_to(folder).as_posix(): sha256_file(f) for f in files},
        "validation": report.to_dict(),
    }


def default_out_dir(source: str, precision: str) -> Path:
    """./NAME-onnx in the current folder (NAME-onnx-fp16 for fp16): NAME is the preset, or the folder of the checkpoint."""
    path = Path(source).expanduser()
    name = path.resolve().parent.name if path.is_file() else (path.resolve().name if path.exists() else source)
    return Path(f"{name}-onnx" + ("-fp16" if precision == "fp16" else ""))
