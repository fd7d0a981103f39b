"""Cross-runtime parity: the same inputs through several runtimes, each compared with a reference.

    reference, tokenizer = open_runner("torch", "gpt2", weights="random")
    record = record_reference(reference, tokenizer, DEFAULT_PROMPTS, steps=8, greedy_tokens=32)
    runner, _ = open_runner("ort", "gpt2", weights="random")
    result = compare(runner, record)              # RuntimeResult: metrics per step, checks, passed

Runners produce outputs, gptdeploy.parity_metrics compares them, this module feeds both (Polygraphy's
loaders / runners / comparator). The inputs are "cases": all prompts as one left-padded batch, and
each prompt alone. A case is a prefill and `steps` decode steps with the KV cache. The token fed at
each decode step is the reference's greedy choice, recorded once, so every runtime sees exactly the
same inputs, and a difference at one step does not change the inputs of the next. Then each runtime
generates greedily on its own, and its tokens are compared with the reference's until they diverge.

Metrics are computed per step over the real (non-padding) positions of every case together; each
metric's worst value over the steps is checked against its tolerance. Needs numpy only: torch is
imported by the torch runner, if one is used.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptdeploy.errors import GptDeployError
from gptdeploy.generation import PAD_ID, GenerationConfig, generate, prepare_prompts
from gptdeploy.parity_metrics import (
    METRICS, agreeing_prefix, cache_metrics, default_tolerances, logits_metrics, looser_precision, passes,
    passing_tolerance,
)
from gptdeploy.tokenizer import Tokenizer

# Different lengths, so the batch is ragged; plain ASCII, so a character-level vocabulary has them too.
DEFAULT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, my name is",
    "To be, or not to be, that is the question:",
    "In the beginning",
]
DEFAULT_STEPS = 8
DEFAULT_GREEDY_TOKENS = 32
REPORT_FORMAT = "gptdeploy-parity"


@dataclass
class StepInputs:
    input_ids: np.ndarray  # int64 [batch, seq]
    attention_mask: np.ndarray  # int64 [batch, past + seq]
    position_ids: np.ndarray  # int64 [batch, seq]

    @property
    def real(self) -> np.ndarray:
        """bool [batch, seq]: the positions of input_ids that are tokens, not left padding."""
        return self.attention_mask[:, -self.input_ids.shape[1]:] == 1

    @property
    def cache_real(self) -> np.ndarray:
        """bool [batch, past + seq]: the real positions of the cache after this step."""
        return self.attention_mask == 1


def prefill_inputs(rows: Sequence[Sequence[int]]) -> StepInputs:
    """Prompts of different lengths as one left-padded batch; positions count real tokens only."""
    longest = max(len(ids) for ids in rows)
    input_ids = np.full((len(rows), longest), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for r, ids in enumerate(rows):
        input_ids[r, longest - len(ids):] = ids
        mask[r, longest - len(ids):] = 1
    return StepInputs(input_ids, mask, np.maximum(mask.cumsum(-1) - 1, 0))


def decode_inputs(previous: StepInputs, tokens: np.ndarray) -> StepInputs:
    """The next step after `previous`: one new token per row."""
    mask = np.concatenate([previous.attention_mask, np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
    return StepInputs(tokens.astype(np.int64)[:, None], mask, mask.sum(-1, keepdims=True) - 1)


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
    prompts: list[str]
    cases: list[Case]
    steps: int
    greedy_tokens: int
    greedy_rows: list[list[int]]  # the prompts' ids
    greedy_ids: list[list[int]]  # the reference's greedy tokens per prompt
    info: object  # the reference runner's ModelInfo

    @property
    def step_labels(self) -> list[str]:
        return ["prefill"] + [f"decode {i}" for i in range(1, self.steps + 1)]

    @property
    def work(self) -> int:
        """Model steps a runtime runs: every case's steps, then greedy generation."""
        return len(self.cases) * (self.steps + 1) + self.greedy_tokens


