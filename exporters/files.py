"""What the exporters share: file hashes for the manifest, and progress lines for long steps."""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


class Steps:
    """Status lines on stderr for the long steps: a spinner while one runs, its time when done."""

    def __init__(self, enabled: bool):
        from rich.console import Console

        self.console = Console(stderr=True) if enabled else None

    @contextlib.contextmanager
    def step(self, what: str):
        if self.console is None:
            yield
            return
        start = time.perf_counter()
        with self.console.status(f"{what} ..."):
            yield
        self.console.print(f"[green]✓[/green] {what} ({time.perf_counter() - start:.1f} s)")
