"""ONNX Runtime variants of an export: fused graphs, fp16, and int8 / int4 weights, beside model.onnx.

    fused, fusions = fused_graph(folder)
    entry = write_variant(fused, fusions, "q4", folder, staging, DEFAULT_QUANTIZATION["q4"])

Every variant is made from the portable onnx/model.onnx of an fp32 export, which stays as it is:

1. onnxscript's ONNX Runtime fusions (onnxscript.rewriter.ort_fusions.optimize_for_ort): each
   LayerNormalization with the residual Add before it -> SkipLayerNormalization (with the projection's
   bias), the tanh GELU written out in elementary operators -> FastGelu (the tanh form GPT-2 was
   trained with), the attention -> MultiHeadAttention, the lm_head on the transposed embedding ->
   FusedMatMul. (Not onnxruntime.transformers' optimizer: it turns a Gelu(approximate="tanh")
   operator into BiasGelu, the erf GELU, another function.)
2. gptdeploy's own passes (this module), on the onnx_ir graph:
   - an ONNX Gelu(approximate="tanh") operator (exports at opset >= 20) -> FastGelu;
   - attention. CPU variants: each MultiHeadAttention, with the Concat of the past keys/values before
     it, becomes one GroupQueryAttention on the packed QKV projection (no split, no transposes), whose
     past and present may share one preallocated buffer (kv_cache "shared-buffer": nothing copied per
     step, see runtimes.ort). The padding mask goes in as its attention bias. fp16 (for CUDA, whose
     GroupQueryAttention takes no attention bias): a MultiHeadAttention that takes the past and
     returns the present itself (kv_cache "concat", the contract of model.onnx).
   - num_logits_to_keep: an optional int64 input (default 0: every position) that limits the lm_head
     to the last positions; generation needs the last one only.
   - quantized variants: the lm_head multiplies by its own transposed copy of the tied embedding, a
     constant the quantizer takes (the embedding Gather keeps the fp32 table: it reads one row per token).
   - the bias Add after a projection goes into the operator after it (FastGelu's bias input), or,
     once quantized, into MatMulNBits' bias input.
3. fp16: onnxruntime.transformers.float16, the logits kept fp32 (the contract).
   int8, q4: onnxruntime.quantization.MatMulNBitsQuantizer, round-to-nearest, blockwise along the
   input dimension, every MatMul with constant weights, the lm_head (a third of GPT-2 small) included.
This module writes a variant into the staging folder it is given. Validating it against the reference
(gptdeploy parity with the export-time profile), moving it into the export and recording it in the
manifest is the application's (gptdeploy.app.exporting): no variant is written that failed validation.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import (
    KV_CONCAT, KV_SHARED_BUFFER, LOGITS_TO_KEEP, VARIANTS, WITH_PAST, ExportFolder, data_files,
)
from gptdeploy.exporters.weights import WeightStore, save_graph
from gptdeploy.progress import quiet_libraries

MS_DOMAIN = "com.microsoft"
# All of them: with fp16 (gptdeploy runs it on CUDA), every transformers.js dtype has its file
DEFAULT_VARIANTS = ("fp32-fused", "fp16", "int8", "q8", "q4")
QUIET_LOGGERS = ("onnxscript", "onnxruntime.quantization", "onnx_ir")


@dataclass(frozen=True)
class QuantSettings:
    """MatMulNBits settings (onnxruntime.quantization.MatMulNBitsQuantizer), recorded in the manifest."""

    bits: int
    block_size: int = 128  # weights per scale (and zero point), along the input dimension
    symmetric: bool = False  # False: a zero point per block too (more accurate at 4 bits)
    # ONNX Runtime's MatMulNBits compute type on CPU: 0 unset (fp32), 1 fp32, 2 fp16, 3 bf16,
    # 4 int8 (the activations are quantized per block too, and the products use integer dot products)
    accuracy_level: int = 4

    def check(self) -> None:
        if self.bits not in (4, 8):
            raise GptDeployError(f"quantization bits must be 4 or 8, not {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise GptDeployError(f"block size must be a power of two >= 16, not {self.block_size}")
        if self.accuracy_level not in range(5):
            raise GptDeployError(f"accuracy level must be 0 to 4, not {self.accuracy_level}")


# Block 128: on a CPU with VNNI, MatMulNBits reads fewer scales per weight and decodes a GPT-2 step's
# matrices 27% (4 bits) to 39% (8 bits, symmetric) faster than with block 32, for a loss on the shakespeare
# model's whole validation split within 0.15% of fp32 (docs/cpu-speed.md has the figures).
DEFAULT_QUANTIZATION = {"int8": QuantSettings(bits=8, symmetric=True), "q4": QuantSettings(bits=4)}


def check_variants(names) -> list[str]:
    """The variant names, checked (one clear error for an unknown one), in VARIANTS' order."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise GptDeployError(f"no variant given; choose among {', '.join(VARIANTS)}")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise GptDeployError(f"unknown variant {unknown[0]!r}; choose among {', '.join(VARIANTS)}")
    return [n for n in VARIANTS if n in names]


