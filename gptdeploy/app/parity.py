"""Cross-runtime parity: the same inputs through several runtimes, each compared with a reference.

    reference, tokenizer = open_runner("torch", "gpt2", weights="random")
    record = record_reference(reference, tokenizer, ["Hello", "The"], steps=8, greedy_tokens=32)
    runner, _ = open_runner("ort", "gpt2", weights="random")
    result = compare(runner, record)              # RuntimeResult: metrics per step, checks, passed

`gptdeploy parity` itself (targets, the run, its report) is gptdeploy.app.parity_run.
Runners produce outputs, gptdeploy.compare compares them, this module feeds both (Polygraphy's
loaders / runners / comparator). The same code validates every export and variant before it is
written (gptdeploy.app.validation), with the comparator's export-time profile.

The inputs are "cases": all prompts as one left-padded batch, and each prompt alone. A case is a
prefill and `steps` decode steps with the KV cache (gptdeploy.steps builds the inputs). The token fed
at each decode step is the reference's greedy choice, recorded once, so every runtime sees exactly
the same inputs, and a difference at one step does not change the inputs of the next. Then each
runtime generates greedily on its own, and its tokens are compared with the reference's until they
diverge.

Metrics are computed per step over the real (non-padding) positions of every case together; each
metric's value over all steps is checked against its tolerance. Needs numpy only: torch is imported
by the torch runner, if one is used.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from gptdeploy.app.generation import GenerationConfig, generate, prepare_prompts
from gptdeploy.compare import (
    METRICS, Check, agreeing_prefix, cache_metrics, check, looser_precision, step_metrics, tolerances_for,
)
from gptdeploy.errors import GptDeployError
from gptdeploy.steps import StepInputs, decode_inputs, prefill_inputs
from gptdeploy.tokenizer import Tokenizer

DEFAULT_STEPS = 8
DEFAULT_GREEDY_TOKENS = 32


@dataclass
class StepOutputs:
    logits: np.ndarray  # [real positions, vocab]: the rows of the step's real positions
    cache: list[tuple[np.ndarray, np.ndarray]]  # Runner.cache_to_numpy after the step


@dataclass
class Case:
    name: str
    rows: list[list[int]]  # the prompts' token ids
    inputs: list[StepInputs] = field(default_factory=list)  # prefill, then one per decode step
    reference: list[StepOutputs] = field(default_factory=list)


@dataclass
class ReferenceRecord:
    """The inputs of every step, and what the reference returned for them."""

    runtime: str
    precision: str
    device: str
    description: str
    tokenizer: Tokenizer
    prompts: list
    cases: list[Case]
    steps: int
    greedy_tokens: int
    greedy_rows: list[list[int]]  # the prompts' ids
    greedy_ids: list[list[int]]  # the reference's greedy tokens per prompt (empty without greedy_tokens)
    info: object  # the reference runner's ModelInfo

    @property
    def step_labels(self) -> list[str]:
        return ["prefill"] + [f"decode {i}" for i in range(1, self.steps + 1)]

    @property
    def work(self) -> int:
        """Model steps a runtime runs: every case's steps, then greedy generation."""
        return len(self.cases) * (self.steps + 1) + self.greedy_tokens


def _outputs(runner, inputs: StepInputs, cache) -> tuple[np.ndarray, object, StepOutputs]:
    logits, cache = runner.step(*inputs, cache)
    return logits, cache, StepOutputs(logits[inputs.real], runner.cache_to_numpy(cache))


def record_reference(runner, tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]], *,
                     steps: int = DEFAULT_STEPS, greedy_tokens: int = DEFAULT_GREEDY_TOKENS, alone: bool = True,
                     on_step: Callable[[], None] | None = None) -> ReferenceRecord:
    """Runs the reference on every case, choosing each decode step's token greedily, and generates.

    prompts: text, or token ids. alone: each prompt is also a case of its own (besides the batch).
    steps: decode steps after the prefill (0: the prefill only); greedy_tokens: 0 generates nothing.
    The prompts must fit the context with max(steps, greedy_tokens) new tokens (GptDeployError if not).
    """
    if steps < 0 or greedy_tokens < 0:
        raise GptDeployError(f"steps and greedy tokens must be >= 0, got {steps} and {greedy_tokens}")
    rows = prepare_prompts(tokenizer, list(prompts), runner.info.vocab_size, runner.info.block_size,
                           max(steps, greedy_tokens))
    cases = [Case("batch", rows)] if len(rows) > 1 else []
    if alone or len(rows) == 1:
        cases += [Case(f"prompt {i}", [ids]) for i, ids in enumerate(rows)]
    for case in cases:
        inputs, cache = prefill_inputs(case.rows), runner.new_cache(len(case.rows))
        for step in range(steps + 1):
            logits, cache, outputs = _outputs(runner, inputs, cache)
            case.inputs.append(inputs)
            case.reference.append(outputs)
            if on_step:
                on_step()
            inputs = decode_inputs(inputs, logits[:, -1, :tokenizer.vocab_size].argmax(-1))
    greedy = _greedy(runner, tokenizer, rows, greedy_tokens, on_step) if greedy_tokens else []
    return ReferenceRecord(runner.name, runner.precision, runner.device, runner.describe(), tokenizer,
                           list(prompts), cases, steps, greedy_tokens, rows, greedy, runner.info)


