"""The Hugging Face side files of an export folder: config.json and generation_config.json.

Apps that load GPT-2 exports (Optimum, transformers.js, onnxruntime-genai's tooling) read the model's
shape and special tokens from these, with the keys of transformers' GPT2Config.
"""

from __future__ import annotations

from gptdeploy.model import GPTConfig
from gptdeploy.tokenizer import Tokenizer

HF_ACTIVATIONS = {"tanh": "gelu_new", "exact": "gelu"}  # the inverse of loading.config_from_hf's table
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
