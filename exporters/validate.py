"""Validation of exported graphs: ONNX Runtime (CPU) against the reference model, on fresh inputs.

A batch of two prompts of different lengths (the shorter left-padded) goes through onnx/model.onnx
as a prefill with past length 0, then DECODE_STEPS decode steps that feed each step's presents
back; the no-past graph then scores the whole sequence at once. Every step is compared with the
reference GPT (fp32) on the same inputs, the next token being the reference's greedy choice so both
sides see the same sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gptdeploy.export_folder import NO_PAST, WITH_PAST, graph_file, past_names
from gptdeploy.model import GPT

# Max |logits - reference logits| allowed. fp32: the 1e-4. fp16: measured on gpt2-size
# exports (see README); it is relative to the largest reference logit, since fp16 keeps ~3
# significant digits whatever the scale.
FP32_BOUND = 1e-4
FP16_RELATIVE_BOUND = 1e-2
DECODE_STEPS = 3
PROMPT_LENGTHS = (9, 5)  # the second prompt is left-padded to the first's length


@dataclass
class Check:
    name: str
    bound: float  # on the logits; the presents get the same bound relative to their own scale
    max_abs_diff: float  # over the logits of every position, padding included
    present_max_abs_diff: float  # over the returned k/v cache
    top1_agreement: float  # over the positions of real (not padding) tokens
    decisive_top1_agreement: float  # over those where the reference's top two logits differ by more than the bound
    finite: bool
    passed: bool = False
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "bound": self.bound, "max_abs_diff": self.max_abs_diff, "present_max_abs_diff": self.present_max_abs_diff,
                "top1_agreement": self.top1_agreement, "decisive_top1_agreement": self.decisive_top1_agreement,
                "finite": self.finite, "passed": self.passed}


@dataclass
class ValidationReport:
    precision: str
    checks: list[Check]
    fp16_ranges: dict | None = None  # fp16 exports: the reference's largest activations (fp16_ranges)

    @property
    def bound(self) -> float:
        return max(c.bound for c in self.checks)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def max_abs_diff(self) -> float:
        return max(c.max_abs_diff for c in self.checks)

    @property
    def top1_agreement(self) -> float:
        return min(c.top1_agreement for c in self.checks)

    @property
    def decisive_top1_agreement(self) -> float:
        return min(c.decisive_top1_agreement for c in self.checks)

    def failures(self) -> str:
        """The failed checks and what differed, on one line."""
        return "; ".join(f"{c.name}: {', '.join(c.failures)}" for c in self.checks if not c.passed)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "runtime": "onnxruntime CPUExecutionProvider", "precision": self.precision,
                "bound": self.bound, "max_abs_diff": self.max_abs_diff, "top1_agreement": self.top1_agreement,
                "decisive_top1_agreement": self.decisive_top1_agreement, "checks": [c.to_dict() for c in self.checks],
                **({"fp16_ranges": self.fp16_ranges} if self.fp16_ranges else {})}


def bound_for(precision: str, reference: np.ndarray) -> float:
    if precision == "fp32":
        return FP32_BOUND
    return FP16_RELATIVE_BOUND * max(1.0, float(np.abs(reference).max()))


def validate_export(folder: Path, reference: GPT, precision: str, *, token_limit: int | None = None,
                    seed: int = 1234) -> ValidationReport:
    """Runs the folder's graphs in ONNX Runtime (CPU) and compares them with `reference` (fp32).

    token_limit: prompt and generated ids stay below it (the tokenizer's vocab_size; a padded
    vocabulary's extra ids are never real tokens).
    """
    import onnxruntime as ort

    config = reference.config
    token_limit = min(token_limit or config.vocab_size, config.vocab_size)
    cache_dtype = np.float16 if precision == "fp16" else np.float32
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's warnings about fp16 nodes it runs in fp32 on CPU are expected
    sessions = {role: ort.InferenceSession(str(folder / graph_file(role, precision)), options,
                                           providers=["CPUExecutionProvider"])
                for role in (WITH_PAST, NO_PAST)}

    lengths = [min(n, config.block_size - DECODE_STEPS) for n in PROMPT_LENGTHS]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, token_limit, (len(lengths), max(lengths)), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, ids.shape[1] - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    checks = []
    # prefill with past length 0, then decode steps feeding the presents back
    empty_past = np.zeros((ids.shape[0], config.n_head, 0, config.head_dim), cache_dtype)
    past = {name: empty_past for name in past_names(config.n_layer)}
    step_ids, step_positions, full_ids = ids, positions, ids
    ref_cache = None
    for step in range(DECODE_STEPS + 1):
        with torch.no_grad():
            ref = reference(step_ids, attention_mask=mask, position_ids=step_positions, past_key_values=ref_cache)
        outputs = sessions[WITH_PAST].run(None, {
            "input_ids": step_ids.numpy(), "attention_mask": mask.numpy(), "position_ids": step_positions.numpy(),
            **past,
        })
        file = graph_file(WITH_PAST, precision)
        name = f"{file} prefill (past length 0)" if step == 0 else f"{file} decode step {step}"
        real = mask[:, -step_ids.shape[1]:].bool().numpy()
        checks.append(_compare(name, precision, outputs, ref, real))
        past = dict(zip(past_names(config.n_layer), outputs[1:]))
        ref_cache = ref.present
        if step == DECODE_STEPS:
            break
        step_ids = ref.logits[:, -1, :token_limit].argmax(-1, keepdim=True)
        full_ids = torch.cat([full_ids, step_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        step_positions = step_positions[:, -1:] + 1

    # the no-past graph on the whole sequence
    full_positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = reference(full_ids, attention_mask=mask, position_ids=full_positions)
    outputs = sessions[NO_PAST].run(None, {
        "input_ids": full_ids.numpy(), "attention_mask": mask.numpy(), "position_ids": full_positions.numpy(),
    })
    name = f"{graph_file(NO_PAST, precision)} (no past), whole sequence"
    checks.append(_compare(name, precision, outputs, ref, mask.bool().numpy()))
    ranges = fp16_ranges(reference, full_ids, mask, full_positions) if precision == "fp16" else None
    return ValidationReport(precision, checks, ranges)


def _compare(name: str, precision: str, outputs: list[np.ndarray], ref, real: np.ndarray) -> Check:
    logits, presents = outputs[0], outputs[1:]
    ref_logits = ref.logits.numpy()
    ref_presents = [t.numpy() for kv in ref.present for t in kv]
    finite = bool(np.isfinite(logits).all() and all(np.isfinite(p).all() for p in presents))
    diff = float(np.abs(logits - ref_logits).max())
    present_diff = max(float(np.abs(p.astype(np.float32) - r).max()) for p, r in zip(presents, ref_presents))
    present_bound = max(bound_for(precision, r) for r in ref_presents)
    bound = bound_for(precision, ref_logits)
    agree = logits.argmax(-1) == ref_logits.argmax(-1)
    top_two = np.sort(ref_logits, axis=-1)[..., -2:]
    decisive = real & (top_two[..., 1] - top_two[..., 0] > bound)
    check = Check(name, bound, diff, present_diff, float(agree[real].mean()),
                  float(agree[decisive].mean()) if decisive.any() else 1.0, finite)
    if not finite:
        check.failures.append("non-finite values in the outputs")
    if not diff <= bound:
        check.failures.append(f"max |logits diff| {diff:.3g} > bound {bound:.3g}")
    if not present_diff <= present_bound:
        check.failures.append(f"max |present diff| {present_diff:.3g} > bound {present_bound:.3g}")
    if check.decisive_top1_agreement < 1.0:
        check.failures.append(f"top-1 differs where the reference's lead exceeds the bound "
                              f"({check.decisive_top1_agreement:.1%} agree)")
    check.passed = not check.failures
    return check


FP16_MAX = 65504.0


@torch.no_grad()
def fp16_ranges(reference: GPT, ids, mask, positions) -> dict:
    """The reference's largest activations where fp16 could overflow (its largest finite value is 65504).

    residual_stream: |x| entering each block and ln_f; layernorm_sum_of_squares: sum of x^2 over the
    features of a LayerNorm input, what an fp16 variance would accumulate; attention_scores:
    |q.k|/sqrt(head_dim); mlp_hidden: |c_fc output|; logits: |logits|.
    """
    from gptdeploy.model import LayerNorm

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
