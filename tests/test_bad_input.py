"""Bad input, through the command line, each case in a process of its own: exit code 2 and exactly one
line on stderr, never a traceback. The cases are what a careful user and an attacker tried: corrupt and
malformed files, tampered export folders, impossible options, an unusable environment."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_cli import gptdeploy


def assert_refused(result, fragment: str, code: int = 2) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (result.returncode, result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("gptdeploy: ") and fragment in lines[0], lines[0]


# --- checkpoints and Hugging Face folders ---------------------------------------------------------


def hf_folder_with(hf_folder: Path, tmp: Path, **changes) -> Path:
    """A copy of the transformers-made folder whose config.json has `changes` (a key set to ... is removed)."""
    folder = tmp / "hf"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def nanogpt_checkpoint(tmp: Path, **contents) -> Path:
    from tests.conftest import write_nanogpt_checkpoint

    path, _ = write_nanogpt_checkpoint(tmp / "ckpt")
    if contents:
        ckpt = torch.load(path, weights_only=True)
        ckpt.update(contents)
        torch.save(ckpt, path)
    return path


def small_vocab_checkpoint(tmp: Path) -> Path:
    """A nanoGPT checkpoint of 1,000 tokens without a meta.pkl: GPT-2's tokenizer, whose ids it cannot take."""
    from tests.conftest import write_nanogpt_checkpoint

    return write_nanogpt_checkpoint(tmp / "ckpt", vocab_size=1000)[0]


