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
from gptdeploy.app.sources import Checkpoint, checkpoint_of, open_runner
from gptdeploy.compare import METRICS
from gptdeploy.errors import GptDeployError, WeightsUnavailable
from gptdeploy.export_folder import is_export_folder, now, read_export, verify
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


def _require_all(names: list[str]) -> None:
    """Every runtime named must run here; else one line per runtime that cannot, saying what it lacks."""
    from gptdeploy.runtimes.registry import spec_of, unavailable_reason

    for name in names:
        spec_of(name)  # an unknown name first, on its own
    lacking = {name: reason for name in dict.fromkeys(names) if (reason := unavailable_reason(name))}
    if lacking:
        raise GptDeployError("\n".join(f"runtime {name!r} cannot run on this machine: {reason}"
                                       for name, reason in lacking.items()))


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

    source: anything gptdeploy.load takes, or an export folder: its ONNX graphs for the ONNX runtimes, and
        for torch and hf the checkpoint it was exported from, while that is there with the same weights.
        A preset whose trained weights cannot be had (no network, not cached) runs with random weights,
        and the report's notes say so: comparing runtimes does not depend on the weights' values.
    export: an export folder that the checked ONNX runtimes run instead of source's export.
    tolerances: overrides of the defaults, for every target.
    A target that is the reference itself is not run again; the report's notes say so.
    """
    _require_all([reference.runtime, *(t.runtime for t in targets)])
    if export is not None and not is_export_folder(Path(export)):
        raise GptDeployError(f"--export {export}: not a gptdeploy export folder (no gptdeploy.json)")
    for folder in {str(f) for f in (source, export) if f is not None and is_export_folder(Path(f))}:
        verify(read_export(folder), memo=(cache or ExportCache()).memo())  # tampering: said before any work
    notes: list[str] = []
    checkpoint = Checkpoint(str(source), weights_seed if weights == "random" else None)
    if is_export_folder(Path(source)):
        runs = [reference.runtime, *(t.runtime for t in targets)]
        if any(require(name).runs == CHECKPOINT for name in runs):
            checkpoint = checkpoint_of(read_export(source), progress)
            notes.append(f"torch and hf run {checkpoint.source}, the checkpoint {source} was exported from")

    def resolved(t: Target, is_reference: bool = False) -> tuple[str, str, str | None, str]:
        """(runtime, precision, device, what it runs) with the defaults filled in."""
        if require(t.runtime).runs == CHECKPOINT:
            return t.runtime, t.precision or "fp32", t.device or "cpu", checkpoint.source
        folder = str(source) if is_reference or export is None else str(export)
        default = read_export(folder).precision if is_export_folder(Path(folder)) else "fp32"
        return t.runtime, t.precision or default, None, folder

    def open_target(t: Target, is_reference: bool = False):
        runtime, precision, device, where = resolved(t, is_reference)
        return open_runner(runtime, where, precision=t.precision, device=device, weights=checkpoint.weights,
                           weights_seed=checkpoint.random_seed or 0, cache=cache, progress=progress)

    the_reference = resolved(reference, is_reference=True)
    same = " ".join(the_reference[:2])
    if any(resolved(t) == the_reference for t in targets):
        notes.append(f"{same} is the reference; not compared with itself")
    targets = [t for t in targets if resolved(t) != the_reference]
    if not targets:
        raise GptDeployError(f"nothing to compare: {same} is the reference; name other runtimes or precisions")
    try:
        runner, tokenizer = open_target(reference, is_reference=True)
    except WeightsUnavailable as e:
        if checkpoint.random_seed is not None:
            raise
        checkpoint = Checkpoint(checkpoint.source, weights_seed)
        notes.insert(0, f"{checkpoint.source}'s trained weights are not here ({e}); seeded random weights (seed "
                        f"{weights_seed}) instead: comparing runtimes does not depend on the weights' values")
        progress.note(f"note: {notes[0]}")
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

    def write_json(self, path: str | Path, data: dict | None = None) -> None:
        """Writes to a temporary file beside `path`, renamed at the end: never a half-written report.

        data: the report's to_dict() already made (the one an HTML report is drawn from too); default: a new one.
        """
        write_atomic(Path(path), json.dumps(self.to_dict() if data is None else data, indent=2) + "\n")
