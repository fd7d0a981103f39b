"""torch to ONNX: the two graphs of an export folder, its side files, and what the manifest records of them.

    specs = write_graphs(model, folder, precision="fp32", opset=18, progress=progress)
    tokenizer_spec = write_side_files(loaded, folder, "fp32")
    check_graphs(folder, specs)

The graphs are traced with the current torch.onnx exporter (dynamo=True, with its optimizer), their IO
given the export contract's names and symbolic dimensions (gptdeploy.export_folder), and checked with
onnx.checker (full check: strict shape inference). This module writes into the folder it is given and
nothing else: validating the result against the reference, writing the manifest and moving the folder
into place is the application's (gptdeploy.app.exporting), so that no folder looks complete before it
has been validated.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

import torch

import gptdeploy
from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import NO_PAST, PRECISION_SUFFIXES, WITH_PAST, graph_file, io_signature
from gptdeploy.exporters import graphs
from gptdeploy.exporters.hf_files import generation_config, genai_config, hf_config, hf_tokenizer_files
from gptdeploy.loading import LoadedModel
from gptdeploy.model import GPT, LayerNorm
from gptdeploy.progress import Progress, quiet_libraries
from gptdeploy.tokenizer import GPT2_RANKS_FILE, CharTokenizer, read_tiktoken_ranks
from gptdeploy.exporters.weights import WeightStore, save_graph

# torchlib, the exporter's operator library, is written for opset 18; the exporter converts to
# later opsets itself. 18 runs on ONNX Runtime >= 1.14 and TensorRT >= 8.6.
DEFAULT_OPSET = 18
MIN_OPSET = 18
# From this many bytes of weights an export keeps them in one external-data file that its graphs share
# (onnx/model.onnx_data): GPT-2 124M (498 MB) does, the packaged shakespeare model (31 MB) keeps each graph
# whole, one file each, as browsers load them best. (Protobuf cannot hold a graph over 2 GiB in any case.)
EXTERNAL_FROM = 100_000_000
QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")


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


def uses_external_data(model: GPT, precision: str, external_data: bool | None = None) -> bool:
    """Whether an export keeps its weights in one external-data file that its graphs share: asked for
    (True / False), or by size (None): from EXTERNAL_FROM bytes of weights in the graphs' precision."""
    if external_data is not None:
        return external_data
    return sum(p.numel() for p in model.parameters()) * (2 if precision == "fp16" else 4) >= EXTERNAL_FROM


def write_graphs(model: GPT, folder: Path, *, precision: str, opset: int, progress: Progress,
                 external_data: bool = False) -> dict[str, dict]:
    """Traces and saves both graphs of `model` (fp32, on the CPU) into `folder`; returns the manifest's
    "graphs" entries (file, external data files, IO signature) by role.

    external_data: the weights go to one file, `<with-past graph>_data` (onnx/model.onnx_data), that
    both graphs reference (gptdeploy.exporters.weights); otherwise each graph holds its own."""
    graph_model = graphs.fp16_model(model) if precision == "fp16" else model
    store = WeightStore.create(folder / shared_weights_file(precision)) if external_data else None
    specs = {}
    try:
        for role in (WITH_PAST, NO_PAST):
            file = graph_file(role, precision)
            signature = io_signature(model.config.to_dict(), role, precision)
            with progress.step(f"Tracing {file}"):
                ir_model = _trace(role, graph_model, opset, signature)
            with progress.step(f"Saving {file}" + (f" (weights in {store.path.name})" if store else "")):
                external = save_graph(ir_model, folder / file, store)
            del ir_model
            specs[role] = {"file": file, "external_data": external or None, **signature}
    finally:
        if store is not None:
            store.close()
    return specs


def shared_weights_file(precision: str) -> str:
    """The external-data file the graphs of an export share: onnx/model.onnx_data (model_fp16.onnx_data)."""
    return graph_file(WITH_PAST, precision) + "_data"


