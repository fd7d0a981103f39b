"""Nothing lost, nothing half-written, nothing tampered with goes unnoticed.

- `export --force` replaces only what verifies as a gptdeploy export that lists everything it holds;
- SIGINT, SIGTERM and SIGKILL at any moment of `export --force` leave the old export or the new one,
  complete, at the path; what a killed run leaves behind is hidden, and the next run removes it;
- every file an export folder's runtime reads is checked against the manifest before it runs: random
  byte flips and truncations of any file end in a verification error or in the same output;
- `gptdeploy verify` lists every difference.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import differences, read_export
from gptdeploy.files import remove_leftovers
from tests.test_bad_input import assert_refused
from tests.test_cli import gptdeploy

# --- --force -------------------------------------------------------------------------------------------


def test_force_never_deletes_a_folder_that_is_not_an_export(tmp_path):
    """A user's folder with a file named gptdeploy.json that is no manifest: refused, everything kept."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "gptdeploy.json").write_text('{"note": "mine"}')
    (proj / "thesis.txt").write_text("years of work")
    result = gptdeploy("export", "tiny", "--random", "--out", proj, "--force")
    assert_refused(result, "does not read as a gptdeploy export")
    assert (proj / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]


def test_force_refuses_an_export_holding_files_it_does_not_list(tiny_export_path, tmp_path):
    out = shutil.copytree(tiny_export_path, tmp_path / "tiny-onnx")
    (out / "thesis.txt").write_text("years of work")
    (out / "onnx" / "notes.md").write_text("mine")
    result = gptdeploy("export", "tiny", "--random", "--out", out, "--force")
    assert_refused(result, "holds files its manifest does not list: onnx/notes.md, thesis.txt")
    assert (out / "thesis.txt").exists() and differences(read_export(out)) == [
        "onnx/notes.md: not listed in the manifest", "thesis.txt: not listed in the manifest"]


# --- interrupts ------------------------------------------------------------------------------------------


