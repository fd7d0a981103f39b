"""The two exported graphs as torch modules with flat tensor inputs and outputs, and the fp16 policy.

torch.onnx traces these wrappers; their argument and result order is the order of the graph's
inputs and outputs in gptdeploy.export_folder.io_signature.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from gptdeploy.export_folder import (
    BATCH,
    NO_PAST,
    PAST_SEQUENCE,
    SEQUENCE,
    TOTAL_SEQUENCE,
    WITH_PAST,
    past_names,
    present_names,
)
from gptdeploy.model import GPT, LayerNorm

# What an fp16 graph keeps in fp32, and why (docs/export-folder.md has the measured figures):
# - every LayerNorm (ln_1, ln_2, ln_f), input, weights and output: its variance squares the residual
#   stream, whose largest activations (hundreds to thousands in trained GPT-2) square past fp16's
#   65504; ONNX Runtime accumulates in fp32 anyway, but backends that normalise in the input's
#   precision (TensorRT's fp16 layers) overflow.
# - the logits, cast to fp32 at the end, as in every precision (the contract).
FP16_KEPT_IN_FP32 = ["LayerNorm (ln_1, ln_2, ln_f)", "logits output"]


class DecoderWithPast(nn.Module):
    """onnx/model.onnx: input_ids, attention_mask, position_ids, past k/v per layer -> logits, present k/v."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=pairs)
        return (out.logits.float(), *[t for kv in out.present for t in kv])


class DecoderNoPast(nn.Module):
    """onnx/decoder_model.onnx: input_ids, attention_mask, position_ids -> logits, present k/v."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return (out.logits.float(), *[t for kv in out.present for t in kv])


def graph_module(role: str, model: GPT) -> nn.Module:
    return (DecoderWithPast if role == WITH_PAST else DecoderNoPast)(model).eval()


def fp16_model(model: GPT) -> GPT:
    """A copy of `model` in fp16 that keeps FP16_KEPT_IN_FP32 in fp32 (casts around each LayerNorm)."""
    half = copy.deepcopy(model).half().eval()
    for module in half.modules():
        if isinstance(module, LayerNorm):
            module.float()
            module.register_forward_pre_hook(lambda _module, args: (args[0].float(), *args[1:]))
            module.register_forward_hook(lambda _module, _args, out: out.half())
    return half


# Sizes of the example inputs that trace the graphs: all different and above 1, so that torch.export
# neither specialises a dimension to 0/1 nor mistakes one for another. Past length 0 still works at run time.
EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_PAST = 2, 3, 5


def example_inputs(role: str, model: GPT) -> tuple[torch.Tensor, ...]:
    config = model.config
    dtype = next(model.parameters()).dtype
    past_len = EXAMPLE_PAST if role == WITH_PAST else 0
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (EXAMPLE_BATCH, EXAMPLE_SEQUENCE), generator=gen)
    mask = torch.ones(EXAMPLE_BATCH, past_len + EXAMPLE_SEQUENCE, dtype=torch.long)
    positions = torch.arange(past_len, past_len + EXAMPLE_SEQUENCE).expand(EXAMPLE_BATCH, -1).contiguous()
    if role == NO_PAST:
        return ids, mask, positions
    kv_shape = (EXAMPLE_BATCH, config.n_head, past_len, config.head_dim)
    past = [torch.randn(kv_shape, generator=gen).to(dtype) for _ in past_names(config.n_layer)]
    return (ids, mask, positions, *past)


def dynamic_shapes(role: str, n_layer: int) -> tuple:
    """torch.onnx's dynamic_shapes for example_inputs, with the contract's dimension names."""
    cache_len = TOTAL_SEQUENCE if role == WITH_PAST else SEQUENCE
    shapes = ({0: BATCH, 1: SEQUENCE}, {0: BATCH, 1: cache_len}, {0: BATCH, 1: SEQUENCE})
    if role == WITH_PAST:
        shapes += (tuple({0: BATCH, 2: PAST_SEQUENCE} for _ in past_names(n_layer)),)  # the *past tuple
    return shapes


def input_names(role: str, n_layer: int) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    return names + past_names(n_layer) if role == WITH_PAST else names


def output_names(n_layer: int) -> list[str]:
    return ["logits", *present_names(n_layer)]
