"""examples/: outside clients of the export folder give gptdeploy's greedy ids, on every graph; and the base
install (no torch) runs an export.

The clients are examples/python_onnxruntime.py (onnxruntime, numpy, tokenizers) and examples/genai.py
(onnxruntime-genai), each run as a user runs it, in a process of its own that cannot import torch or
gptdeploy; examples/node has tests/test_example_node.py. The folder is the lively export with every
variant (conftest's lively_optimized_path); the reference is `gptdeploy generate --greedy`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from gptdeploy.export_folder import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SOURCES = ("pyproject.toml", "README.md", "gptdeploy", "exporters", "runtimes")  # what the package is built from
PROMPTS = ["ROMEO:", "JULIET: O"]
NEW_TOKENS = 20
VARIANT_CASES = [None, *VARIANTS]  # None: the folder's own graph, onnx/model.onnx
IDS = ["model.onnx", *VARIANTS]

# Run a script as `python SCRIPT ARGS` does, with torch and gptdeploy unimportable
WITHOUT_GPTDEPLOY = textwrap.dedent("""
    import runpy, sys
    for blocked in ("torch", "gptdeploy", "onnx", "transformers"):
        sys.modules[blocked] = None
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
""")


def run_example(script: str, *args) -> dict:
    result = subprocess.run([sys.executable, "-c", WITHOUT_GPTDEPLOY, str(EXAMPLES / script), *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{script} {' '.join(map(str, args))}:\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", VARIANT_CASES, ids=IDS)
def test_python_onnxruntime_example_matches_gptdeploy(lively_optimized_path, greedy_ids, variant):
    """The two prompts as one left-padded batch with the KV cache, on each graph of the folder.

    q8 quantizes its activations per tensor at run time (DynamicQuantizeLinear), so a row's logits depend on
    the other rows and on what the padding holds (the example pads with end-of-text, gptdeploy with id 0):
    there it runs one prompt at a time."""
    folder = lively_optimized_path
    graph = VARIANTS[variant].file if variant else "onnx/model.onnx"
    for prompts in [[p] for p in PROMPTS] if variant == "q8" else [PROMPTS]:
        out = run_example("python_onnxruntime.py", folder, *prompts, "--file", graph, "--max-new-tokens",
                          NEW_TOKENS, "--json")
        assert out["file"] == graph
        assert out["outputs"] == greedy_ids(folder, prompts, NEW_TOKENS, variant)


@pytest.mark.parametrize("variant", VARIANT_CASES, ids=IDS)
def test_genai_example_matches_gptdeploy(lively_optimized_path, greedy_ids, variant):
    """onnxruntime-genai with the folder's genai_config.json and, for a variant, the manifest's overlay."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (the test extra has it)")
    folder = lively_optimized_path
    out = run_example("genai.py", folder, *PROMPTS, "--max-new-tokens", NEW_TOKENS, "--json",
                      *(["--variant", variant] if variant else []))
    # genai.py runs each prompt on its own: so does the reference
    assert out["outputs"] == [row for p in PROMPTS for row in greedy_ids(folder, [p], NEW_TOKENS, variant)]


