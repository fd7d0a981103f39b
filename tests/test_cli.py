"""The CLI as a user meets it: a real subprocess, its stdout, stderr and exit code."""

import subprocess
import sys

import pytest


def gptdeploy(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gptdeploy", *args], capture_output=True, text=True, env=env)


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("gptdeploy: error:") and fragment in lines[0], lines[0]


def test_help():
    result = gptdeploy("--help")
    assert result.returncode == 0 and "info" in result.stdout


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
