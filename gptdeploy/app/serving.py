"""`gptdeploy serve`: a Triton model repository served on this machine by the Triton server of nvidia-pytriton.

    with TritonServer(repo, ports=Ports(8000, 8001, 8002)) as server:   # started, ready
        server.http_url
        server.wait()                                                    # until it exits

The server is the real tritonserver binary that the nvidia-pytriton wheel carries, with its python
backend. It is started the way PyTriton starts it: the backend folder with the stub for this
Python's version, the wheel's libraries on LD_LIBRARY_PATH and this environment's bin/ first on
PATH, so that the stub's embedded Python finds this environment (its site-packages) as `python3`.

The stub links libpython3.X.so.1.0 by name. If that resolves to another build of the same version
(a system Python 3.11.2 against a pyenv or conda 3.11.7), the stub fails in odd ways
('_thread.RLock' object has no attribute '_recursion_count'). So this Python's own LIBDIR goes first
on LD_LIBRARY_PATH, when it has a shared libpython; when it has none, serving says so in one line.

Stopping: SIGINT to the server, which unloads the models and stops their stub processes; after a
grace period SIGKILL to its whole process group (the server runs in a session of its own, stubs
included). The server dies with this process (PR_SET_PDEATHSIG) even if this process is killed.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from threading import Thread

from gptdeploy.errors import GptDeployError
from gptdeploy.files import process_alive

SERVE_EXTRA = "pip install 'gptdeploy[serve]'"
WORKDIR_PREFIX = "gptdeploy-triton-"  # + the pid of the process that serves: a temporary backend folder
STOP_GRACE_S = 15


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    def check(self) -> None:
        values = [self.http, self.grpc, self.metrics]
        for p in values:
            if not 1 <= p <= 65535:
                raise GptDeployError(f"port {p} is out of range (1..65535)")
        if len(set(values)) != 3:
            raise GptDeployError(f"the HTTP, gRPC and metrics ports must differ, got {values}")


def free_ports(host: str = "127.0.0.1", n: int = 3) -> list[int]:
    """n ports that nothing listens on now (for tests)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class TritonInstall:
    server: Path  # bin/tritonserver
    libs: Path  # the wheel's shared libraries
    backend: Path  # backends/python (libtriton_python.so, triton_python_backend_utils.py)
    stub: Path  # the python backend stub for this Python version