def _run_case(runner, inputs: list[StepInputs]) -> Iterator[StepOutputs]:
    cache = runner.new_cache(inputs[0].input_ids.shape[0])
    for step in inputs:
        logits, cache = runner.step(step.input_ids, step.attention_mask, step.position_ids, cache)
        yield StepOutputs(logits[step.real], runner.cache_to_numpy(cache))


def record_reference(runner, tokenizer: Tokenizer, prompts: Sequence[str], *, steps: int = DEFAULT_STEPS,
                     greedy_tokens: int = DEFAULT_GREEDY_TOKENS,
                     on_step: Callable[[], None] | None = None) -> ReferenceRecord:
    """Runs the reference on every case, choosing each decode step's token greedily, and generates.

    The prompts must fit the context with max(steps, greedy_tokens) new tokens (GptDeployError if not).
    """
    if steps < 1 or greedy_tokens < 1:
        raise GptDeployError(f"steps and greedy tokens must be >= 1, got {steps} and {greedy_tokens}")
    rows = prepare_prompts(tokenizer, list(prompts), runner.info.vocab_size, runner.info.block_size,
                           max(steps, greedy_tokens))
    cases = [Case("batch", rows)] if len(rows) > 1 else []
    cases += [Case(f"prompt {i}", [ids]) for i, ids in enumerate(rows)]
    vocab_limit = tokenizer.vocab_size
    for case in cases:
        inputs = prefill_inputs(case.rows)
        cache = runner.new_cache(len(case.rows))
        for step in range(steps + 1):
            logits, cache = runner.step(inputs.input_ids, inputs.attention_mask, inputs.position_ids, cache)
            case.inputs.append(inputs)
            case.reference.append(StepOutputs(logits[inputs.real], runner.cache_to_numpy(cache)))
            if on_step:
                on_step()
            inputs = decode_inputs(inputs, logits[:, -1, :vocab_limit].argmax(-1))
    greedy = _greedy(runner, tokenizer, rows, greedy_tokens, on_step)
    return ReferenceRecord(runner.name, runner.precision, runner.device, runner.describe(), tokenizer,
                           list(prompts), cases, steps, greedy_tokens, rows, greedy, runner.info)


def _greedy(runner, tokenizer, rows, tokens, on_step) -> list[list[int]]:
    config = GenerationConfig(max_new_tokens=tokens, greedy=True, stop_at_eot=False)
    on_token = (lambda row, _token: on_step() if row == 0 else None) if on_step else None
    return generate(runner, tokenizer, rows, config, on_token=on_token).new_ids


# --- comparing one runtime ---


@dataclass
class Check:
    metric: str
    value: float  # the worst over the steps
    tolerance: float | None  # None: reported, not checked
    passed: bool
    failing_steps: list[str]
    passing_tolerance: float | None  # what would have passed (None: nothing would, the value is NaN)
    steps_checked: int  # how many steps the metric was checked at (1: greedy generation)

    def describe(self) -> str:
        """'max_abs 3.2e-03 > 1e-04 at prefill, decode 1 (passes with --tol max_abs=0.0033)'"""
        op = "<" if METRICS[self.metric].higher_is_better else ">"
        if not self.failing_steps:
            where = ""
        elif len(self.failing_steps) == self.steps_checked > 1:
            where = " at every step"
        else:
            where = f" at {', '.join(self.failing_steps)}"
        fix = ("no tolerance passes a NaN" if self.passing_tolerance is None
               else f"passes with --tol {self.metric}={self.passing_tolerance}")
        if METRICS[self.metric].higher_is_better and math.isfinite(self.value):  # a fraction, as --tol takes it
            value = f"{math.floor(self.value * 1e6) / 1e6:g}"
        else:
            value = f"{self.value:.3g}"
        return f"{self.metric} {value} {op} {format_tolerance(self.tolerance)}{where} ({fix})"


