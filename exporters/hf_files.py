"""The Hugging Face side files of an export folder: config.json, generation_config.json and, for GPT-2's
BPE, tokenizer.json with tokenizer_config.json.

Apps that load GPT-2 exports (Optimum, transformers.js, onnxruntime-genai's tooling) read the model's
shape and special tokens from these, with the keys of transformers' GPT2Config.
"""

from __future__ import annotations

from gptdeploy.loading import HF_ACTIVATIONS
from gptdeploy.config import GPTConfig
from gptdeploy.tokenizer import ENDOFTEXT, Tokenizer

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16"}


def hf_config(config: GPTConfig, tokenizer: Tokenizer, precision: str) -> dict:
    """config.json: GPT2Config's keys. bos/eos are the end-of-text id (null for char-level vocabularies)."""
    return {
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


def hf_tokenizer_files(ranks: dict[bytes, int], eot_id: int, block_size: int) -> tuple[dict, dict]:
    """tokenizer.json and tokenizer_config.json of GPT-2's byte-level BPE, built from tiktoken's ranks.

    transformers and transformers.js load the folder's tokenizer from these; ids equal tiktoken's.
    """
    alphabet = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[ENDOFTEXT] = eot_id
    merges = [" ".join(map(text, _last_merge(token, ranks)))
              for token, _ in sorted(ranks.items(), key=lambda item: item[1]) if len(token) > 1]
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
