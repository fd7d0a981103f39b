"""examples/web and `gptdeploy web`: the page in headless Chromium gives gptdeploy's greedy ids.

The server's checks (what it refuses, what it serves) run everywhere. The browser test needs Chromium
(`chromium` on PATH, or GPTDEPLOY_CHROMIUM) and examples/web/node_modules (`npm ci` there); it skips
with the reason when either is missing. It serves the shakespeare export with every variant (conftest's
shakespeare_optimized_path) with the real command, opens the page once per dtype and compares the
ids with `gptdeploy generate --greedy`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.test_cli import assert_one_line_error, gptdeploy

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "web"
PROMPT = "ROMEO:"
NEW_TOKENS = 20
# transformers.js dtype -> gptdeploy's --variant (None: model.onnx)
DTYPES = {"fp32": None, "q8": "q8", "q4": "q4"}


class Server:
    """`gptdeploy web FOLDER` in a process of its own; .url once it listens."""

    def __init__(self, folder, *args):
        self.process = subprocess.Popen([sys.executable, "-m", "gptdeploy", "web", str(folder), *map(str, args)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.banner = self.process.stdout.readline()
        self.url = self.process.stdout.readline().strip()
        assert self.url.startswith("http://127.0.0.1:"), (self.banner, self.url, self.process.stderr.read())

    def get(self, path: str) -> tuple[int, bytes, dict]:
        try:
            with urllib.request.urlopen(self.url.rstrip("/") + path, timeout=30) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def stop(self, signum=signal.SIGTERM) -> tuple[int, str, str]:
        """SIGTERM (as a service manager stops it) or SIGINT (Ctrl-C): (exit code, the rest of stdout, stderr)."""
        self.process.send_signal(signum)
        try:
            stdout, stderr = self.process.communicate(timeout=30)
        finally:
            self.process.kill()
        return self.process.returncode, stdout, stderr


@pytest.fixture
def server_of():
    servers = []

    def start(folder, *args) -> Server:
        servers.append(Server(folder, *args))
        return servers[-1]

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def test_refuses_what_it_cannot_serve(tmp_path, lively_export_path):
    assert_one_line_error(gptdeploy("web", tmp_path), "is not a gptdeploy export folder")
    assert_one_line_error(gptdeploy("web", tmp_path / "missing"), "is not a gptdeploy export folder")
    assert_one_line_error(gptdeploy("web", lively_export_path, "--assets", tmp_path), "index.html is missing")
    page_only = tmp_path / "page"
    page_only.mkdir()
    for name in ("index.html", "page.js", "worker.js"):
        shutil.copy(EXAMPLE / name, page_only)
    assert_one_line_error(gptdeploy("web", lively_export_path, "--assets", page_only), "npm install")
    assert_one_line_error(gptdeploy("web", lively_export_path, "--port", "70000"), "not a port")
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(lively_export_path, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    assert_one_line_error(gptdeploy("web", no_tokenizer), "has no tokenizer.json")


def test_serves_the_folder_and_nothing_else(server_of, lively_export_path):
    """The page, its description of the folder, the folder's files; no path outside them; SIGTERM stops it."""
    if not (EXAMPLE / "node_modules").is_dir():
        pytest.skip("examples/web/node_modules is missing: run `npm ci` in examples/web")
    server = server_of(lively_export_path)
    status, body, headers = server.get("/")
    assert status == 200 and b"<title>" in body and headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    status, body, _ = server.get("/export.json")
    name = lively_export_path.name
    description = json.loads(body)
    assert description["name"] == name and list(description["dtypes"]) == ["fp32"]
    fp32 = description["dtypes"]["fp32"]
    assert fp32["file"] == "onnx/model.onnx" and "tokenizer.json" in fp32["fetches"]
    assert fp32["bytes"] == sum((lively_export_path / f).stat().st_size for f in fp32["fetches"])
    status, body, _ = server.get(f"/models/{name}/onnx/model.onnx")
    assert status == 200 and body == (lively_export_path / "onnx" / "model.onnx").read_bytes()
    status, _, headers = server.get("/lib/ort/ort-wasm-simd-threaded.wasm")
    assert status == 200 and headers["Content-Type"] == "application/wasm"
    status, _, headers = server.get("/lib/transformers.min.js")
    assert status == 200 and headers["Content-Type"] == "text/javascript"
    for path in (f"/models/{name}/../../etc/passwd", f"/models/{name}/%2e%2e/%2e%2e/etc/passwd",
                 "/models/other/config.json", "/package.json", "/node_modules/puppeteer-core/package.json",
                 "/lib/ort/ort.min.js", "/drive.mjs"):
        assert server.get(path)[0] == 404, path
    assert server.stop() == (0, "Stopped.\n", "")
    server = server_of(lively_export_path, "--port", port := server.url.rsplit(":", 1)[1].strip("/"))
    assert server.url == f"http://127.0.0.1:{port}/"  # the port given, free again once the server stopped
    assert_one_line_error(gptdeploy("web", lively_export_path, "--port", port), f"cannot serve on 127.0.0.1:{port}")
    assert server.stop(signal.SIGINT) == (0, "Stopped.\n", "")