@dataclass
class RuntimeResult:
    runtime: str
    precision: str
    device: str
    description: str
    tolerances: dict[str, float | None]
    steps: list[dict]  # per step: {"step": label, "positions": n, "metrics": {...}}
    overall: dict  # the same over every step's positions together; the checks judge these values
    greedy: dict  # {"tokens": n, "agreeing": [per prompt], "first_divergence": [per prompt]}
    checks: list[Check]
    seconds: float
    variant: str | None = None  # an export's ONNX Runtime variant (int8, q4, fp32-fused), if the runner ran one

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
        return _json_safe({
            "runtime": self.runtime, "precision": self.precision, "variant": self.variant, "device": self.device,
            "description": self.description, "passed": self.passed, "seconds": self.seconds,
            "tolerances": self.tolerances,
            "checks": [vars(c) | {"message": c.describe() if not c.passed else None} for c in self.checks],
            "overall": self.overall, "steps": self.steps, "greedy": self.greedy,
        })


def compare(runner, record: ReferenceRecord, tolerances: dict[str, float | None] | None = None, *,
            on_step: Callable[[], None] | None = None) -> RuntimeResult:
    """Runs `runner` on the reference's inputs and checks it against the reference.

    tolerances: per metric, over the defaults (default_tolerances) of the runner's precision, or of
        the reference's where that is the looser (an fp32 runtime against an fp16 reference).
    """
    import time

    start = time.perf_counter()
    _check_same_model(runner, record)
    precision = looser_precision(runner.precision, record.precision)
    tolerances = {**default_tolerances(precision), **(tolerances or {})}
    n_steps = record.steps + 1
    test_rows: list[list[np.ndarray]] = [[] for _ in range(n_steps)]
    ref_rows: list[list[np.ndarray]] = [[] for _ in range(n_steps)]
    cache_stats: list[list[dict]] = [[] for _ in range(n_steps)]
    for case in record.cases:
        for k, (out, ref) in enumerate(zip(_run_case(runner, case.inputs), case.reference)):
            test_rows[k].append(out.logits)
            ref_rows[k].append(ref.logits)
            cache_stats[k].append(cache_metrics(out.cache, ref.cache, case.inputs[k].cache_real))
            if on_step:
                on_step()
    vocab_limit = record.tokenizer.vocab_size

    def step_metrics(label: str, test: list[np.ndarray], ref: list[np.ndarray], caches: list[dict]) -> dict:
        metrics = logits_metrics(np.concatenate(test), np.concatenate(ref), vocab_limit)
        metrics["kv_max_abs"] = _worst([c["kv_max_abs"] for c in caches], higher_is_better=False)
        metrics["nan"] += sum(c["nan"] for c in caches)
        metrics["inf"] += sum(c["inf"] for c in caches)
        metrics["nonfinite"] = metrics["nan"] + metrics["inf"]
        return {"step": label, "positions": int(sum(len(t) for t in test)), "metrics": metrics}

    steps = [step_metrics(*args) for args in zip(record.step_labels, test_rows, ref_rows, cache_stats)]
    # every position of every step together: what the checks judge. For the max and min metrics it
    # is the worst step; the fractions (top-1, top-5) and mean_abs count every position once, so one
    # flipped token among a decode step's few rows does not weigh like a tenth of the run.
    overall = step_metrics("all steps", sum(test_rows, []), sum(ref_rows, []), sum(cache_stats, []))

    generated = _greedy(runner, record.tokenizer, record.greedy_rows, record.greedy_tokens, on_step)
    agreeing = [agreeing_prefix(test, ref) for test, ref in zip(generated, record.greedy_ids)]
    greedy = {
        "tokens": record.greedy_tokens, "agreeing": agreeing,
        "first_divergence": [None if n == len(ref) else {"token": n, "reference": ref[n], "runtime": test[n]}
                             for n, test, ref in zip(agreeing, generated, record.greedy_ids)],
    }
    checks = []
    for name in METRICS:
        tolerance = tolerances.get(name)
        if name == "greedy":
            value, failing, checked = min(agreeing) / record.greedy_tokens, [], 1
        else:
            value = overall["metrics"][name]
            failing = [s["step"] for s in steps if not passes(name, s["metrics"][name], tolerance)]
            checked = len(steps)
        checks.append(Check(name, value, tolerance, passes(name, value, tolerance), failing,
                            passing_tolerance(name, value), checked))
    return RuntimeResult(runner.name, runner.precision, runner.device, runner.describe(), tolerances, steps,
                         overall, greedy, checks, time.perf_counter() - start, getattr(runner, "variant", None))