def write_variant(fused, fusions: dict, name: str, folder: ExportFolder, staging: Path,
                  quant: QuantSettings | None = None) -> dict:
    """Writes variant `name` of the fp32 export `folder`, made from its fused graph (`fused_graph`), to
    its file under `staging`; returns its manifest entry (validation not included)."""
    variant = VARIANTS[name]
    if name == "q8":  # standard operators, from the portable graph: no fusions
        model, passes, quantization = _q8_model(folder)
        fusions, concat = {}, True
    else:
        model, passes, quantization = _variant_model(fused, name, folder.config, quant)
        concat = name == "fp16"
    model.producer_name = "gptdeploy"
    external = save_graph(model, staging / variant.file, _shared_weights(folder, staging) if name == "fp32-fused"
                          else None)
    operators = _operator_counts(model)
    entry = {
        "file": variant.file, "external_data": external or None, "precision": variant.precision,
        "base": folder.manifest["graphs"][WITH_PAST]["file"],
        "kv_cache": KV_CONCAT if concat else KV_SHARED_BUFFER,
        "execution_providers": ["CUDAExecutionProvider"] if name == "fp16" else ["CPUExecutionProvider"],
        "fusions": {k: v for k, v in fusions.items() if v},  # onnxscript's
        "passes": passes,  # gptdeploy's, after them
        "operators": operators,
        "fused_operators": {k: v for k, v in operators.items() if k.startswith(MS_DOMAIN)},
        "quantization": quantization,
        # onnxruntime-genai runs the variant with the folder's genai_config.json and this overlay
        # (onnxruntime_genai.Config(folder).overlay(json.dumps(entry["genai"])))
        "genai": {"model": {"decoder": {"filename": variant.file}},
                  "search": {"past_present_share_buffer": not concat}},
    }
    if name != "q8":
        entry["logits_to_keep"] = {"initializer": LOGITS_TO_KEEP, "default": 0,
                                   "meaning": "int64 scalar: logits of the last N positions only; 0: every position; "
                                              "a session overrides it with SessionOptions.add_initializer"}
    return entry


# ---------------------------------------------------------------------------------------------------
# The graphs


def _shared_weights(folder: ExportFolder, staging: Path) -> WeightStore | None:
    """The export's shared weights file (onnx/model.onnx_data), linked into `staging` beside the variant
    so that the staged graph finds it as the folder's graphs do; read-only (the variant's other tensors go
    to a file of its own). None for an export whose graphs hold their weights."""
    import os

    files = data_files(folder.manifest["graphs"][WITH_PAST])
    shared = next((f for f in files if Path(f).name == Path(folder.graph_path(WITH_PAST)).name + "_data"), None)
    if shared is None:
        return None
    link = staging / shared
    link.parent.mkdir(parents=True, exist_ok=True)
    # A hard link (ONNX Runtime refuses external data outside the graph's folder, a symbolic link too): the
    # caller removes it once the variant is validated (onnx_ir refuses to read a file with several links)
    if not link.exists():
        os.link(folder.path / shared, link)
    store = WeightStore.read(folder.graph_path(WITH_PAST), folder.path / shared)
    store.path = link
    return store


