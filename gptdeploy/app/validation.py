"""Validation before anything is written: parity of ONNX Runtime against the reference, export-time profile.

An export and each ONNX Runtime variant are checked with the same code as `gptdeploy parity`
(gptdeploy.app.parity, gptdeploy.compare) and the same tolerance table per precision; the export-time
profile checks every metric but the fractions top1 / top5 and greedy generation (gptdeploy.compare).

The inputs: a batch of two prompts of random token ids, 9 and 5 tokens (the second left-padded), a
prefill and DECODE_STEPS decode steps with the KV cache, each fed the reference's greedy token so both
sides see the same sequence. An export's no-past graph then scores the whole sequence in one step.
The reference is the PyTorch model in fp32 on the CPU, or, for a variant made without it, the
export's portable onnx/model.onnx in ONNX Runtime (itself validated against the PyTorch model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gptdeploy.app.parity import RuntimeResult, compare, record_reference
from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import NO_PAST, WITH_PAST, ExportFolder
from gptdeploy.runtimes.ort import OrtRunner, SessionConfig

DECODE_STEPS = 3
PROMPT_LENGTHS = (9, 5)  # the second prompt is left-padded to the first's length
PROFILE = "export"
RUNTIME = "onnxruntime CPUExecutionProvider"


@dataclass
class ValidationReport:
    """The comparison of each graph checked, and what it was checked against."""

    precision: str
    reference: str
    results: dict[str, RuntimeResult]  # graph file -> its comparison
    sequences: list[list[int]] = field(default_factory=list)  # the longest token ids each prompt ran with

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results.values())

    def worst(self, metric: str) -> float:
        values = [r.overall["metrics"][metric] for r in self.results.values()]
        return min(values) if metric in ("top1", "top5", "cosine") else max(values)

    def failures(self) -> str:
        """The failed checks and what differed, on one line."""
        return "; ".join(f"{file}: {', '.join(c.describe() for c in r.failures)}"
                         for file, r in self.results.items() if not r.passed)

    def to_dict(self) -> dict:
        """The manifest's "validation" entry."""
        return {
            "passed": self.passed, "runtime": RUNTIME, "reference": self.reference, "precision": self.precision,
            "profile": PROFILE, "inputs": {"prompt_lengths": list(PROMPT_LENGTHS), "decode_steps": DECODE_STEPS},
            "max_abs_diff": self.worst("max_abs"), "max_rel_diff": self.worst("max_rel"),
            "cosine": self.worst("cosine"), "top1_agreement": self.worst("top1"),
            "graphs": {file: _summary(r) for file, r in self.results.items()},
        }


def _summary(result: RuntimeResult) -> dict:
    return {
        "passed": result.passed, "positions": result.overall["positions"],
        "checks": {c.metric: {"value": c.value, "tolerance": c.tolerance, "passed": c.passed}
                   for c in result.checks if c.tolerance is not None},
        "metrics": {k: result.overall["metrics"][k] for k in ("max_abs", "max_rel", "cosine", "top1", "top5",
                                                              "flip_lead", "kv_max_abs", "nonfinite")},
        **({"failures": "; ".join(c.describe() for c in result.failures)} if not result.passed else {}),
    }


def validation_prompts(config: dict, token_limit: int, seed: int = 1234) -> list[list[int]]:
    """The prompts' token ids: random, below token_limit, and short enough to leave room for the steps."""
    rng = np.random.default_rng(seed)
    lengths = [min(n, config["block_size"] - DECODE_STEPS) for n in PROMPT_LENGTHS]
    return [rng.integers(0, token_limit, n).tolist() for n in lengths]


def torch_reference(model):
    """The PyTorch model as the reference runner; it must be fp32 on the CPU."""
    import torch

    from gptdeploy.runtimes.torch_runner import TorchRunner

    param = next(model.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu":
        raise GptDeployError(f"the reference model must be fp32 on the CPU, not {param.dtype} on {param.device}")
    return TorchRunner(model)


def validate_export(folder: ExportFolder, reference_model, tokenizer) -> ValidationReport:
    """The export's graphs (in ONNX Runtime, CPU) against the PyTorch model, fp32 on the CPU."""
    reference = torch_reference(reference_model)
    prompts = validation_prompts(folder.config, min(tokenizer.vocab_size, folder.config["vocab_size"]))
    record = record_reference(reference, tokenizer, prompts, steps=DECODE_STEPS, greedy_tokens=0, alone=False)
    results = {folder.manifest["graphs"][WITH_PAST]["file"]: _compare(OrtRunner(folder, SessionConfig()), record)}
    # the no-past graph scores the whole sequence (the prompts and the tokens fed after them) at once
    fed = np.concatenate([step.input_ids for step in record.cases[0].inputs[1:]], axis=1).tolist()
    whole = [list(prompt) + tokens for prompt, tokens in zip(prompts, fed)]
    record = record_reference(reference, tokenizer, whole, steps=0, greedy_tokens=0, alone=False)
    no_past = OrtRunner(folder, SessionConfig(), graph=NO_PAST)
    results[folder.manifest["graphs"][NO_PAST]["file"]] = _compare(no_past, record)
    return ValidationReport(folder.precision, "the PyTorch model (fp32)", results, whole)


def _compare(runner, record) -> RuntimeResult:
    try:
        return compare(runner, record, profile=PROFILE)
    finally:
        runner.close()


def validate_variant(folder: ExportFolder, staged: ExportFolder, name: str, reference_model, tokenizer) -> dict:
    """Variant `name` of the export `folder`, staged in `staged` (a folder whose manifest lists it), run as
    gptdeploy runs it, against the PyTorch model when given, else the export's portable graph; returns the
    manifest's validation entry."""
    if reference_model is not None:
        reference, described = torch_reference(reference_model), "the PyTorch model (fp32)"
    else:
        reference = OrtRunner(folder, SessionConfig())
        described = f"{folder.manifest['graphs'][WITH_PAST]['file']} in ONNX Runtime"
    prompts = validation_prompts(staged.config, min(tokenizer.vocab_size, staged.config["vocab_size"]))
    try:
        record = record_reference(reference, tokenizer, prompts, steps=DECODE_STEPS, greedy_tokens=0, alone=False)
    finally:
        reference.close()
    result = _compare(OrtRunner(staged, SessionConfig(), variant=name), record)
    report = ValidationReport(staged.variants[name]["precision"], described, {staged.variants[name]["file"]: result})
    return report.to_dict()