def _browser_or_skip() -> tuple[str, str]:
    chromium = os.environ.get("GPTDEPLOY_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("the browser test needs Chromium: `chromium` is not on PATH (apt-get install chromium)")
    node = shutil.which("node")
    if node is None:
        pytest.skip("the browser test needs Node.js (puppeteer-core): `node` is not on PATH")
    if not (EXAMPLE / "node_modules" / "puppeteer-core").is_dir():
        pytest.skip("examples/web/node_modules is missing: run `npm ci` in examples/web")
    return chromium, node


def test_page_matches_gptdeploy(server_of, request, greedy_ids, tmp_path):
    """Each dtype in a fresh page of one headless Chromium, driven by examples/web/drive.mjs, with every host
    but 127.0.0.1 unresolvable (so nothing comes from a CDN): gptdeploy's greedy ids, and the figures."""
    chromium, node = _browser_or_skip()
    folder = request.getfixturevalue("shakespeare_optimized_path")  # after the skips: the export costs a minute
    server = server_of(folder)
    query = {"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "greedy": 1, "threads": 1}
    urls = [f"{server.url}?{urlencode({'dtype': dtype, **query})}" for dtype in DTYPES]
    shot = tmp_path / "web.png"
    result = subprocess.run([node, "drive.mjs", *urls, "--chromium", chromium, "--screenshot", shot],
                            cwd=EXAMPLE, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["dtype"] for r in runs] == list(DTYPES)
    description = json.loads(server.get("/export.json")[1])
    for run in runs:
        assert "problems" not in run, run["problems"]
        (expected,) = greedy_ids(folder, [PROMPT], NEW_TOKENS, DTYPES[run["dtype"]])
        assert {k: run[k] for k in expected} == expected, run["dtype"]
        assert run["page_updates"] == NEW_TOKENS  # the text streamed into the page, token by token
        assert run["text"] and run["load_s"] > 0 and run["ttft_s"] > 0 and run["tokens_per_s"] > 0
        # the page fetched the files gptdeploy web names for the dtype, whole (config.json twice)
        expected = description["dtypes"][run["dtype"]]
        assert dict(run["model_fetches"]) == {f"/models/{folder.name}/{f}": (folder / f).stat().st_size
                                              for f in expected["fetches"]}
        assert sum(dict(run["model_fetches"]).values()) == expected["bytes"]
    assert shot.stat().st_size > 10_000
    assert server.stop() == (0, "Stopped.\n", "")  # quiet while serving: no line on stderr, no traceback


def test_page_reads_shared_weights(server_of, request, greedy_ids):
    """A folder whose fp32 weights are in onnx/model.onnx_data (config.json names it for transformers.js): the
    page fetches the data file beside model.onnx and gives gptdeploy's ids."""
    chromium, node = _browser_or_skip()
    folder = request.getfixturevalue("lively_shared")[0]  # after the skips
    server = server_of(folder)
    url = f"{server.url}?{urlencode({'dtype': 'fp32', 'prompt': PROMPT, 'max_new_tokens': NEW_TOKENS, 'greedy': 1})}"
    result = subprocess.run([node, "drive.mjs", url, "--chromium", chromium], cwd=EXAMPLE, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    run = json.loads(result.stdout)
    (expected,) = greedy_ids(folder, [PROMPT], NEW_TOKENS)
    assert {k: run[k] for k in expected} == expected
    assert dict(run["model_fetches"])[f"/models/{folder.name}/onnx/model.onnx_data"] == \
        (folder / "onnx" / "model.onnx_data").stat().st_size
    assert server.stop() == (0, "Stopped.\n", "")