def fused_graph(folder: ExportFolder):
    """model.onnx with onnxscript's ONNX Runtime fusions; and the count of each fusion."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(folder.graph_path(WITH_PAST))
    ir.external_data.load_to_model(model)  # weights in memory: variants are saved elsewhere, or copied
    with quiet_libraries(*QUIET_LOGGERS):
        model, counts = optimize_for_ort(model)
    return model, dict(counts)


def _variant_model(fused, name: str, config: dict, quant: QuantSettings | None):
    """The variant's graph (an onnx_ir model), from a copy of the fused graph; what gptdeploy's own passes
    did (for the manifest); and the variant's quantization entry (None for fp32-fused and fp16)."""
    import onnx_ir as ir

    model = ir.from_proto(ir.to_proto(fused))  # a deep copy: each variant rewrites its own
    n_head = config["n_head"]
    passes = {"tanh_gelu_to_fast_gelu": _tanh_gelu_to_fast_gelu(model)}
    if name == "fp16":
        passes["multi_head_attention_with_past"] = _attention_with_past(model, n_head)
    else:
        passes["group_query_attention"] = _group_query_attention(model, n_head)
    _add_logits_to_keep(model)
    passes[LOGITS_TO_KEEP] = 1
    if name == "fp16":
        passes["bias_into_fast_gelu"] = _fold_biases(model, "FastGelu")
        return _to_fp16(model), passes, None
    if name == "fp32-fused":
        passes["bias_into_fast_gelu"] = _fold_biases(model, "FastGelu")
        return model, passes, None
    passes["lm_head_on_its_own_transposed_copy"] = _untie_lm_head(model)
    model = _quantize(model, quant)
    passes["bias_into_matmul_nbits"] = _fold_biases(model, "MatMulNBits")
    return model, passes, {
        "method": "MatMulNBits, round to nearest (onnxruntime.quantization.MatMulNBitsQuantizer)",
        **asdict(quant), "weights": "every MatMul with constant weights, the lm_head included",
        "kept_fp32": "embeddings (the Gathers), LayerNorms, biases, the KV cache, activations between operators",
    }


def _q8_model(folder: ExportFolder):
    """transformers.js' q8: model.onnx with every MatMul of constant weights (the tied lm_head's transpose folded
    into a constant first) quantized dynamically by onnxruntime.quantization.quantize_dynamic: int8 weights with
    a scale per output channel (per tensor flipped 8% of the tiny random model's top-1 tokens), activations
    quantized per tensor as they come (DynamicQuantizeLinear, MatMulInteger): standard ONNX
    operators that every ONNX Runtime build runs, the web's included. The KV cache and its IO are model.onnx's."""
    import tempfile

    import onnx_ir as ir
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = ir.load(folder.graph_path(WITH_PAST))
    ir.external_data.load_to_model(model)  # quantize_dynamic reads the graph from a folder of its own
    folded = _fold_constant_transposes(model)
    with tempfile.TemporaryDirectory() as tmp, quiet_libraries(*QUIET_LOGGERS):
        out = Path(tmp) / "model_quantized.onnx"
        quantize_dynamic(ir.to_proto(model), out, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                         per_channel=True, extra_options={"MatMulConstBOnly": True})
        quantized = ir.load(out)
        for value in quantized.graph.initializers.values():  # into memory before the folder goes
            if value.const_value is not None:
                value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
    return quantized, {"transposed_constants_folded": folded}, {
        "method": "onnxruntime.quantization.quantize_dynamic (MatMulInteger, DynamicQuantizeLinear)",
        "bits": 8, "weights": "int8, a scale per output channel, every MatMul with constant weights, the lm_head included",
        "activations": "uint8, quantized per tensor at run time",
        "kept_fp32": "embeddings (the Gathers), LayerNorms, biases, attention, the KV cache",
    }


