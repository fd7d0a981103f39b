"""Progress of long work, on stderr, passed to whatever does the work as an object.

On a terminal a step shows a spinner while it runs and a line with its time when it ends; in a log
(stderr not a terminal: CI, a file, a pipe) it prints a line when it starts and one when it ends, so
that a reader always sees what is running now. `Progress(enabled=False)` (or QUIET) prints nothing.

    progress = Progress()
    with progress.step("Tracing onnx/model.onnx"):
        ...
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class Progress:
    def __init__(self, enabled: bool = True, console=None):
        self.enabled = enabled
        self._console = console

    @property
    def console(self):
        """The rich console on stderr that the lines go to."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False)
        return self._console

    @property
    def interactive(self) -> bool:
        return self.enabled and self.console.is_terminal

    def note(self, text: str) -> None:
        """One line, now."""
        if self.enabled:
            self.console.print(text, soft_wrap=True)

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        if self.interactive:
            with self.console.status(f"{what} ..."):
                yield
        else:
            self.note(f"{what} ...")
            yield
        self.note(f"[green]✓[/green] {what} ({time.perf_counter() - start:.1f} s)")

    def bar(self, transient: bool = True):
        """A rich Progress bar on the same console, shown on a terminal only (a log gets the step lines)."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

        return Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=self.console, transient=transient, disable=not self.interactive)


QUIET = Progress(enabled=False)


@contextlib.contextmanager
def quiet_libraries(*loggers: str) -> Iterator[None]:
    """Silences other libraries' warnings and the INFO/WARNING logs of `loggers` for the block, and puts
    everything back as it was: the loggers' levels, the root logger's handlers and level (a module that
    calls logging.basicConfig when imported inside the block changes them), and the warning filters.
    Their progress chatter would otherwise bury gptdeploy's own lines; nothing is printed to stdout by them."""
    import logging
    import warnings

    root = logging.getLogger()
    root_state = list(root.handlers), root.level
    named = [logging.getLogger(name) for name in loggers]
    levels = [logger.level for logger in named]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in named:
            logger.setLevel(logging.ERROR)
        root.setLevel(logging.ERROR)  # libraries that log to the root logger (onnxruntime.quantization does)
        try:
            yield
        finally:
            for logger, level in zip(named, levels):
                logger.setLevel(level)
            root.handlers[:], root.level = root_state