def _greedy(runner, tokenizer, rows, tokens, on_step) -> list[list[int]]:
    config = GenerationConfig(max_new_tokens=tokens, greedy=True, stop_at_eot=False)
    on_token = (lambda row, _token: on_step() if row == 0 else None) if on_step else None
    return generate(runner, tokenizer, rows, config, on_token=on_token).new_ids


# --- comparing one runtime ---


@dataclass
class RuntimeResult:
    runtime: str
    precision: str
    device: str
    description: str
    tolerances: dict[str, float | None]
    steps: list[dict]  # per step: {"step": label, "positions": n, "metrics": {...}}
    overall: dict  # the same over every step's positions together; the checks judge these values
    greedy: dict | None  # {"tokens": n, "agreeing": [per prompt], "first_divergence": [per prompt]}
    checks: list[Check]
    seconds: float
    variant: str | None = None  # an export's ONNX Runtime variant (int8, q4, fp32-fused), if the runner ran one
    profile: str = "parity"

    @property
    def label(self) -> str:
        """'ort fp16', 'ort q4': the runtime and its precision, or the variant it ran."""
        return f"{self.runtime} {self.variant or self.precision}"

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return json_safe({
            "runtime": self.runtime, "precision": self.precision, "variant": self.variant, "device": self.device,
            "description": self.description, "profile": self.profile, "passed": self.passed,
            "seconds": self.seconds, "tolerances": self.tolerances,
            "checks": [vars(c) | {"message": c.describe() if not c.passed else None} for c in self.checks],
            "overall": self.overall, "steps": self.steps, "greedy": self.greedy,
        })


def compare(runner, record: ReferenceRecord, tolerances: dict[str, float | None] | None = None, *,
            profile: str = "parity", on_step: Callable[[], None] | None = None) -> RuntimeResult:
    """Runs `runner` on the reference's inputs and checks it against the reference.

    tolerances: per metric, over the table (gptdeploy.compare.tolerances_for) of the runner's precision,
        or of the reference's where that is the looser (an fp32 runtime against an fp16 reference).
    profile: which metrics are checked ("parity": all; "export": those an export's validation checks).
    """
    start = time.perf_counter()
    if runner.info != record.info:
        raise GptDeployError(f"{runner.describe()} runs another model than the reference {record.description}: "
                             f"{runner.info} vs {record.info}")
    precision = looser_precision(runner.precision, record.precision)
    tolerances = {**tolerances_for(precision, profile), **(tolerances or {})}
    n_steps = record.steps + 1
    test_rows: list[list[np.ndarray]] = [[] for _ in range(n_steps)]
    ref_rows: list[list[np.ndarray]] = [[] for _ in range(n_steps)]
    cache_stats: list[list[dict]] = [[] for _ in range(n_steps)]
    for case in record.cases:
        cache = runner.new_cache(len(case.rows))
        for k, (inputs, ref) in enumerate(zip(case.inputs, case.reference)):
            _, cache, out = _outputs(runner, inputs, cache)
            test_rows[k].append(out.logits)
            ref_rows[k].append(ref.logits)
            cache_stats[k].append(cache_metrics(out.cache, ref.cache, inputs.cache_real))
            if on_step:
                on_step()
    vocab_limit = record.tokenizer.vocab_size
    steps = [{"step": label, "positions": int(sum(len(t) for t in test)),
              "metrics": step_metrics(test, ref, caches, vocab_limit)}
             for label, test, ref, caches in zip(record.step_labels, test_rows, ref_rows, cache_stats)]
    # every position of every step together: what the checks judge. For the max and min metrics it
    # is the worst step; the fractions (top-1, top-5) and mean_abs count every position once, so one
    # flipped token among a decode step's few rows does not weigh like a tenth of the run.
    overall = {"step": "all steps", "positions": sum(s["positions"] for s in steps),
               "metrics": step_metrics(sum(test_rows, []), sum(ref_rows, []), sum(cache_stats, []), vocab_limit)}
    checks = [check(name, overall["metrics"][name], tolerances.get(name),
                    {s["step"]: s["metrics"][name] for s in steps}) for name in METRICS if name != "greedy"]
    greedy = None
    if record.greedy_tokens:
        generated = _greedy(runner, record.tokenizer, record.greedy_rows, record.greedy_tokens, on_step)
        agreeing = [agreeing_prefix(test, ref) for test, ref in zip(generated, record.greedy_ids)]
        greedy = {
            "tokens": record.greedy_tokens, "agreeing": agreeing,
            "first_divergence": [None if n == len(ref) else {"token": n, "reference": ref[n], "runtime": test[n]}
                                 for n, test, ref in zip(agreeing, generated, record.greedy_ids)],
        }
        checks.append(check("greedy", min(agreeing) / record.greedy_tokens, tolerances.get("greedy")))
    return RuntimeResult(runner.name, runner.precision, runner.device, runner.describe(), tolerances, steps,
                         overall, greedy, checks, time.perf_counter() - start, getattr(runner, "variant", None),
                         profile)


def json_safe(value):
    """NaN and Inf (a broken runtime's values) as strings: JSON has no literal for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