def _fold_constant_transposes(model) -> int:
    """Each Transpose of an initializer -> a transposed initializer (the tied lm_head reads the embedding
    transposed), so that quantizers see a MatMul with constant weights. Returns the count."""
    import onnx_ir as ir

    count = 0
    for node in list(model.graph):
        if node.op_type != "Transpose" or node.domain or node.inputs[0].const_value is None:
            continue
        perm = node.attributes.get_ints("perm", None)
        array = np.ascontiguousarray(np.transpose(node.inputs[0].const_value.numpy(), perm))
        constant = _constant(model.graph, f"{node.inputs[0].name}.T", array)
        ir.convenience.replace_all_uses_with(node.outputs[0], constant)
        model.graph.remove(node, safe=True)
        count += 1
    return count


def _tanh_gelu_to_fast_gelu(model) -> int:
    """ONNX Gelu(approximate="tanh") (exports at opset >= 20) -> FastGelu, the same function.

    onnxscript fuses the tanh GELU written out in elementary operators (opset 18) and leaves the Gelu
    operator alone; onnxruntime.transformers' optimizer would turn it into BiasGelu, which is the erf
    GELU: another function (docs/ort-optimization.md has the measured difference).
    """
    import onnx_ir as ir

    count = 0
    for node in list(model.graph):
        if node.op_type != "Gelu" or node.domain not in ("", "ai.onnx"):
            continue
        if node.attributes.get_string("approximate", "none") != "tanh":
            continue
        fast = ir.node("FastGelu", [node.inputs[0]], domain=MS_DOMAIN)
        model.graph.insert_before(node, fast)
        ir.convenience.replace_all_uses_with(node.outputs[0], fast.outputs[0])
        model.graph.remove(node, safe=True)
        count += 1
    return count


def _graph_values(graph):
    return {v.name: v for v in graph.inputs}, {v.name: v for v in graph.outputs}


def _present_of(value, outputs: dict):
    """The graph output (present.N.key/value) that `value` was reshaped or transposed from."""
    while value.name not in outputs:
        producer = value.producer()
        if producer is None or producer.op_type not in ("Reshape", "Transpose"):
            raise GptDeployError(f"unexpected attention graph: {value.name} does not come from a present output")
        value = producer.inputs[0]
    return value


def _fused_attentions(model):
    """Each MultiHeadAttention of the fused graph: (node, packed qkv, its Split, past k/v, old present k/v)."""
    _, outputs = _graph_values(model.graph)
    found = []
    for node in model.graph:
        if node.op_type != "MultiHeadAttention" or node.domain != MS_DOMAIN:
            continue
        query, key, value = node.inputs[:3]
        split = query.producer()
        if split is None or split.op_type != "Split" or split.outputs[0] is not query or len(split.outputs) != 3:
            raise GptDeployError(f"unexpected attention graph: the query of {node.name} is not a QKV split")
        presents = [_present_of(v, outputs) for v in (key, value)]
        concats = [p.producer() for p in presents]
        if any(c is None or c.op_type != "Concat" for c in concats):
            raise GptDeployError(f"unexpected attention graph: {presents[0].name} is not a concatenation")
        found.append((node, split.inputs[0], split, [c.inputs[0] for c in concats], presents))
    if not found:
        raise GptDeployError("onnxscript fused no attention in model.onnx; cannot build the variant")
    return found


def _replace_presents(graph, old: list, new: list) -> None:
    """The graph outputs present.N.* become `new`, under the same names (the old values are renamed)."""
    for old_value, new_value in zip(old, new):
        index = list(graph.outputs).index(old_value)
        name = old_value.name
        old_value.name = f"{name}_replaced"
        new_value.name = name
        new_value.dtype = old_value.dtype
        new_value.shape = old_value.shape
        graph.outputs[index] = new_value


