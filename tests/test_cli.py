"""The CLI as a user meets it: a process of its own, its stdout, stderr and exit code."""

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_server: subprocess.Popen | None = None
COMMANDS_CPU_SECONDS = [0.0]  # what the forked commands have used so far (user + system)


def _fork_server() -> subprocess.Popen:
    """tests/cli_forkserver.py, started on first use: it forks a process per command."""
    global _server
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cli_forkserver.py"))],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        atexit.register(_stop, _server)
    return _server


def _stop(server: subprocess.Popen) -> None:
    """Ends the server and waits for it, so that its CPU time (and its children's) counts in this process's."""
    server.stdin.close()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def gptdeploy(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """`python -m gptdeploy ARGS`, in a process of its own (forked by tests/cli_forkserver.py, which has the
    heavy libraries imported already), with `env` (default: this process's) and `cwd`."""
    server = _fork_server()
    request = {"args": [str(a) for a in args], "env": dict(os.environ if env is None else env),
               "cwd": str(cwd or os.getcwd())}
    server.stdin.write(json.dumps(request) + "\n")
    server.stdin.flush()
    answer = json.loads(server.stdout.readline())
    COMMANDS_CPU_SECONDS[0] += answer["cpu_seconds"]
    return subprocess.CompletedProcess(["gptdeploy", *args], answer["returncode"], answer["stdout"], answer["stderr"])


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("gptdeploy: error:") and fragment in lines[0], lines[0]


def test_help():
    result = gptdeploy("--help")
    assert result.returncode == 0 and "info" in result.stdout


@pytest.mark.heavy  # gpt2-size: 124M random parameters
def test_info_gpt2_random_counts_parameters():
    result = gptdeploy("info", "gpt2", "--random")
    assert result.returncode == 0, result.stderr
    assert "124,439,808" in result.stdout and "gpt2-bpe" in result.stdout


def test_info_nanogpt_checkpoint(tmp_path):
    from tests.conftest import write_nanogpt_checkpoint

    path, model = write_nanogpt_checkpoint(tmp_path / "out")
    result = gptdeploy("info", str(path))
    assert result.returncode == 0, result.stderr
    assert f"{model.num_params():,}" in result.stdout and "nanoGPT checkpoint" in result.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["info", "gpt5"], "known presets: gpt2"),
        (["info", "/nonexistent/ckpt.pt"], "unknown model"),
        (["info", "tiny"], "no pretrained weights"),
    ],
)
def test_bad_input_is_one_line(args, fragment):
    assert_one_line_error(gptdeploy(*args), fragment)


def test_corrupt_file_is_one_line(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"garbage")
    assert_one_line_error(gptdeploy("info", str(tmp_path / "ckpt.pt")), "cannot read")
