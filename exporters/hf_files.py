"""The side files of an export folder that outside clients read: config.json, generation_config.json and,
for GPT-2's BPE, tokenizer.json with tokenizer_config.json and onnxruntime-genai's genai_config.json.

Apps that load GPT-2 exports (Optimum, transformers.js) read the model's shape and special tokens from
config.json, with the keys of transformers' GPT2Config; onnxruntime-genai reads genai_config.json.
"""

from __future__ import annotations

import hashlib

from gptdeploy.loading import HF_ACTIVATIONS
from gptdeploy.config import GPTConfig
from gptdeploy.tokenizer import ENDOFTEXT, Tokenizer

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16"}


def hf_config(config: GPTConfig, tokenizer: Tokenizer, precision: str, external_graph: str | None = None) -> dict:
    """config.json: GPT2Config's keys. bos/eos are the end-of-text id (null for char-level vocabularies).

    external_graph: the file name of a graph in onnx/ whose weights are in its "<name>_data" file, which
    transformers.js then fetches (it must be told: "transformers.js_config")."""
    external = ({"transformers.js_config": {"use_external_data_format": {external_graph: 1}}}
                if external_graph else {})
    return {**external, 
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_inner": None,
        "vocab_size": config.vocab_size,
        "activation_function": HF_ACTIVATIONS[config.gelu],
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": tokenizer.eot_id,
        "use_cache": True,
        "torch_dtype": TORCH_DTYPES[precision],
    }


def generation_config(config: GPTConfig, tokenizer: Tokenizer) -> dict:
    return {
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": tokenizer.eot_id,
        "max_length": config.block_size,
    }


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (spaces become 'Ġ', newlines 'Ċ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts that BPE joins last to make `token`: BPE over its bytes with the merges ranked below it."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        candidates = [(ranks.get(a + b, len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(candidates)
        if rank >= ranks[token]:
            raise ValueError(f"rank file is not a BPE: {token!r} cannot be merged from lower-ranked parts")
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


_MERGES: dict[bytes, tuple[tuple[bytes, bytes], ...]] = {}  # by the ranks' digest: finding them takes about a second


def bpe_merges(ranks: dict[bytes, int]) -> tuple[tuple[bytes, bytes], ...]:
    """The merges of a BPE rank table in rank order: for each token of two bytes or more, its last merge.

    Remembered per table for the life of the process (a digest of the table is the key), so a process that
    writes several exports finds them once.
    """
    digest = hashlib.sha256()
    for token, rank in ranks.items():
        digest.update(len(token).to_bytes(4, "little") + token + rank.to_bytes(4, "little"))
    key = digest.digest()
    if key not in _MERGES:
        _MERGES[key] = tuple(_last_merge(token, ranks) for token, _ in sorted(ranks.items(), key=lambda item: item[1])
                             if len(token) > 1)
    return _MERGES[key]


def hf_tokenizer_files(ranks: dict[bytes, int], eot_id: int, block_size: int) -> tuple[dict, dict]:
    """tokenizer.json and tokenizer_config.json of GPT-2's byte-level BPE, built from tiktoken's ranks.

    transformers and transformers.js load the folder's tokenizer from these; ids equal tiktoken's.
    """
    alphabet = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[ENDOFTEXT] = eot_id
    merges = [f"{text(a)} {text(b)}" for a, b in bpe_merges(ranks)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": eot_id, "content": ENDOFTEXT, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": True, "special": True}],
        "normalizer": None,
        "pre_tokenizer": byte_level,  # use_regex: GPT-2's split pattern, the one tiktoken's "gpt2" uses
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT,
              "unk_token": ENDOFTEXT, "add_prefix_space": False, "model_max_length": block_size,
              "clean_up_tokenization_spaces": False}
    return tokenizer, config


def genai_config(config: GPTConfig, tokenizer: Tokenizer, graph_file: str, share_buffer: bool = False) -> dict:
    """genai_config.json: onnxruntime-genai's "decoder" model type with the export contract's IO names.

    graph_file: the graph it runs, relative to the folder (onnx/model.onnx, or a variant's).
    share_buffer: past_present_share_buffer, for graphs whose past and present may be one preallocated
        buffer (the variants with GroupQueryAttention); a graph that concatenates (model.onnx) takes False.
    onnxruntime-genai's "gpt2" type does not fit: it expects the legacy combined past_%d inputs.
    """
    eot = tokenizer.eot_id
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
            "context_length": config.block_size,
            "vocab_size": config.vocab_size,
            "decoder": {
                "filename": graph_file,
                "head_size": config.head_dim, "hidden_size": config.n_embd,
                "num_attention_heads": config.n_head, "num_key_value_heads": config.n_head,
                "num_hidden_layers": config.n_layer,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": config.block_size,
            "min_length": 0, "past_present_share_buffer": share_buffer, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
            "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
            "early_stopping": True,
        },
    }