def _group_query_attention(model, n_head: int) -> int:
    """Each fused attention -> GroupQueryAttention on the packed QKV, its past/present able to share a buffer.

    GroupQueryAttention wants the total length (the attention mask's) and, per row, that length - 1
    (rows are left-padded to a common length; the padding is masked by the attention bias).
    """
    import onnx_ir as ir

    graph = model.graph
    inputs, _ = _graph_values(graph)
    total_64 = ir.node("Shape", [inputs["attention_mask"]], {"start": 1, "end": 2})
    total_32 = ir.node("Cast", [total_64.outputs[0]], {"to": ir.DataType.INT32})
    total = ir.node("Reshape", [total_32.outputs[0], _constant(graph, "gqa_scalar_shape", np.array([], np.int64))])
    last = ir.node("Sub", [total.outputs[0], _constant(graph, "gqa_one", np.array(1, np.int32))])
    batch = ir.node("Shape", [inputs["input_ids"]], {"start": 0, "end": 1})
    seqlens_k = ir.node("Expand", [last.outputs[0], batch.outputs[0]])
    graph.insert_before(next(iter(graph)), [total_64, total_32, total, last, batch, seqlens_k])

    def gqa(node, qkv, _split, past_k, past_v):
        inputs = [qkv, None, None, past_k, past_v, seqlens_k.outputs[0], total.outputs[0], None, None, None,
                  node.inputs[5]]
        return ir.node("GroupQueryAttention", inputs, {"num_heads": n_head, "kv_num_heads": n_head}, domain=MS_DOMAIN,
                       num_outputs=3)

    return _replace_attentions(model, gqa)


def _attention_with_past(model, n_head: int) -> int:
    """Each fused attention -> MultiHeadAttention that takes the past and returns the present itself."""
    import onnx_ir as ir

    def mha(node, _qkv, split, past_k, past_v):
        query, key, value = split.outputs
        return ir.node("MultiHeadAttention", [query, key, value, None, None, node.inputs[5], past_k, past_v],
                       {"num_heads": n_head}, domain=MS_DOMAIN, num_outputs=3)

    return _replace_attentions(model, mha)


def _replace_attentions(model, make) -> int:
    """Each fused attention -> make(node, packed qkv, its Split, past key, past value): a node whose outputs
    are the attention's output and the present key and value, which become the graph's present outputs."""
    import onnx_ir as ir

    graph = model.graph
    attentions = _fused_attentions(model)
    for node, qkv, split, (past_k, past_v), presents in attentions:
        new = make(node, qkv, split, past_k, past_v)
        graph.insert_before(node, new)
        ir.convenience.replace_all_uses_with(node.outputs[0], new.outputs[0])
        _replace_presents(graph, presents, new.outputs[1:])
        graph.remove(node, safe=True)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return len(attentions)


def _logits_node(graph):
    logits = next(v for v in graph.outputs if v.name == "logits")
    return logits.producer()


def _add_logits_to_keep(model) -> None:
    """num_logits_to_keep: an initializer, 0 = every position, that a session may override with another value
    (onnxruntime.SessionOptions.add_initializer): 1 gives the last position's logits only, which saves the
    lm_head on the others in a prefill. Not a graph input, so the graph's inputs are model.onnx's exactly
    (an input with a default would make ONNX Runtime warn, at every load, that it cannot fold it).

    The lm_head reads hidden[:, -num_logits_to_keep:] (Slice from -0 = 0 keeps them all).
    """
    import onnx_ir as ir

    graph = model.graph
    head = _logits_node(graph)
    keep = _constant(graph, LOGITS_TO_KEEP, np.array(0, np.int64))
    start = ir.node("Neg", [keep])
    starts = ir.node("Unsqueeze", [start.outputs[0], _constant(graph, "logits_axes_0", np.array([0], np.int64))])
    kept = ir.node("Slice", [head.inputs[0], starts.outputs[0],
                             _constant(graph, "logits_slice_end", np.array([np.iinfo(np.int64).max], np.int64)),
                             _constant(graph, "logits_axes_1", np.array([1], np.int64))])
    graph.insert_before(head, [start, starts, kept])
    head.replace_input_with(0, kept.outputs[0])
    logits = head.outputs[0]
    logits.shape = ir.Shape([logits.shape[0], "logits_length", logits.shape[2]])


