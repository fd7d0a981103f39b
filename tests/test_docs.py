"""Every Python code block of README.md and docs/*.md runs as written.

The blocks of a page run in order, each in a fresh namespace, all pages in one process (a fresh
interpreter, not this one), each page in a working directory of its own that holds `shakespeare-onnx`,
as `gptdeploy export shakespeare --out shakespeare-onnx --optimize` makes it (a copy of the optimized
shakespeare export other tests use), and the export cache ($GPTDEPLOY_CACHE, this session's) holds the
same export, as a user's would after `open_runner("ort", "shakespeare")`. A test per page reports its
blocks' failures with the block's line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(line of the opening fence, code) of each ```python block of the page."""
    text = page.read_text(encoding="utf-8")
    return [(text[:m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]

RUNNER = textwrap.dedent("""
    import json, os, sys, traceback
    pages, results = json.loads(sys.stdin.read()), {}
    for page in pages:
        os.chdir(page["cwd"])
        for line, code in page["blocks"]:
            try:
                exec(compile(code, f"{page['name']}:{line}", "exec"), {"__name__": "__main__"})
                results[f"{page['name']}:{line}"] = None
            except BaseException:  # noqa: BLE001 - reported per block
                results[f"{page['name']}:{line}"] = traceback.format_exc(limit=-3)
    print("RESULTS " + json.dumps(results))
""")


@pytest.fixture(scope="session")
def doc_results(tmp_path_factory, shakespeare, shakespeare_export_path, shakespeare_optimized_path):
    """{"page:line": None (ran) or the traceback} for every block of every page."""
    from tests.conftest import cache_holding

    cache = cache_holding(tmp_path_factory.mktemp("docs-cache"), shakespeare, shakespeare_export_path)
    pages = []
    for page in PAGES_WITH_CODE:
        cwd = tmp_path_factory.mktemp(f"docs-{page.stem}")
        # hard links: gptdeploy replaces a file by renaming a new one over it, so no page writes into another's
        shutil.copytree(shakespeare_optimized_path, cwd / "shakespeare-onnx", copy_function=os.link)
        pages.append({"name": str(page.relative_to(ROOT)), "cwd": str(cwd), "blocks": python_blocks(page)})
    env = {**os.environ, "GPTDEPLOY_CACHE": str(cache.root)}
    result = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(pages), capture_output=True, text=True,
                            env=env, timeout=1800)
    line = next((x for x in result.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, f"the blocks' runner stopped (exit {result.returncode}):\n{result.stderr[-4000:]}"
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=[p.name for p in PAGES_WITH_CODE])
def test_python_blocks_run(doc_results, page):
    name = str(page.relative_to(ROOT))
    failures = {k: v for k, v in doc_results.items() if k.startswith(name + ":") and v is not None}
    assert not failures, "\n".join(f"{k}:\n{v}" for k, v in failures.items())


def test_every_page_with_code_is_checked():
    """The pages are found: README.md and docs/ have Python blocks (the regex did not silently match none)."""
    assert ROOT / "README.md" in PAGES_WITH_CODE and len(PAGES_WITH_CODE) >= 5