def find_triton() -> TritonInstall:
    """The Triton server of nvidia-pytriton, found without importing pytriton; GptDeployError when missing."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise GptDeployError(f"serving needs the Triton server of nvidia-pytriton, which is not installed; install "
                             f"it: {SERVE_EXTRA}")
    root = Path(list(spec.submodule_search_locations)[0])
    dist = root / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    libs = root.parent / "nvidia_pytriton.libs"
    install = TritonInstall(dist / "bin" / "tritonserver", libs if libs.is_dir() else dist / "external_libs",
                            dist / "backends" / "python",
                            dist / "python_backend_stubs" / version / "triton_python_backend_stub")
    if not install.server.is_file():
        raise GptDeployError(f"nvidia-pytriton at {root} has no tritonserver binary (this wheel is for another "
                             f"platform?); reinstall it: {SERVE_EXTRA}")
    if not install.stub.is_file():
        raise GptDeployError(f"nvidia-pytriton has no python backend stub for Python {version}; serve from a "
                             f"Python it supports (3.8 to 3.13)")
    return install


def libpython_dir() -> tuple[str | None, str | None]:
    """(this Python's folder of libpython3.X.so.1.0, None) or (None, a one-line note when it has none)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    name = f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0"
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and (Path(libdir) / name).exists():
        return libdir, None
    return None, (f"note: this Python ({sys.version.split()[0]}, {sys.executable}) has no shared {name}; Triton's "
                  f"python backend loads the system's, which must be the same build, or the models fail to load "
                  f"(then serve from a Python built with --enable-shared, e.g. the system's python3)")


class TritonServer:
    """tritonserver on `repo`, started on enter (ready, or GptDeployError with the server's last log lines),
    stopped on exit."""

    def __init__(self, repo: str | Path, host: str = "127.0.0.1", ports: Ports = Ports(), *,
                 models: list[str] | None = None, log=None, startup_timeout_s: float = 180, verbose: bool = False):
        ports.check()
        self.repo, self.host, self.ports = Path(repo), host, ports
        self.models = models  # the models to load (None: every model of the repository)
        self.log = log  # a callable taking each line of the server's output; None keeps them for errors only
        self.startup_timeout_s = startup_timeout_s
        self.verbose = verbose
        self.process: subprocess.Popen | None = None
        self.note: str | None = None
        self._tail: deque[str] = deque(maxlen=40)
        self._workdir: Path | None = None

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{_url_host(self.host)}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.ports.metrics}/metrics"

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def command(self, backends: Path) -> list[str]:
        load = ["--model-control-mode", "explicit", *(a for m in self.models for a in ("--load-model", m))] \
            if self.models else []
        return [*load,
            "--model-repository", str(self.repo), "--backend-directory", str(backends),
            "--http-address", self.host, "--http-port", str(self.ports.http),
            "--grpc-address", self.host, "--grpc-port", str(self.ports.grpc),
            "--metrics-address", self.host, "--metrics-port", str(self.ports.metrics),
            "--allow-metrics", "true", "--allow-gpu-metrics", "false", "--allow-cpu-metrics", "true",
            "--exit-timeout-secs", str(STOP_GRACE_S - 5), "--strict-readiness", "true",
            "--log-verbose", "1" if self.verbose else "0",
            "--backend-config", "python,shm-default-byte-size=4194304",
            "--backend-config", "python,shm-growth-byte-size=1048576",
        ]

    def environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        libdir, self.note = libpython_dir()
        paths = [p for p in (libdir, str(install.libs), env.get("LD_LIBRARY_PATH")) if p]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
        # the stub's embedded Python looks for `python3` on PATH to find its prefix: this environment's
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), str(Path(sys.exec_prefix) / "bin"),
                                       env.get("PATH", "")])
        env.pop("PYTHONHOME", None)
        return env

    def start(self) -> None:
        install = find_triton()
        _remove_dead_workdirs()
        self._workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))
        backends = self._workdir / "backends"
        try:
            shutil.copytree(install.backend, backends / "python", ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(install.stub, backends / "python" / "triton_python_backend_stub")
        except OSError as e:
            self._cleanup()
            raise GptDeployError(f"cannot prepare Triton's python backend in {tempfile.gettempdir()}: "
                                 f"{e.strerror or e}") from None
        env = self.environment(install)
        try:
            self.process = subprocess.Popen(
                [str(install.server), *self.command(backends)], env=env, cwd=self._workdir,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        except OSError as e:
            self._cleanup()
            raise GptDeployError(f"cannot start {install.server}: {e.strerror or e}") from None
        Thread(target=self._read_output, daemon=True, name="tritonserver-output").start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _read_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self._tail.append(line)
            if self.log is not None:
                self.log(line)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise GptDeployError(f"the Triton server exited ({self.process.returncode}) while starting: "
                                     f"{self._problem()}")
            if self.ready():
                return
            time.sleep(0.2)
        raise GptDeployError(f"the Triton server was not ready after {self.startup_timeout_s:.0f} s: {self._problem()}")

    def _problem(self) -> str:
        time.sleep(0.2)  # the last lines of output
        lines = [line for line in self._tail if line.strip()]
        errors = [line for line in lines if line[:1] == "E" or "UNAVAILABLE" in line or "error" in line.lower()]
        problem = " | ".join((errors or lines)[-3:])[-600:] or "no output"
        if "_recursion_count" in problem or "libpython" in problem:
            problem += f" ({self.note or 'the python backend stub loaded another libpython than this Python'})"
        return problem

    def recent_log(self) -> list[str]:
        """The server's last lines of output (40)."""
        return list(self._tail)

    def ready(self) -> bool:
        """The models are ready (HTTP) and the gRPC and metrics endpoints accept connections too: the server
        opens them after HTTP's, so an HTTP answer alone does not mean that the metrics URL answers yet."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                if response.status != 200:
                    return False
        except (urllib.error.URLError, OSError):
            return False
        return all(_listens(_connect_host(self.host), port) for port in (self.ports.grpc, self.ports.metrics))

    def wait(self) -> int:
        return self.process.wait()

    def stop(self) -> None:
        """SIGINT, then SIGKILL to the server's process group after the grace period; idempotent."""
        process = self.process
        if process is not None and process.poll() is None:
            try:
                process.send_signal(signal.SIGINT)
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        if process is not None:
            _kill_group(process.pid)  # stubs that outlived the server, if any
            try:
                process.wait(5)
                self.process = None  # reaped: a second stop() must not signal a group id reused since
            except subprocess.TimeoutExpired:
                pass
        self._cleanup()

    def _cleanup(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def _remove_dead_workdirs() -> None:
    """The backend folders of servers whose `gptdeploy serve` was killed outright (SIGKILL leaves them)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*-*"):
        pid = folder.name[len(WORKDIR_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):  # another user's server counts as alive
            shutil.rmtree(folder, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _find_prctl():
    """libc's prctl, looked up in the parent: the child between fork and exec only calls it (no dlopen there,
    where another thread of the parent may have held the loader's lock)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _find_prctl()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _connect_host(host: str) -> str:
    """Where to reach a server that listens on HOST from this machine."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def _listens(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _url_host(host: str) -> str:
    host = _connect_host(host)
    return f"[{host}]" if ":" in host else host


def export_of(source: str, *, random: bool = False, seed: int = 0, variant: str | None = None, cache=None,
              progress=None):
    """The export folder of SOURCE: itself when it is one, else its export in the export cache (made once);
    with the variant made once when asked for."""
    from gptdeploy.app.export_cache import ExportCache
    from gptdeploy.export_folder import is_export_folder, read_export
    from gptdeploy.progress import QUIET

    progress = progress or QUIET
    if is_export_folder(Path(source)):
        folder = read_export(source)
        if variant is not None:
            folder.variant(variant)
        return folder
    from gptdeploy.app.exporting import ensure_variants
    from gptdeploy.loading import load

    loaded = load(source, weights="random" if random else None, seed=seed, progress=progress)
    folder = (cache or ExportCache()).export(loaded, "fp32", progress)
    if variant is not None:
        folder = ensure_variants(folder, [variant], reference=loaded.model, progress=progress)
    return folder


def served_repository(folder, settings, cache=None) -> Path:
    """The repository `gptdeploy serve` serves: written into the export cache (<cache>/triton/...), again each
    time (hard links to the export, so it is quick)."""
    from gptdeploy.app.export_cache import ExportCache
    from gptdeploy.app.triton_repo import REPO_MARK, write_repository

    root = (cache or ExportCache()).root / "triton"
    key = f"{folder.path.name}-{settings.name}-{settings.runtime}-{settings.variant or 'export'}-" \
          f"i{settings.instances}-b{settings.max_batch}-t{settings.threads}{'-h' if settings.huge_pages else ''}"
    # one repository per serving process (another serve of the same model must not swap it under a live
    # server); those of processes that are gone are removed here
    if root.is_dir():
        for old in root.glob(f"{key}-p*"):
            pid = old.name.rsplit("-p", 1)[1]
            if pid.isdigit() and not process_alive(int(pid)) and (old / REPO_MARK).is_file():
                shutil.rmtree(old, ignore_errors=True)
    return write_repository(folder, root / f"{key}-p{os.getpid()}", settings, force=True)