def _wait_for(pattern: str, parent: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not list(parent.glob(pattern)) and process.poll() is None:
        assert time.monotonic() < deadline, f"{pattern} did not appear"
        time.sleep(0.01)


# When to interrupt: while the second graph is traced; or once both graphs and the side files are in the
# hidden folder: while the export is validated, its manifest written and the folder swapped into place
# (the swap itself is one rename of two folders, renameat2 RENAME_EXCHANGE: no moment inside it exists).
MOMENTS = {"tracing": ".tiny-onnx.*.partial/onnx/model.onnx", "replacing": ".tiny-onnx.*.partial/config.json"}


@pytest.mark.parametrize("sig, moment", [
    (signal.SIGKILL, "replacing"),
    pytest.param(signal.SIGTERM, "tracing", marks=pytest.mark.heavy),  # SIGINT while tracing: test_export.py
    pytest.param(signal.SIGKILL, "tracing", marks=pytest.mark.heavy),
    pytest.param(signal.SIGTERM, "replacing", marks=pytest.mark.heavy),
    pytest.param(signal.SIGINT, "replacing", marks=pytest.mark.heavy),
], ids=lambda value: getattr(value, "name", value))
def test_an_interrupted_force_export_leaves_the_old_or_the_new_export(sig, moment, tiny_export, tmp_path):
    out = shutil.copytree(tiny_export.path, tmp_path / "tiny-onnx")
    old = read_export(out).manifest
    process = subprocess.Popen([sys.executable, "-m", "gptdeploy", "export", "tiny", "--random", "--out", str(out),
                                "--force"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(MOMENTS[moment], tmp_path, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)

    folder = read_export(out)  # the old export or the new one, complete, at the path
    assert differences(folder) == []
    assert folder.manifest["created"] >= old["created"] and folder.manifest["source"] == old["source"]
    if process.returncode == 0:  # it finished before the signal came: the new export
        assert folder.manifest["created"] >= old["created"]
    elif sig == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:  # the signal came before the replacement was done: it unwound cleanly
        assert process.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], stderr
        assert stderr.strip().splitlines()[-1] == "gptdeploy: interrupted"
        assert folder.manifest == old
        assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-onnx"], "a catchable signal left something"
    remove_leftovers(tmp_path)  # what the next run into this folder does first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-onnx"]


def test_a_leftover_of_a_run_that_still_runs_is_kept(tmp_path):
    """Leftovers are removed only when the process that wrote them has ended."""
    from gptdeploy.files import new_staging_folder

    mine = new_staging_folder(tmp_path / "out")  # this process is alive
    assert remove_leftovers(tmp_path) == [] and mine.exists()
    dead = tmp_path / ".out.999999999-abc.partial"  # no such process
    dead.mkdir()
    (dead / ".gptdeploy-staging").touch()
    user = tmp_path / ".notes.999999999-abc.partial"  # the same kind of name, but not a folder gptdeploy made
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    assert remove_leftovers(tmp_path) == [dead] and user.exists() and mine.exists()


# --- tampering and corruption ------------------------------------------------------------------------


def _flip(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(3):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def _generate(folder: Path, cache_root: Path) -> list[int] | GptDeployError:
    from gptdeploy.app.export_cache import ExportCache
    from gptdeploy.app.generation import GenerationConfig, generate
    from gptdeploy.app.sources import open_runner

    try:
        runner, tok = open_runner("ort", folder, cache=ExportCache(cache_root))
        with runner:
            return generate(runner, tok, ["Hello world"], GenerationConfig(max_new_tokens=6, greedy=True)).new_ids[0]
    except GptDeployError as e:
        return e


def test_random_flips_and_truncations_are_caught_or_harmless(tiny_export_path, tmp_path):
    """Every file of an export, flipped or truncated: a verification error (GptDeployError, which the command
    line prints as one line with exit 2), or the very same tokens; never a traceback, never other output."""
    expected = _generate(tiny_export_path, tmp_path / "cache")
    assert isinstance(expected, list)
    rng = random.Random(0)
    files = sorted(read_export(tiny_export_path).manifest["files"]) + ["gptdeploy.json"]
    outcomes = {}
    for relative in files:
        for mutation in ("flip", "truncate"):
            folder = shutil.copytree(tiny_export_path, tmp_path / f"{relative.replace('/', '_')}-{mutation}")
            path = folder / relative
            data = path.read_bytes()
            path.write_bytes(_flip(data, rng) if mutation == "flip" else data[: rng.randrange(len(data))])
            result = _generate(folder, tmp_path / "cache")
            assert isinstance(result, GptDeployError) or result == expected, (relative, mutation, result)
            outcomes[(relative, mutation)] = "refused" if isinstance(result, GptDeployError) else "same output"
    # the files generation reads are always caught
    for relative in ("onnx/model.onnx", "gpt2.tiktoken", "config.json", "gptdeploy.json"):
        assert outcomes[(relative, "flip")] == outcomes[(relative, "truncate")] == "refused", relative


def test_verification_is_remembered_and_redone_when_a_file_changes(tiny_export_path, tmp_path):
    from gptdeploy.export_folder import VerificationMemo, verify

    folder = read_export(shutil.copytree(tiny_export_path, tmp_path / "export"))
    memo = VerificationMemo(tmp_path / "verified.json")
    verify(folder, memo=memo)
    remembered = json.loads((tmp_path / "verified.json").read_text())
    assert len(remembered) == len(folder.manifest["files"])
    verify(folder, memo=VerificationMemo(tmp_path / "verified.json"))  # a stat per file
    graph = folder.path / "onnx/model.onnx"
    stat = graph.stat()
    data = bytearray(graph.read_bytes())
    data[-100] ^= 1
    graph.write_bytes(bytes(data))
    import os

    os.utime(graph, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the modification time put back
    with pytest.raises(GptDeployError, match="onnx/model.onnx does not match its sha256"):
        verify(folder, memo=VerificationMemo(tmp_path / "verified.json"))


def test_verify_command(tiny_export_path, tmp_path):
    folder = shutil.copytree(tiny_export_path, tmp_path / "export")
    result = gptdeploy("verify", folder)
    assert result.returncode == 0 and f"all {len(read_export(folder).manifest['files'])} files match" in result.stdout
    (folder / "tokenizer.json").write_text("{}")
    (folder / "extra.bin").write_bytes(b"x")
    result = gptdeploy("verify", folder)
    assert result.returncode == 1, result
    assert f"{folder}: tokenizer.json: " in result.stdout and f"{folder}: extra.bin: not listed" in result.stdout
    assert "2 differences" in result.stdout
    assert_refused(gptdeploy("verify", tmp_path), "not a gptdeploy export folder")


def test_nan_logits_stop_generation_naming_the_step(tiny_export_path, tmp_path):
    """A graph whose weights give NaN (the manifest updated to match, so verification passes): the step is
    named and the run fails (exit 1), instead of printing token 0 forever."""
    import onnx
    from onnx import numpy_helper

    from gptdeploy.files import sha256_file

    folder = shutil.copytree(tiny_export_path, tmp_path / "export")
    graph = folder / "onnx/model.onnx"
    model = onnx.load(graph)
    (weight,) = [i for i in model.graph.initializer if i.name.endswith("wpe.weight")]
    values = numpy_helper.to_array(weight).copy()
    values[:, 0] = float("nan")  # every position's embedding
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(model, graph)
    manifest = json.loads((folder / "gptdeploy.json").read_text())
    manifest["files"]["onnx/model.onnx"] = sha256_file(graph)
    manifest["sizes"]["onnx/model.onnx"] = graph.stat().st_size
    (folder / "gptdeploy.json").write_text(json.dumps(manifest))
    result = gptdeploy("generate", folder, "--prompt", "Hello", "--greedy")
    assert_refused(result, "gave NaN or Inf logits at step 1", code=1)


@pytest.mark.parametrize("edit", ["negated ln_f.weight", "two ranks swapped"])
def test_the_reported_tampering_is_refused_naming_the_file(edit, tiny_export_path, tmp_path):
    """The two edits that used to change generate's text with exit 0: a negated final LayerNorm weight in
    the graph, two ranks swapped in the tokenizer's file. Now one line naming the file, exit 2."""
    import onnx
    from onnx import numpy_helper

    folder = shutil.copytree(tiny_export_path, tmp_path / "export")
    if edit == "negated ln_f.weight":
        relative = "onnx/model.onnx"
        model = onnx.load(folder / relative)
        final_norm = [n for n in model.graph.node if n.op_type == "LayerNormalization"][-1]  # ln_f
        weights = {t.name: t for t in model.graph.initializer}
        negated = numpy_helper.from_array(-numpy_helper.to_array(weights[final_norm.input[1]]), "ln_f_negated")
        model.graph.initializer.append(negated)  # its own tensor: identical LayerNorm weights may be shared
        final_norm.input[1] = "ln_f_negated"
        onnx.save(model, folder / relative)
    else:
        relative = "gpt2.tiktoken"
        lines = (folder / relative).read_text().splitlines()
        (token_a, rank_a), (token_b, rank_b) = lines[300].split(), lines[301].split()
        lines[300], lines[301] = f"{token_a} {rank_b}", f"{token_b} {rank_a}"
        (folder / relative).write_text("\n".join(lines) + "\n")
    assert_refused(gptdeploy("generate", folder, "--prompt", "ROMEO:", "--max-new-tokens", "2", "--greedy"),
                   relative)


def test_an_internal_error_is_one_line_with_its_own_exit_code(monkeypatch, capsys):
    """A bug is neither bad input (2) nor a failed comparison (1): exit 70, one line saying how to see more;
    GPTDEPLOY_DEBUG=1 lets the traceback through."""
    import gptdeploy.loading
    from gptdeploy.app.cli import run

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(gptdeploy.loading, "load", broken)
    monkeypatch.delenv("GPTDEPLOY_DEBUG", raising=False)
    assert run(["info", "tiny", "--random"]) == 70
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "internal error, ZeroDivisionError: division by zero" in lines[0]
    assert "GPTDEPLOY_DEBUG=1" in lines[0]
    monkeypatch.setenv("GPTDEPLOY_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        run(["info", "tiny", "--random"])