def _check_same_model(runner, record: ReferenceRecord) -> None:
    a, b = runner.info, record.info
    if a != b:
        raise GptDeployError(f"{runner.describe()} runs another model than the reference {record.description}: "
                             f"{a} vs {b}")


def _worst(values: list[float], higher_is_better: bool) -> float:
    if any(math.isnan(v) for v in values):
        return math.nan
    return min(values) if higher_is_better else max(values)


# --- a whole run: what `gptdeploy parity` does ---


@dataclass(frozen=True)
class Target:
    """A runtime in a precision. precision None: fp32 for a checkpoint, an export folder's own precision."""

    runtime: str
    precision: str | None = None
    device: str | None = None  # for the checkpoint runtimes (torch, hf): cpu, cuda, cuda:N


def parse_targets(runtimes: str, precisions: str | None) -> list[Target]:
    """--runtimes torch,ort and --precision fp32,fp16: every runtime in every precision."""
    names = [n.strip() for n in runtimes.split(",") if n.strip()]
    if not names:
        raise GptDeployError("--runtimes names no runtime")
    chosen = [p.strip() for p in precisions.split(",") if p.strip()] if precisions else [None]
    for precision in chosen:
        if precision is not None:
            default_tolerances(precision)  # an unknown precision fails here, before anything loads
    return [Target(name, precision) for name in dict.fromkeys(names) for precision in dict.fromkeys(chosen)]


def parse_reference(spec: str) -> Target:
    """--reference RUNTIME[:PRECISION], e.g. torch (fp32), torch:fp16, ort."""
    runtime, _, precision = spec.partition(":")
    if not runtime:
        raise GptDeployError(f"--reference takes RUNTIME[:PRECISION], e.g. torch or ort:fp32; got {spec!r}")
    if precision:
        default_tolerances(precision)
    return Target(runtime, precision or None)