def nan_checkpoint(tmp: Path) -> Path:
    from tests.conftest import write_nanogpt_checkpoint

    path, _ = write_nanogpt_checkpoint(tmp / "ckpt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["_orig_mod.transformer.h.0.mlp.c_fc.weight"][3, 4] = float("nan")
    torch.save(ckpt, path)
    return path


def safetensors_with(tmp: Path, config_json: str) -> Path:
    from safetensors.torch import save_file

    path = tmp / "model.safetensors"
    save_file({"x": torch.zeros(1)}, path, metadata={"gptdeploy.config": config_json})
    return path


def empty_file(tmp: Path, name: str) -> Path:
    (tmp / name).write_bytes(b"")
    return tmp / name


CHECKPOINTS = [
    ("empty ckpt.pt", lambda t, hf: [empty_file(t, "ckpt.pt")], "cannot read"),
    ("n_head 0", lambda t, hf: [hf_folder_with(hf, t, n_head=0)], "n_head must be a positive integer"),
    ("n_embd not a multiple of n_head", lambda t, hf: [hf_folder_with(hf, t, n_embd=65)], "multiple of n_head"),
    ("n_layer 'two'", lambda t, hf: [hf_folder_with(hf, t, n_layer="two")], "n_layer must be a positive integer"),
    ("n_embd 64.0", lambda t, hf: [hf_folder_with(hf, t, n_embd=64.0)], "n_embd must be a positive integer"),
    ("no n_embd", lambda t, hf: [hf_folder_with(hf, t, n_embd=...)], "config.json lacks n_embd"),
    ("layer_norm_epsilon 'x'", lambda t, hf: [hf_folder_with(hf, t, layer_norm_epsilon="x")], "layer_norm_eps"),
    ("vocab smaller than the tokenizer's", lambda t, hf: [small_vocab_checkpoint(t)],
     "the tokenizer has 50257 tokens but the model only 1000"),
    ("n_layer 10**9", lambda t, hf: [hf_folder_with(hf, t, n_layer=10**9)], "GB free"),
    ("n_positions 10**12", lambda t, hf: [hf_folder_with(hf, t, n_positions=10**12)], "GB free"),
    ("model_args a list", lambda t, hf: [nanogpt_checkpoint(t, model_args=[1, 2])], "must be mappings"),
    ("model a string", lambda t, hf: [nanogpt_checkpoint(t, model="weights")], "must be mappings"),
    ("a NaN weight", lambda t, hf: [nan_checkpoint(t)], "NaN or Inf"),
    ("safetensors config a string", lambda t, hf: [safetensors_with(t, '"tiny"')], "invalid gptdeploy.config"),
    ("safetensors n_layer '2'", lambda t, hf: [safetensors_with(t, '{"n_layer": "2"}')], "n_layer must be"),
]


def test_config_json_that_is_a_list(tmp_path, hf_folder):
    folder = hf_folder_with(hf_folder, tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    assert_refused(gptdeploy("info", folder), "not a mapping")


@pytest.mark.parametrize("case, make, fragment", CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_bad_checkpoints(case, make, fragment, tmp_path, hf_folder):
    (source,) = make(tmp_path, hf_folder)
    assert_refused(gptdeploy("info", source), fragment)


# --- export folders ----------------------------------------------------------------------------------


def manifest_edit(folder: Path, change) -> None:
    path = folder / "gptdeploy.json"
    manifest = json.loads(path.read_text())
    manifest = change(manifest)
    path.write_text(json.dumps(manifest))


def _set(key, value):
    def change(m):
        m[key] = value
        return m
    return change


def _pop(key):
    def change(m):
        m.pop(key)
        return m
    return change


def _tokenizer_at(where):
    def change(m):
        m["tokenizer"]["file"] = where
        return m
    return change


def _block_size(m):
    m["config"]["block_size"] *= 4
    return m


def _truncate(relative):
    def tamper(folder):
        path = folder / relative
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return tamper


def _empty(relative):
    def tamper(folder):
        (folder / relative).write_bytes(b"")
    return tamper


FOLDERS = [
    ("manifest []", lambda f: manifest_edit(f, lambda m: []), "is format 'list'"),
    ("manifest without graphs", lambda f: manifest_edit(f, _pop("graphs")), "graphs must hold with_past"),
    ("manifest without config", lambda f: manifest_edit(f, _pop("config")), "no config"),
    ("precision fp64", lambda f: manifest_edit(f, _set("precision", "fp64")), "precision 'fp64'"),
    ("tokenizer /etc/passwd", lambda f: manifest_edit(f, _tokenizer_at("/etc/passwd")), "not a path inside"),
    ("tokenizer ../x", lambda f: manifest_edit(f, _tokenizer_at("../gpt2.tiktoken")), "not a path inside"),
    ("block_size larger than the graph's", lambda f: manifest_edit(f, _block_size), "is not config.json's"),
    ("truncated model.onnx", _truncate("onnx/model.onnx"), "onnx/model.onnx has"),
    ("empty model.onnx", _empty("onnx/model.onnx"), "onnx/model.onnx has"),
    ("changed config.json", lambda f: (f / "config.json").write_text("{}"), "config.json"),
]


@pytest.mark.parametrize("case, tamper, fragment", FOLDERS, ids=[c[0] for c in FOLDERS])
@pytest.mark.parametrize("command", ["generate", "parity", "optimize"])
def test_bad_export_folders(case, tamper, fragment, command, tiny_export_path, tmp_path):
    folder = shutil.copytree(tiny_export_path, tmp_path / "export")
    tamper(folder)
    args = {"generate": ["generate", folder, "--prompt", "Hi", "--max-new-tokens", "2"],
            "parity": ["parity", folder, "--reference", "ort", "--runtimes", "ort", "--precision", "fp32-fused"],
            "optimize": ["optimize", folder, "--variants", "fp32-fused"]}[command]
    assert_refused(gptdeploy(*args), fragment)


# --- options and environment -------------------------------------------------------------------------


def unwritable(tmp: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permissions; /proc refuses everyone
        return Path("/proc/gptdeploy-test")
    folder = tmp / "locked"
    folder.mkdir(mode=0o500)
    return folder


OPTIONS = [
    (["generate", "tiny", "--random", "--seed", "-1"], "seed must be an integer from 0"),
    (["generate", "tiny", "--random", "--device", "banana"], "--device 'banana'"),
    (["generate", "tiny", "--random", "--temperature", "nan"], "temperature must be 0"),
    (["generate", "tiny", "--random", "--temperature", "inf"], "temperature must be 0"),
    (["generate", "tiny", "--random", "--temperature", "1e-310"], "temperature must be 0"),
    (["generate", "tiny", "--random", "--threads", "2000"], "--threads 2000"),
    (["generate", "tiny", "--random", "--bogus"], "No such option: --bogus"),
    (["bench", "tiny", "--random", "--runtime", "torch", "--batch", "100000000", "--prompt-len", "8", "--new-tokens", "8"], "GB free"),
    (["bench", "tiny", "--random", "--runtime", "torch", "--json", "{tmp}"], "is a folder"),
    (["bench", "tiny", "--random", "--runtime", "torch", "--json", "{locked}/out.json"], "--json"),
    (["parity", "tiny", "--random", "--json", "{locked}/out.json"], "--json"),
]


@pytest.mark.parametrize("args", OPTIONS, ids=[" ".join(a[0][1:]) for a in OPTIONS])
def test_bad_options(args, tmp_path):
    args, fragment = args
    paths = {"tmp": tmp_path, "locked": unwritable(tmp_path)}
    assert_refused(gptdeploy(*[a.format(**paths) for a in args]), fragment)


def test_an_export_cache_that_is_a_file(tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    env = {**os.environ, "GPTDEPLOY_CACHE": str(tmp_path / "cache")}
    result = gptdeploy("generate", "tiny", "--random", "--runtime", "ort", "--prompt", "Hi", env=env)
    assert_refused(result, "cannot use the export cache")


def test_a_bad_spinning_setting(tiny_export_path):
    env = {**os.environ, "GPTDEPLOY_ORT_SPINNING": "off"}
    result = gptdeploy("generate", tiny_export_path, "--prompt", "Hi", "--max-new-tokens", "2", env=env)
    assert_refused(result, "GPTDEPLOY_ORT_SPINNING must be 0")


def test_a_read_only_export_cache(tmp_path):
    env = {**os.environ, "GPTDEPLOY_CACHE": str(unwritable(tmp_path) / "cache")}
    result = gptdeploy("generate", "tiny", "--random", "--runtime", "ort", "--prompt", "Hi", env=env)
    assert_refused(result, "cannot use the export cache")


def test_stdout_that_cannot_be_written(tmp_path):
    """stdout on /dev/full: one line on stderr, exit 2 (the fork server's children write to files; a shell
    redirect is what a user does)."""
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "gptdeploy", "info", "tiny", "--random"], stdout=full,
                                stderr=subprocess.PIPE, text=True)
    assert_refused(result, "cannot write to standard output: No space left on device")
