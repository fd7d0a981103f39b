"""`gptdeploy web`: an export folder and the page that runs it in a browser, served on 127.0.0.1.

The page is examples/web (index.html, page.js, worker.js): transformers.js on onnxruntime-web's WASM, both
from examples/web/node_modules (`npm install` there), so that nothing is fetched from a CDN. The server maps
four kinds of URL to files, and nothing else:

    /, /index.html, /page.js, /worker.js   the page (the assets folder)
    /lib/transformers.min.js               transformers.js (it bundles onnxruntime-web's JavaScript)
    /lib/ort/ort-wasm-simd-threaded.*      onnxruntime-web's WASM binaries and their loaders
    /models/NAME/...                       the export folder, NAME being its folder name
    /export.json                           what the page needs to know: NAME, the dtypes the folder has, sizes
"""

from __future__ import annotations

import json
import posixpath
import sys
from collections.abc import Callable
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import ExportFolder, data_files, read_export

PAGE_FILES = ("index.html", "page.js", "worker.js")
LIBRARY = "node_modules/@huggingface/transformers/dist/transformers.min.js"
ORT_DIST = "node_modules/onnxruntime-web/dist"
ORT_PREFIX = "ort-wasm-simd-threaded."
# transformers.js' dtype -> the graph it loads (model + the dtype's suffix)
DTYPES = {
    "fp32": "onnx/model.onnx",
    "fp16": "onnx/model_fp16.onnx",
    "q8": "onnx/model_quantized.onnx",
    "int8": "onnx/model_int8.onnx",
    "q4": "onnx/model_q4.onnx",
}
# what transformers.js fetches besides the graph for a text-generation pipeline
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
INSTALL_HINT = "cd examples/web && npm install"


def checkout_assets() -> Path:
    """examples/web of the gptdeploy checkout this package runs from (an editable install)."""
    return Path(__file__).resolve().parents[2] / "examples" / "web"


@dataclass(frozen=True)
class Site:
    """What the server serves: the export folder under /models/NAME/, the page and its libraries."""

    export: ExportFolder
    assets: Path

    @property
    def name(self) -> str:
        return self.export.path.resolve().name

    def dtypes(self) -> dict[str, dict]:
        """The transformers.js dtypes this folder has: the graph, the files the page fetches, their bytes."""
        readers = {}  # graph file -> the external-data files it reads
        for spec in [*self.export.manifest["graphs"].values(), *self.export.variants.values()]:
            readers[spec["file"]] = data_files(spec)
        found = {}
        for dtype, graph in DTYPES.items():
            if not (self.export.path / graph).is_file():
                continue
            files = [f for f in (*SIDE_FILES, graph, *readers.get(graph, [])) if (self.export.path / f).is_file()]
            found[dtype] = {"file": graph, "fetches": files,
                            "bytes": sum((self.export.path / f).stat().st_size for f in files)}
        return found

    def description(self) -> dict:
        return {"name": self.name, "model": f"/models/{self.name}/", "dtypes": self.dtypes()}

    def file_for(self, url_path: str) -> Path | None:
        """The file a URL path names, or None (404): only the four kinds of URL of the module's docstring."""
        path = posixpath.normpath(unquote(url_path))
        if path in ("/", "/."):
            path = "/index.html"
        parts = path.lstrip("/").split("/")
        if ".." in parts:
            return None
        if len(parts) == 1 and parts[0] in PAGE_FILES:
            return self.assets / parts[0]
        if parts == ["lib", "transformers.min.js"]:
            return self.assets / LIBRARY
        if len(parts) == 3 and parts[:2] == ["lib", "ort"] and parts[2].startswith(ORT_PREFIX):
            return self.assets / ORT_DIST / parts[2]
        if len(parts) >= 3 and parts[0] == "models" and parts[1] == self.name:
            file = self.export.path.joinpath(*parts[2:]).resolve()
            if file.is_relative_to(self.export.path.resolve()):
                return file
        return None


def open_site(folder: Path, assets: Path | None = None) -> Site:
    """The export folder and the page's files, checked: one clear GptDeployError for what is missing."""
    export = read_export(folder)
    if not (export.path / "tokenizer.json").is_file():
        raise GptDeployError(f"{folder} has no tokenizer.json (a character-level model?): transformers.js, which "
                             f"the page runs, needs one")
    site = Site(export, Path(assets) if assets is not None else checkout_assets())
    if not site.dtypes():
        raise GptDeployError(f"{folder} has none of the graphs transformers.js loads ({', '.join(DTYPES.values())})")
    if assets is None and not (site.assets / "index.html").is_file():
        raise GptDeployError("the web page's files are not here (gptdeploy runs from an install without the "
                             "examples): give --assets PATH/TO/examples/web of a gptdeploy checkout")
    for relative in (*PAGE_FILES, LIBRARY, f"{ORT_DIST}/{ORT_PREFIX}wasm"):
        if not (site.assets / relative).is_file():
            hint = f"run `{INSTALL_HINT}` first" if relative.startswith("node_modules") else \
                "--assets must name the examples/web folder"
            raise GptDeployError(f"{site.assets / relative} is missing: {hint}")
    return site


MIME = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript",
        ".wasm": "application/wasm", ".json": "application/json"}


class _Handler(SimpleHTTPRequestHandler):
    site: Site  # set on a subclass per server

    def do_GET(self):  # noqa: N802 - http.server's name
        self._serve(body=True)

    def do_HEAD(self):  # noqa: N802
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/export.json":
            data = json.dumps(self.site.description()).encode()
            return self._send(200, "application/json", data if body else b"", len(data))
        file = self.site.file_for(path)
        if file is None or not file.is_file():
            return self._send(404, "text/plain", b"not found\n" if body else b"", 10)
        size = file.stat().st_size
        self._send(200, MIME.get(file.suffix, "application/octet-stream"), None, size)
        if body:
            with open(file, "rb") as f:
                try:
                    self.copyfile(f, self.wfile)
                except (BrokenPipeError, ConnectionResetError):  # the browser cancelled the fetch (it does)
                    self.close_connection = True

    def _send(self, status: int, content_type: str, data: bytes | None, length: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-store")  # a re-export is seen at once; the page's figures are fetches
        # cross-origin isolation: SharedArrayBuffer, so that onnxruntime-web may run several threads
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.end_headers()
        if data:
            self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002 - quiet: the command prints its URL and nothing per request
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A request that failed: a line on stderr, not socketserver's traceback; a client gone, nothing."""
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError):
            print(f"gptdeploy web: a request from {client_address[0]} failed: {type(error).__name__}: {error}",
                  file=sys.stderr)


def make_server(site: Site, port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for the site on 127.0.0.1 (port 0: a free one); serve_forever() runs it."""
    handler = type("Handler", (_Handler,), {"site": site})
    try:
        server = _Server(("127.0.0.1", port), handler)
    except OSError as e:
        raise GptDeployError(f"cannot serve on 127.0.0.1:{port}: {e.strerror or e}") from None
    return server


def serve(site: Site, port: int = 0, ready: Callable[[str], None] = print) -> None:
    """Serves until interrupted (Ctrl-C, SIGTERM: the exception unwinds through here and the socket closes)."""
    server = make_server(site, port)
    try:
        ready(f"http://127.0.0.1:{server.server_address[1]}/")
        server.serve_forever()
    finally:
        server.server_close()
