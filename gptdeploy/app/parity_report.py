"""`gptdeploy parity`'s report for people: a rich table per runtime, its verdict and what would pass."""

from __future__ import annotations

import math
import sys

from gptdeploy.app.parity_run import ParityReport
from gptdeploy.compare import METRICS, format_tolerance, passes


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
