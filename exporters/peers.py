"""The same weights for the engines users pick instead of gptdeploy: CTranslate2 and llama.cpp (GGUF).

    write_hf_folder(loaded, folder)                 # transformers' GPT2LMHeadModel files
    write_ct2(loaded, folder, "int8")               # CTranslate2's own converter, from that folder
    write_gguf(loaded, path, "q4_0")                # GGUF, quantized by llama.cpp's own quantizer

Both start from the reference model's weights, so a benchmark compares engines, not checkpoints.
CTranslate2 converts with its TransformersConverter (it needs transformers). llama.cpp's converter
(convert_hf_to_gguf.py) comes with llama.cpp's sources, not with llama-cpp-python, so the GGUF file
is written here with llama.cpp's own gguf library, the tensors named and laid out as that converter's
GPT-2 class does (token_embd, position_embd, blk.N.attn_qkv, ...; weights [out, in]; the GPT-2 BPE
vocabulary with its merges, pre-tokenizer "gpt-2"). Checked against the converter itself: run on
write_hf_folder's output, it writes the same tensors, bit for bit, and the same vocabulary
(tests/test_peers.py, where llama.cpp's sources are at hand). Then llama.cpp's quantizer
(llama_model_quantize, through llama-cpp-python) makes f16, q8_0 or q4_0 of it, as `llama-quantize` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from gptdeploy.errors import GptDeployError
from gptdeploy.exporters.hf_files import hf_config, hf_tokenizer_files
from gptdeploy.loading import HF_CONV1D_SUFFIXES, LoadedModel
from gptdeploy.tokenizer import BPETokenizer, read_tiktoken_ranks

CT2_QUANTIZATIONS = ("float32", "int8", "int8_float32", "float16", "int8_float16", "bfloat16", "int8_bfloat16")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")


def _check_gpt2_bpe(loaded: LoadedModel, engine: str) -> None:
    if not isinstance(loaded.tokenizer, BPETokenizer):
        raise GptDeployError(f"{engine} runs GPT-2 BPE models here; {loaded.source} has a char-level tokenizer")
    if not loaded.config.bias:
        raise GptDeployError(f"{engine}'s GPT-2 has biases; {loaded.source} was trained without (bias=False)")


def write_hf_folder(loaded: LoadedModel, folder: Path) -> Path:
    """config.json, model.safetensors (transformers' names, Conv1D weights [in, out]; the tied lm_head left
    out, as GPT-2's own checkpoint does), tokenizer.json and tokenizer_config.json."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {name: (tensor.t() if name.endswith(HF_CONV1D_SUFFIXES) else tensor).float().contiguous()
             for name, tensor in loaded.model.state_dict().items() if name != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(loaded.config, loaded.tokenizer, "fp32")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = loaded.tokenizer
    ranks = read_tiktoken_ranks(tokenizer.ranks_path, None)
    files = hf_tokenizer_files(ranks, tokenizer.eot_id, loaded.config.block_size)
    for name, content in zip(("tokenizer.json", "tokenizer_config.json"), files):
        (folder / name).write_text(json.dumps(content))
    return folder


def write_ct2(loaded: LoadedModel, folder: Path, quantization: str) -> dict:
    """A CTranslate2 model directory of `loaded`, converted by CTranslate2's TransformersConverter with
    `quantization` (its weight types: float32, int8, ...). Returns what the converter was told."""
    import ctranslate2

    _check_gpt2_bpe(loaded, "CTranslate2")
    if quantization not in CT2_QUANTIZATIONS:
        raise GptDeployError(f"unknown CTranslate2 quantization {quantization!r}; choose {', '.join(CT2_QUANTIZATIONS)}")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the converter loads the folder with transformers: no bar on stderr
    try:
        with tempfile.TemporaryDirectory() as tmp:
            hf = write_hf_folder(loaded, Path(tmp) / "hf")
            ctranslate2.converters.TransformersConverter(str(hf), load_as_float16=False).convert(
                str(folder), quantization=quantization, force=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return {"converter": f"ctranslate2 {ctranslate2.__version__} TransformersConverter",
            "quantization": quantization}


def write_gguf(loaded: LoadedModel, path: Path, gguf_type: str) -> dict:
    """A GGUF file of `loaded` for llama.cpp: written in f32, then quantized to `gguf_type` (f16, q8_0,
    q4_0) by llama.cpp's quantizer. Returns what was made and how."""
    import gguf

    _check_gpt2_bpe(loaded, "llama.cpp")
    if gguf_type not in GGUF_TYPES:
        raise GptDeployError(f"unknown GGUF type {gguf_type!r}; choose {', '.join(GGUF_TYPES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    f32 = path if gguf_type == "f32" else path.with_name(path.stem + ".f32.tmp.gguf")
    config, tokenizer = loaded.config, loaded.tokenizer
    writer = gguf.GGUFWriter(str(f32), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    writer.add_type("model")
    writer.add_name(str(loaded.source))
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_gpt2_vocabulary(writer, tokenizer, config.vocab_size)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.GPT2, config.n_layer)
    for name, tensor in loaded.model.state_dict().items():
        if name == "lm_head.weight":  # tied: llama.cpp reads token_embd for the output when output is absent
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GptDeployError(f"no GGUF name for the tensor {name}")
        writer.add_tensor(gguf_name, tensor.detach().float().cpu().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if gguf_type != "f32":
        try:
            _quantize(f32, path, gguf_type)
        finally:
            f32.unlink(missing_ok=True)
    return {"converter": "gguf's GGUFWriter in llama.cpp's GPT-2 layout" + (
                ", then llama.cpp's llama_model_quantize" if gguf_type != "f32" else ""),
            "type": gguf_type, **gguf_tensor_types(path)}


def gguf_tensor_types(path: Path) -> dict:
    """What a GGUF file holds, per tensor type: {"tensor_types": {"q4_0": {"tensors": 48, "bytes": ...}},
    "output": the type of the tensor the logits are computed with (token_embd when tied)}."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    types: dict[str, dict] = {}
    for tensor in reader.tensors:
        entry = types.setdefault(tensor.tensor_type.name.lower(), {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += int(tensor.n_bytes)
    by_name = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    return {"tensor_types": types, "output": by_name.get("output.weight") or by_name.get("token_embd.weight")}


def _add_gpt2_vocabulary(writer, tokenizer: BPETokenizer, vocab_size: int) -> None:
    """The byte-level BPE vocabulary as llama.cpp's converter writes GPT-2's: tokens by id, their types
    (end-of-text a control token; nanoGPT's padding up to the embedding's rows unused), the merges."""
    import gguf

    ranks = read_tiktoken_ranks(tokenizer.ranks_path, None)
    hf_tokenizer, _ = hf_tokenizer_files(ranks, tokenizer.eot_id, 1)
    by_id = {i: token for token, i in hf_tokenizer["model"]["vocab"].items()}
    for added in hf_tokenizer["added_tokens"]:
        by_id[added["id"]] = added["content"]
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i == tokenizer.eot_id else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(hf_tokenizer["model"]["merges"])
    writer.add_bos_token_id(tokenizer.eot_id)
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_unk_token_id(tokenizer.eot_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


@contextlib.contextmanager
def _native_output_to(log: Path):
    """The process's stdout and stderr (file descriptors 1 and 2, where llama.cpp's C code prints) sent to
    `log` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(log, "wb") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _quantize(source: Path, target: Path, gguf_type: str) -> None:
    import llama_cpp

    ftypes = {"f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
              "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[gguf_type]
    log = source.with_suffix(".log")
    try:
        with _native_output_to(log):  # its per-tensor lines
            failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0
        if failed:
            last = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise GptDeployError(f"llama.cpp could not quantize {source.name} to {gguf_type}: {last[0]}")
    finally:
        log.unlink(missing_ok=True)