def read_prompts(path: str | Path) -> list[str]:
    """A prompts file: one prompt per line; empty lines are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GptDeployError(f"cannot read the prompts file {path}: {e}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise GptDeployError(f"the prompts file {path} holds no prompt (one prompt per line)")
    return prompts


def run_parity(source: str, targets: Sequence[Target], *, reference: Target = Target("torch", "fp32"),
               export: str | Path | None = None, prompts: Sequence[str] = DEFAULT_PROMPTS,
               steps: int = DEFAULT_STEPS, greedy_tokens: int = DEFAULT_GREEDY_TOKENS,
               tolerances: dict[str, float] | None = None, weights: str | None = None, weights_seed: int = 0,
               progress: bool = True) -> ParityReport:
    """Records the reference on `source`, then runs and checks every target against it, one at a time.

    source: anything gptdeploy.load takes, or an export folder (then the reference must be an ONNX
        runtime). An ONNX runtime runs source itself when it is an export folder, or the checkpoint
        exported into the export cache (gptdeploy.export_cache).
    export: an export folder that the checked ONNX runtimes run instead (the reference still runs source).
    tolerances: overrides of the defaults, for every target.
    A target that is the reference itself is not run again; the report's notes say so.
    """
    from gptdeploy.export_folder import is_export_folder, read_export
    from runtimes.registry import CHECKPOINT, open_runner, require

    for target in (reference, *targets):
        require(target.runtime)  # unknown or unavailable: one line before anything loads
    source_is_folder = is_export_folder(Path(source))
    if source_is_folder and require(reference.runtime).runs == CHECKPOINT:
        raise GptDeployError(
            f"{source} is an export folder, which the {reference.runtime} reference cannot run; pass the checkpoint "
            f"or preset it was exported from as SOURCE and the folder with --export, or compare against "
            f"--reference ort")
    if export is not None and not is_export_folder(Path(export)):
        raise GptDeployError(f"--export {export}: not a gptdeploy export folder (no gptdeploy.json)")

    def resolved(t: Target, is_reference: bool = False) -> tuple[str, str, str | None, str]:
        """(runtime, precision, device, what it runs) with the defaults filled in."""
        if require(t.runtime).runs == CHECKPOINT:
            return t.runtime, t.precision or "fp32", t.device or "cpu", str(source)
        folder = str(export) if export is not None and not is_reference else str(source)
        default = read_export(folder).precision if is_export_folder(Path(folder)) else "fp32"
        return t.runtime, t.precision or default, None, folder

    def open_target(t: Target, is_reference: bool = False):
        runtime, precision, device, where = resolved(t, is_reference)
        return open_runner(runtime, where, precision=t.precision, device=device, weights=weights,
                           weights_seed=weights_seed, progress=progress)

    the_reference = resolved(reference, is_reference=True)
    same = " ".join(the_reference[:2])
    notes = [f"{same} is the reference; not compared with itself"] if any(
        resolved(t) == the_reference for t in targets) else []
    targets = [t for t in targets if resolved(t) != the_reference]
    if not targets:
        raise GptDeployError(f"nothing to compare: {same} is the reference; name other runtimes or precisions")
    runner, tokenizer = open_target(reference, is_reference=True)
    with _progress(progress) as bar:
        task = bar.add_task(f"reference {runner.describe()}", total=None)
        record = record_reference(runner, tokenizer, prompts, steps=steps, greedy_tokens=greedy_tokens,
                                  on_step=lambda: bar.advance(task))
    runner.close()
    results = []
    for target in targets:
        runner, _ = open_target(target)
        try:
            with _progress(progress) as bar:
                task = bar.add_task(runner.describe(), total=record.work)
                results.append(compare(runner, record, tolerances, on_step=lambda: bar.advance(task)))
        finally:
            runner.close()
    return ParityReport(str(source), record, results, notes)


def _progress(enabled: bool):
    """A progress bar on stderr; silent when disabled or when stderr is not a terminal (a log file)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not (enabled and console.is_terminal))


# --- the report ---


