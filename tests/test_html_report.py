"""bench and parity --report FILE.html: the numbers in the charts are the JSON report's, read back from the
page (the SVG elements' data attributes), the page is self-contained and renders in headless Chromium
without console errors, and a missing matplotlib or a bad destination is one line, exit 2.

The runs are tiny (the tiny preset, a few tokens): what is checked is what the page shows.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from tests.test_cli import assert_one_line_error, gptdeploy

pytest.importorskip("matplotlib", reason="--report needs matplotlib (the report extra)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class _Page(HTMLParser):
    """Every element's tag and attributes, and the embedded JSON report."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self._in_data = False
        self.data = ""
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        self._in_data = tag == "script" and attrs.get("id") == "report-data"

    def handle_endtag(self, tag):
        self._in_data = False

    def handle_data(self, data):
        if self._in_data:
            self.data += data

    def datums(self) -> list[dict]:
        return [a for _, a in self.elements if "datum" in (a.get("class") or "").split()]

    def ids(self) -> list[str]:
        return [a["id"] for _, a in self.elements if "id" in a]


def _path(obj, path: str):
    """decode.p50_ms, memory.run_peak_rss_mb, greedy.agreeing[2]: the value at a data-metric path."""
    for part in path.split("."):
        name, index = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", part).groups()
        obj = obj[name]
        if index is not None:
            obj = obj[int(index)]
    return obj


@pytest.fixture(scope="module")
def bench_files(tiny_bench_cli):
    """conftest's gptdeploy bench on tiny (torch, ort and ort-cuda, batches 1 and 2): the dict --json wrote
    and the page --report wrote, of the same run."""
    _, report, page = tiny_bench_cli
    return report, page


@pytest.fixture(scope="module")
def parity_files(tiny_export_path, tmp_path_factory):
    """gptdeploy parity on tiny: hf (passes) and ort on an export with one weight changed (fails)."""
    from tests.test_parity import _change_one_weight

    folder = tmp_path_factory.mktemp("parity-report")
    broken = _change_one_weight(tiny_export_path, folder / "broken")
    result = gptdeploy("parity", "tiny", "--random", "--runtimes", "hf,ort", "--export", broken, "--steps", "2",
                       "--greedy-tokens", "6", "--json", folder / "parity.json", "--report", folder / "parity.html")
    assert result.returncode == 1, result.stdout + result.stderr  # ort fails: the pages are written all the same
    return json.loads((folder / "parity.json").read_text()), folder / "parity.html"


def test_bench_charts_show_the_json_numbers(bench_files):
    report, page_path = bench_files
    page = _Page(page_path.read_text(encoding="utf-8"))
    assert json.loads(page.data) == report  # the page was drawn from the dict --json wrote
    runtimes = {r["runtime"]: r for r in report["runtimes"]}
    seen = set()
    for datum in page.datums():
        runtime = runtimes[datum["data-runtime"]]
        where = runtime
        if "data-batch" in datum:
            (where,) = [b for b in runtime["batches"] if b["batch"] == int(datum["data-batch"])]
        assert json.loads(datum["data-value"]) == _path(where, datum["data-metric"]), datum
        seen.add((datum["data-runtime"], datum.get("data-batch"), datum["data-metric"]))
    measured = [r["runtime"] for r in report["runtimes"] if r["status"] == "ok"]  # ort-cuda: where a GPU is
    assert {"torch", "ort"} <= set(measured)
    expected = {(r, str(b), m) for r in measured for b in (1, 2)
                for m in ("decode.p50_ms", "decode.p90_ms", "decode.p99_ms", "bandwidth_floor.floor_ms",
                          "prefill.latency_ms", "speedup.prefill", "speedup.decode", "speedup.generation")}
    expected |= {(r, None, f"memory.{m}") for r in measured
                 for m in ("process_rss_mb", "setup_peak_rss_mb", "run_peak_rss_mb")}
    assert seen == expected
    ids = page.ids()
    assert len(ids) == len(set(ids)), "an id is used twice in the page"
    for chart in ("decode", "prefill", "speedup", "memory"):
        assert f"chart-{chart}" in ids
    header = page_path.read_text(encoding="utf-8").split('<dl class="header"')[1].split("</dl>")[0]
    start = report["machine"]["load_average_start"]
    assert f"{start[0]:.2f} / {start[1]:.2f} / {start[2]:.2f} at the start" in header
    assert report["machine"]["cpu"] in header and "batch 1, 2 · prompt 4 tokens · 3 new tokens" in header


