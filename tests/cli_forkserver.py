"""Runs `python -m gptdeploy ...` commands for the tests, each in a process of its own, cheaply.

Started once per test session (tests/test_cli.py starts it). It imports the heavy libraries that every
command needs (torch, onnx, onnxruntime, ...) once, runs no computation, and then, for each command it
reads from stdin as a JSON line {"args", "env", "cwd"}, forks a child. The child takes that environment
and working directory, sends its file descriptors 1 and 2 to files, runs the gptdeploy module exactly
as `python -m gptdeploy` does, and exits with the command's exit code. The server answers with a JSON
line {"returncode", "stdout", "stderr", "cpu_seconds"} (the child's user + system time).

So every command still runs in a real process (its own exit code, its own stdout and stderr, what the
interpreter prints at exit), without paying Python's and torch's start-up (some 2 CPU-seconds) each
time. Modules that read the environment when imported (huggingface_hub, transformers) are not imported
here, so the child imports them under the environment the test asked for.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import traceback

PRELOAD = ("numpy", "torch", "onnx", "onnx_ir", "onnxscript", "onnxruntime", "safetensors", "tiktoken", "typer",
           "typer._adapters",  # what typer checks option values with (pydantic), on every command's first parse
           "rich.console", "rich.progress", "rich.table", "gptdeploy.app.cli", "gptdeploy.loading",
           "gptdeploy.app.sources", "gptdeploy.exporters.onnx_export")


def _child(request: dict, out: str, err: str) -> None:
    os.chdir(request.get("cwd") or os.getcwd())
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - fd 0 outlives this function on purpose
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    sys.argv = ["gptdeploy", *request["args"]]
    code = 0
    try:
        runpy.run_module("gptdeploy", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(code)


def main() -> None:
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:  # only slower: the command imports what it needs itself
            pass
    reply = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        with tempfile.TemporaryDirectory() as tmp:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            open(out, "w").close()  # noqa: SIM115
            open(err, "w").close()  # noqa: SIM115
            pid = os.fork()
            if pid == 0:
                _child(request, out, err)
            _, status, usage = os.wait4(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            with open(out, encoding="utf-8", errors="replace") as f_out, \
                    open(err, encoding="utf-8", errors="replace") as f_err:
                answer = {"returncode": code, "stdout": f_out.read(), "stderr": f_err.read(),
                          "cpu_seconds": usage.ru_utime + usage.ru_stime}
        reply.write(json.dumps(answer) + "\n")
        reply.flush()


if __name__ == "__main__":
    main()