@dataclass
class ParityReport:
    source: str
    record: ReferenceRecord
    results: list[RuntimeResult]
    notes: list[str] = field(default_factory=list)  # e.g. a requested runtime that is the reference itself

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def to_dict(self) -> dict:
        from gptdeploy import __version__

        rec = self.record
        return {
            "format": REPORT_FORMAT, "format_version": 1, "gptdeploy_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": self.source, "passed": self.passed,
            "reference": {"runtime": rec.runtime, "precision": rec.precision, "device": rec.device,
                          "description": rec.description},
            "inputs": {
                "prompts": rec.prompts, "prompt_ids": rec.greedy_rows, "steps": rec.steps,
                "greedy_tokens": rec.greedy_tokens, "cases": [c.name for c in rec.cases],
                "reference_greedy_ids": rec.greedy_ids,
            },
            "metrics": {name: {"summary": m.summary, "checked_as": ">=" if m.higher_is_better else "<="}
                        for name, m in METRICS.items()},
            "runtimes": [r.to_dict() for r in self.results],
            "notes": self.notes,
        }

    def write_json(self, path: str | Path) -> None:
        """Writes to a temporary file beside `path`, renamed at the end: never a half-written report."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _json_safe(value):
    """NaN and Inf (a broken runtime's values) as strings: JSON has no literal for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def format_value(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric == "nonfinite":
        return str(int(value))
    if not math.isfinite(value):
        return str(value)
    # fractions are floored, so that 99.996% never shows as 100% nor 0.9999996 as 1.000000
    if metric in ("top1", "top5", "greedy"):
        return "100%" if value >= 1 else f"{math.floor(value * 1e4) / 100:.2f}%"
    if metric == "cosine":  # near 1, what matters is how near: 1-4e-07
        if value >= 1:
            return "1"
        return f"1-{1 - value:.1e}" if value > 0.999 else f"{math.floor(value * 1e6) / 1e6:.6f}"
    return "0" if value == 0 else f"{value:.1e}"


def format_tolerance(tolerance: float | None) -> str:
    return "-" if tolerance is None else f"{tolerance:.6g}"


COLUMNS = ["max_abs", "mean_abs", "max_rel", "cosine", "top1", "flip_lead", "top5", "kv_max_abs", "nonfinite"]
HEADERS = ["max abs", "mean abs", "max rel", "cos min", "top-1", "flip lead", "top-5", "KV max", "NaN/Inf"]


def _cells(metrics: dict, tolerances: dict) -> list[str]:
    """A table row's values; those that fail their tolerance in red."""
    cells = []
    for name in COLUMNS:
        text = format_value(name, metrics[name])
        cells.append(text if passes(name, metrics[name], tolerances.get(name)) else f"[red]{text}[/red]")
    return cells


def print_report(report: ParityReport, console=None) -> None:
    """The report as rich tables, one per runtime: its tolerances, then a row per step (failing values
    in red); below each, the verdict, greedy agreement, and each failed check with the tolerance that
    would have passed."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # a log file or a pipe gets rich's 80 columns; the table needs a few more
    console = console or Console(width=None if sys.stdout.isatty() else 100)
    console.print(f"Parity of {report.source} against the reference {report.record.description}",
                  highlight=False, soft_wrap=True)
    for result in report.results:
        table = Table(title=f"{result.label}: {result.description}", title_justify="left",
                      title_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1),
                      collapse_padding=True)
        table.add_column("step", no_wrap=True)
        for header in HEADERS:
            table.add_column(header, justify="right", no_wrap=True)
        bounds = []
        for name in COLUMNS:
            tol = result.tolerances.get(name)
            near_one = name == "cosine" and tol is not None and tol > 0.999
            text = f"1-{1 - tol:.0e}" if near_one else format_tolerance(tol)
            bounds.append("" if tol is None else ("≥" if METRICS[name].higher_is_better else "≤") + text)
        table.add_row("tol", *bounds, style="dim")
        for step in result.steps:
            table.add_row(step["step"], *_cells(step["metrics"], result.tolerances),
                          end_section=step is result.steps[-1])
        table.add_row("all", *_cells(result.overall["metrics"], result.tolerances), style="bold")
        console.print(table)
        agree = ", ".join(f"{n}/{result.greedy['tokens']}" for n in result.greedy["agreeing"])
        failed, checked = len(result.failures), sum(c.tolerance is not None for c in result.checks)
        verdict = (f"[green]PASS[/green] {result.label}: all {checked} checks pass" if not failed
                   else f"[red]FAIL[/red] {result.label}: {failed} of {checked} checks fail")
        # soft_wrap: a line a script can grep, however narrow the terminal
        console.print(f"{verdict}; greedy generation agrees for {agree} tokens before the first divergence",
                      highlight=False, soft_wrap=True)
        for check in result.failures:
            console.print(f"     [red]{check.describe()}[/red]", highlight=False, soft_wrap=True)
        console.print()
    for note in report.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