def test_parity_charts_show_the_json_numbers(parity_files):
    report, page_path = parity_files
    page = _Page(page_path.read_text(encoding="utf-8"))
    assert json.loads(page.data) == report
    assert [r["passed"] for r in report["runtimes"]] == [True, False]
    seen = set()
    for datum in page.datums():
        runtime = report["runtimes"][int(datum["data-index"])]
        metric = datum["data-metric"]
        if metric.startswith("steps[]."):  # a line: one value per step
            assert json.loads(datum["data-steps"]) == [s["step"] for s in runtime["steps"]]
            assert json.loads(datum["data-values"]) == [_path(s, metric[len("steps[]."):]) for s in runtime["steps"]]
        else:
            assert json.loads(datum["data-value"]) == _path(runtime, metric), datum
        seen.add((int(datum["data-index"]), metric))
    lines = {f"steps[].metrics.{m}" for m in ("max_abs", "max_rel", "top1", "top5")}
    tolerances = {f"tolerances.{m}" for m in ("max_abs", "max_rel", "top1", "top5")}
    greedy = {f"greedy.agreeing[{p}]" for p in range(len(report["inputs"]["prompts"]))}
    assert seen == {(i, m) for i in (0, 1) for m in lines | tolerances | greedy}
    # the verdicts: ort's failed checks are marked, with the JSON's values
    cells = [a for t, a in page.elements if t == "td" and "data-metric" in a]
    assert len(cells) == 2 * 5
    checks = {(r, c["metric"]): c for r, run in enumerate(report["runtimes"]) for c in run["checks"]}
    for i, cell in enumerate(cells):
        check = checks[(i // 5, cell["data-metric"].split(".")[1])]
        assert json.loads(cell["data-value"]) == check["value"]
        assert ("fail" in (cell.get("class") or "")) == (not check["passed"])
    text = page_path.read_text(encoding="utf-8")
    assert "FAIL" in text and "PASS" in text and "passes with --tol max_abs=" in text
    divergence = report["runtimes"][1]["greedy"]["first_divergence"]
    for p, d in enumerate(divergence):
        if d is not None:
            assert f"prompt {p}: diverges at token {d['token']} (reference {d['reference']}, runtime " \
                   f"{d['runtime']})" in text


@pytest.mark.parametrize("kind", ["bench", "parity"])
def test_pages_are_self_contained_and_repeatable(kind, bench_files, parity_files):
    from gptdeploy.app.html_report import bench_html, parity_html

    report, page_path = bench_files if kind == "bench" else parity_files
    text = page_path.read_text(encoding="utf-8")
    assert not re.search(r"""\b(?:src|href)\s*=\s*["'](?!#)""", text), "the page refers to a file or a URL"
    assert "<link" not in text and "@import" not in text and "url(http" not in text
    assert re.findall(r"<script\b[^>]*>", text) == ['<script type="application/json" id="report-data">']
    draw = bench_html if kind == "bench" else parity_html
    assert draw(report) == draw(report) == text  # the same report draws the same page, byte for byte


def _chromium(url: str, tmp_path) -> tuple[str, list[str]]:
    """Headless Chromium on url: (the DOM after load, the console's messages)."""
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return result.stdout, console


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (the pages' rendering is not checked)")
def test_pages_render_in_headless_chromium(bench_files, parity_files, tmp_path):
    # the check can fail: a page with a script error shows in the console messages
    canary = tmp_path / "canary.html"
    canary.write_text("<!DOCTYPE html><p>canary</p><script>throw new Error('canary')</script>")
    _, console = _chromium(canary.as_uri(), tmp_path)
    assert any("Uncaught Error: canary" in line for line in console), console
    for (_, page), charts in [(bench_files, ("decode", "prefill", "speedup", "memory")),
                              (parity_files, ("errors", "agreement", "greedy"))]:
        dom, console = _chromium(page.as_uri(), tmp_path)
        assert console == [], f"{page.name}: {console}"
        for chart in charts:
            assert re.search(rf'<svg [^>]*id="chart-{chart}"', dom), f"{page.name}: chart {chart} not in the DOM"
        assert 'id="header"' in dom and 'class="datum"' in dom


@pytest.mark.parametrize("command", [["bench", "--runtime", "torch"], ["parity", "--runtimes", "ort"]])
def test_missing_matplotlib_is_one_line(command, tmp_path, monkeypatch, capsys):
    """Said before the run, naming the extra (matplotlib made unimportable in this process)."""
    from gptdeploy.app.cli import run

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = run([command[0], "tiny", "--random", *command[1:], "--report", str(tmp_path / "r.html")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == "gptdeploy: error: --report needs matplotlib, in the report extra: pip install " \
                     "'gptdeploy[report]'"
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("command", [["bench", "--runtime", "torch"], ["parity", "--runtimes", "ort"]])
def test_report_destination_is_checked_before_the_run(command, tmp_path):
    assert_one_line_error(gptdeploy(command[0], "tiny", "--random", *command[1:], "--report",
                                    "/nonexistent/dir/r.html"), "--report /nonexistent/dir/r.html: the folder")
    assert_one_line_error(gptdeploy(command[0], "tiny", "--random", *command[1:], "--report", tmp_path),
                          "is a folder")
