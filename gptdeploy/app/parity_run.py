"""`gptdeploy parity`: the reference on a source, then every runtime checked against it, and the report.

    report = run_parity("gpt2", [Target("ort", "fp16")], weights="random")
    report.passed, report.to_dict()

The comparison itself is gptdeploy.app.parity (record_reference, compare); printing the report is
gptdeploy.app.parity_report.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gptdeploy import __version__
from gptdeploy.app.export_cache import ExportCache
from gptdeploy.app.generation import prepare_prompts
from gptdeploy.app.parity import (
    DEFAULT_GREEDY_TOKENS, DEFAULT_STEPS, ReferenceRecord, RuntimeResult, compare, record_reference,
)
from gptdeploy.app.sources import open_runner
from gptdeploy.compare import METRICS
from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import is_export_folder, now, read_export
from gptdeploy.files import write_atomic
from gptdeploy.precision import CHECKPOINT, canonical
from gptdeploy.progress import QUIET, Progress
from gptdeploy.runtimes.registry import require

# Different lengths, so the batch is ragged; plain ASCII, so a character-level vocabulary has them too.
DEFAULT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, my name is",
    "To be, or not to be, that is the question:",
    "In the beginning",
]
REPORT_FORMAT = "gptdeploy-parity"


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
            canonical(precision)  # an unknown precision fails here, before anything loads
    return [Target(name, precision) for name in dict.fromkeys(names) for precision in dict.fromkeys(chosen)]


def parse_reference(spec: str) -> Target:
    """--reference RUNTIME[:PRECISION], e.g. torch (fp32), torch:fp16, ort."""
    runtime, _, precision = spec.partition(":")
    if not runtime:
        raise GptDeployError(f"--reference takes RUNTIME[:PRECISION], e.g. torch or ort:fp32; got {spec!r}")
    if precision:
        canonical(precision)
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
               cache: ExportCache | None = None, progress: Progress = QUIET) -> ParityReport:
    """Records the reference on `source`, then runs and checks every target against it, one at a time.

    source: anything gptdeploy.load takes, or an export folder (then the reference must be an ONNX
        runtime). An ONNX runtime runs source itself when it is an export folder, or the checkpoint
        exported into the export cache (gptdeploy.app.export_cache).
    export: an export folder that the checked ONNX runtimes run instead (the reference still runs source).
    tolerances: overrides of the defaults, for every target.
    A target that is the reference itself is not run again; the report's notes say so.
    """
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
                           weights_seed=weights_seed, cache=cache, progress=progress)

    the_reference = resolved(reference, is_reference=True)
    same = " ".join(the_reference[:2])
    notes = [f"{same} is the reference; not compared with itself"] if any(
        resolved(t) == the_reference for t in targets) else []
    targets = [t for t in targets if resolved(t) != the_reference]
    if not targets:
        raise GptDeployError(f"nothing to compare: {same} is the reference; name other runtimes or precisions")
    runner, tokenizer = open_target(reference, is_reference=True)
    # prompts that do not fit are bad input: refused before any work starts
    prepare_prompts(tokenizer, list(prompts), runner.info.vocab_size, runner.info.block_size, max(steps, greedy_tokens))
    with progress.step(f"Recording the reference, {runner.describe()}"), progress.bar() as bar:
        task = bar.add_task(f"reference {runner.describe()}", total=None)
        record = record_reference(runner, tokenizer, prompts, steps=steps, greedy_tokens=greedy_tokens,
                                  on_step=lambda: bar.advance(task))
    runner.close()
    results = []
    for target in targets:
        runner, _ = open_target(target)
        try:
            with progress.step(f"Comparing {runner.describe()}"), progress.bar() as bar:
                task = bar.add_task(runner.describe(), total=record.work)
                results.append(compare(runner, record, tolerances, on_step=lambda: bar.advance(task)))
        finally:
            runner.close()
    return ParityReport(str(source), record, results, notes)


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
        rec = self.record
        return {
            "format": REPORT_FORMAT, "format_version": 1, "gptdeploy_version": __version__,
            "created": now(),
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
        write_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")