def check_graphs(folder: Path, specs: dict[str, dict]) -> None:
    """onnx.checker with strict shape inference on every graph; one clear error for the first that fails."""
    import onnx

    for spec in specs.values():
        try:
            onnx.checker.check_model(str(folder / spec["file"]), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise GptDeployError(f"{spec['file']} fails onnx.checker: {str(e).splitlines()[0]}") from e


def _trace(role: str, model, opset: int, signature: dict):
    """The ONNX graph of `role` as an onnx_ir model, its IO shapes set to the contract's names."""
    import onnx_ir as ir

    n_layer = model.config.n_layer
    try:
        with quiet_libraries(*QUIET_LOGGERS):
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


def write_side_files(loaded: LoadedModel, folder: Path, precision: str, external_data: bool = False) -> dict:
    """config.json, generation_config.json and the tokenizer file(s); returns the manifest's tokenizer entry.

    GPT-2 BPE also gets tokenizer.json and tokenizer_config.json, for transformers and transformers.js, and
    genai_config.json for onnxruntime-genai (which needs tokenizer.json: a char-level model gets none).
    external_data: the graphs' weights are in the shared file (config.json tells transformers.js).
    """
    tokenizer = loaded.tokenizer
    external = Path(graph_file(WITH_PAST, precision)).name if external_data else None
    (folder / "config.json").write_text(json_text(hf_config(loaded.config, tokenizer, precision, external)))
    (folder / "generation_config.json").write_text(json_text(generation_config(loaded.config, tokenizer)))
    if isinstance(tokenizer, CharTokenizer):
        source = next((f for f in loaded.files if f.name == "meta.pkl"), None)
        if source is None:
            raise GptDeployError("the model's char-level tokenizer has no meta.pkl file to copy")
        kind, name = "char", "meta.pkl"
    else:
        source, kind, name = tokenizer.ranks_path, "gpt2-bpe", GPT2_RANKS_FILE
        ranks = read_tiktoken_ranks(source, None)
        hf_tokenizer, hf_tokenizer_config = hf_tokenizer_files(ranks, tokenizer.eot_id, loaded.config.block_size)
        (folder / "tokenizer.json").write_text(json_text(hf_tokenizer, indent=None), encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json_text(hf_tokenizer_config))
        genai = genai_config(loaded.config, tokenizer, graph_file(WITH_PAST, precision))
        (folder / "genai_config.json").write_text(json_text(genai))
    shutil.copyfile(source, folder / name)
    return {"type": kind, "file": name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id}


def json_text(value, indent: int | None = 2) -> str:
    import json

    return json.dumps(value, indent=indent, ensure_ascii=indent is not None) + ("\n" if indent else "")


def versions() -> dict[str, str]:
    """The versions of what made the graphs, for the manifest."""
    found = {"gptdeploy": gptdeploy.__version__, "torch": torch.__version__}
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


FP16_MAX = 65504.0


@torch.no_grad()
def fp16_ranges(reference: GPT, ids, mask, positions) -> dict:
    """The reference's largest activations where fp16 could overflow (its largest finite value is 65504).

    ids, mask, positions: numpy or torch int64 [batch, seq]. residual_stream: |x| entering each block
    and ln_f; layernorm_sum_of_squares: sum of x^2 over the features of a LayerNorm input, what an
    fp16 variance would accumulate; attention_scores: |q.k|/sqrt(head_dim); mlp_hidden: |c_fc output|;
    logits: |logits|.
    """
    ids, mask, positions = (torch.as_tensor(a) for a in (ids, mask, positions))
    ranges = dict.fromkeys(["residual_stream", "layernorm_sum_of_squares", "attention_scores", "mlp_hidden", "logits"], 0.0)

    def record(key, value):
        ranges[key] = max(ranges[key], float(value))

    def on_layernorm(_module, args):
        record("residual_stream", args[0].abs().max())
        record("layernorm_sum_of_squares", args[0].pow(2).sum(-1).max())

    def on_qkv(module, _args, out):
        q, k, _ = out.split(out.shape[-1] // 3, dim=-1)
        heads = reference.config.n_head
        q = q.view(*q.shape[:2], heads, -1).transpose(1, 2)
        k = k.view(*k.shape[:2], heads, -1).transpose(1, 2)
        record("attention_scores", (q @ k.transpose(-1, -2)).abs().max() / q.shape[-1] ** 0.5)

    hooks = [m.register_forward_pre_hook(on_layernorm) for m in reference.modules() if isinstance(m, LayerNorm)]
    for block in reference.transformer.h:
        hooks.append(block.attn.c_attn.register_forward_hook(on_qkv))
        hooks.append(block.mlp.c_fc.register_forward_hook(lambda _m, _a, out: record("mlp_hidden", out.abs().max())))
    try:
        record("logits", reference(ids, attention_mask=mask, position_ids=positions).logits.abs().max())
    finally:
        for hook in hooks:
            hook.remove()
    return {key: {"max": value, "fraction_of_fp16_max": value / FP16_MAX} for key, value in ranges.items()}