@pytest.mark.parametrize("variant", VARIANT_CASES, ids=IDS)
def test_optimum_example_matches_gptdeploy(lively_optimized_path, greedy_ids, variant):
    """Optimum's ORTModelForCausalLM. optimum-onnx pins a transformers older than the test extra's, so it is
    not in the test extra: run this in an environment that has it (docs/embedding.md)."""
    pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx is not installed (it pins transformers < 4.58; "
                                                      "docs/embedding.md has its environment)")
    folder = lively_optimized_path
    file = Path(VARIANTS[variant].file if variant else "onnx/model.onnx").name
    out = subprocess.run([sys.executable, str(EXAMPLES / "optimum_ort.py"), folder, *PROMPTS, "--file", file,
                          "--max-new-tokens", str(NEW_TOKENS), "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])["outputs"]
    assert got == [row for p in PROMPTS for row in greedy_ids(folder, [p], NEW_TOKENS, variant)]


@pytest.mark.parametrize("variant", [None, "fp32-fused"], ids=["model.onnx", "fp32-fused"])
def test_examples_read_shared_weights(lively_shared, greedy_ids, variant):
    """A folder whose fp32 graphs share onnx/model.onnx_data (tests/test_weights.py): the Python clients
    load them as they are."""
    folder = lively_shared[0]
    graph = VARIANTS[variant].file if variant else "onnx/model.onnx"
    out = run_example("python_onnxruntime.py", folder, *PROMPTS, "--file", graph, "--max-new-tokens", NEW_TOKENS,
                      "--json")
    assert out["outputs"] == greedy_ids(folder, PROMPTS, NEW_TOKENS, variant)
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        out = run_example("genai.py", folder, *PROMPTS, "--max-new-tokens", NEW_TOKENS, "--json",
                          *(["--variant", variant] if variant else []))
        assert out["outputs"] == [row for p in PROMPTS for row in greedy_ids(folder, [p], NEW_TOKENS, variant)]


def test_each_variant_says_how_genai_runs_it(lively_optimized_path):
    """The overlay names the variant's graph; the shared-buffer variants (GroupQueryAttention) share it."""
    manifest = json.loads((lively_optimized_path / "gptdeploy.json").read_text())
    base = json.loads((lively_optimized_path / "genai_config.json").read_text())
    assert base["model"]["decoder"]["filename"] == "onnx/model.onnx"
    assert base["search"]["past_present_share_buffer"] is False
    for name, entry in manifest["variants"].items():
        assert entry["genai"] == {"model": {"decoder": {"filename": entry["file"]}},
                                  "search": {"past_present_share_buffer": entry["kv_cache"] == "shared-buffer"}}, name


# --- the base install: gptdeploy without its export extra ---


def _base_requirements() -> list[str]:
    """gptdeploy's requirements without extras, as its installed metadata states them (pyproject.toml's)."""
    requires = importlib.metadata.requires("gptdeploy") or []
    return [r for r in requires if Requirement(r).marker is None or Requirement(r).marker.evaluate({"extra": ""})]


def _distribution_closure(requirements: list[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions that pip would install for the requirements, dependencies included."""
    seen, todo, found = set(), list(requirements), []
    while todo:
        requirement = Requirement(todo.pop())
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = requirement.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        dist = importlib.metadata.distribution(requirement.name)
        found.append(dist)
        todo.extend(dist.requires or [])
    return found


@pytest.fixture(scope="module")
def base_install(tmp_path_factory):
    """A folder of site packages holding gptdeploy (installed from this tree, as a wheel would be) and only
    the distributions of its base requirements: what `pip install gptdeploy` installs, with no torch."""
    site, sources = tmp_path_factory.mktemp("base-install"), tmp_path_factory.mktemp("sources")
    for name in SOURCES:  # built from a copy: setuptools would leave a build/ folder in the tree
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, sources / name)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                             "--target", str(site), str(sources)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for dist in _distribution_closure(_base_requirements()):
        tops = {Path(f).parts[0] for f in dist.files or [] if Path(f).parts[0] not in ("..", "__pycache__")}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    return site


def run_base(site: Path, code: str, *args) -> subprocess.CompletedProcess:
    """Python with the base install's packages only (-I -S: no site-packages, no PYTHON* variables)."""
    prelude = f"import sys; sys.path.insert(0, {str(site)!r})\n"
    return subprocess.run([sys.executable, "-I", "-S", "-c", prelude + textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_base_install_has_no_torch_and_runs_an_export(base_install, lively_optimized_path, greedy_ids):
    code = """
        import contextlib, importlib.util, io, json, sys
        assert importlib.util.find_spec("torch") is None and importlib.util.find_spec("onnx") is None
        assert sys.modules["gptdeploy"].__file__.startswith(sys.path[0]) if "gptdeploy" in sys.modules else True
        from gptdeploy.app.cli import run
        folder = sys.argv[1]
        answers = {}
        for name, argv in [("generate", ["generate", folder, "--prompt", "ROMEO:", "--prompt", "JULIET: O", "--greedy",
                                         "--max-new-tokens", "20", "--json"]),
                           ("generate-q4", ["generate", folder, "--prompt", "ROMEO:", "--prompt", "JULIET: O",
                                            "--greedy", "--max-new-tokens", "20", "--json", "--variant", "q4"]),
                           ("verify", ["verify", folder]), ("info", ["info", folder]),
                           ("export", ["export", "shakespeare", "--out", folder + "-again"])]:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = run(argv)
            answers[name] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
        import gptdeploy
        answers["where"] = gptdeploy.__file__
        answers["torch"] = "torch" in sys.modules
        print(json.dumps(answers))
    """
    result = run_base(base_install, code, lively_optimized_path)
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert answers["where"].startswith(str(base_install)) and answers["torch"] is False
    for name, variant in (("generate", None), ("generate-q4", "q4")):
        assert answers[name]["code"] == 0, answers[name]["stderr"]
        got = [{k: o[k] for k in ("prompt_ids", "generated_ids")} for o in json.loads(answers[name]["stdout"])["outputs"]]
        assert got == greedy_ids(lively_optimized_path, PROMPTS, NEW_TOKENS, variant)
    assert answers["verify"]["code"] == 0 and "match the manifest" in answers["verify"]["stdout"]
    assert answers["info"]["code"] == 0 and "lively" in answers["info"]["stdout"]
    export = answers["export"]
    assert export["code"] == 2 and export["stderr"].count("\n") == 1, export
    assert "pip install 'gptdeploy[export]'" in export["stderr"] and "Traceback" not in export["stderr"]