def _untie_lm_head(model) -> int:
    """lm_head: FusedMatMul(x, embedding, transB) -> MatMul(x, a transposed copy), which the quantizer takes."""
    import onnx_ir as ir

    graph = model.graph
    head = _logits_node(graph)
    if head.op_type == "MatMul" and head.inputs[1].const_value is not None:
        return 0  # already a MatMul on a constant (an untied lm_head)
    weight = head.inputs[1].const_value
    if head.op_type != "FusedMatMul" or weight is None or head.attributes.get_int("transB", 0) != 1:
        raise GptDeployError(f"unexpected lm_head: {head.op_type} on {head.inputs[1].name}")
    transposed = _constant(graph, "lm_head.weight.T", np.ascontiguousarray(weight.numpy().T))
    matmul = ir.node("MatMul", [head.inputs[0], transposed])
    graph.insert_before(head, matmul)
    ir.convenience.replace_all_uses_with(head.outputs[0], matmul.outputs[0], replace_graph_outputs=True)
    matmul.outputs[0].name, matmul.outputs[0].shape = "logits", head.outputs[0].shape
    matmul.outputs[0].dtype = head.outputs[0].dtype
    graph.remove(head, safe=True)
    return 1


def _fold_biases(model, into: str) -> int:
    """Each Add of a constant bias after a projection, into the operator that takes a bias input:
    "FastGelu" (bias added before the GELU, as its input 1) or "MatMulNBits" (its input 5). Returns the count."""
    import onnx_ir as ir

    folded = 0
    for add in list(model.graph):
        if add.op_type != "Add" or add.domain:
            continue
        x, bias = add.inputs
        if x.const_value is not None:
            x, bias = bias, x
        producer = x.producer()
        if bias.const_value is None or len(bias.shape or ()) != 1 or producer is None or len(x.uses()) != 1:
            continue
        if into == "MatMulNBits" and producer.op_type == "MatMulNBits" and len(producer.inputs) < 6:
            producer.resize_inputs(6)
            producer.replace_input_with(5, bias)
            ir.convenience.replace_all_uses_with(add.outputs[0], x)
        elif into == "FastGelu" and len(add.outputs[0].uses()) == 1:
            gelu = add.outputs[0].uses()[0].node
            if gelu.op_type != "FastGelu" or gelu.domain != MS_DOMAIN or len(gelu.inputs) != 1:
                continue
            gelu.resize_inputs(2)
            gelu.replace_input_with(0, x)
            gelu.replace_input_with(1, bias)
        else:
            continue
        model.graph.remove(add, safe=True)
        folded += 1
    return folded


def _constant(graph, name: str, array: np.ndarray):
    import onnx_ir as ir

    value = ir.val(name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _to_fp16(model):
    """Weights and activations in fp16; the logits stay fp32 (a Cast at the end), the KV cache is fp16."""
    import onnx_ir as ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with quiet_libraries(*QUIET_LOGGERS):
        proto = convert_float_to_float16(ir.to_proto(model), keep_io_types=["logits"], disable_shape_infer=True)
    return ir.from_proto(proto)


def _quantize(model, quant: QuantSettings):
    import onnx_ir as ir

    # (the quantizer's module calls logging.basicConfig(level=INFO) when imported: quiet_libraries undoes it)
    with quiet_libraries(*QUIET_LOGGERS):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(ir.to_proto(model), bits=quant.bits, block_size=quant.block_size,
                                         is_symmetric=quant.symmetric, accuracy_level=quant.accuracy_level,
                                         op_types_to_quantize=("MatMul",))
        quantizer.process()
    return ir.from_proto(quantizer.model.model)


def _operator_counts(model) -> dict[str, int]:
    counts = collections.Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in model.graph)
    return dict(sorted(counts.items()))
