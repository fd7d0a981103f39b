"""examples/node: transformers.js and onnxruntime-node on an export folder give gptdeploy's greedy ids.

One `npm ci` (in examples/node, whose node_modules is git-ignored; skipped when node_modules already holds
what package-lock.json pins) and the lively export with every variant (conftest's lively_optimized_path);
then, per graph of the folder, the example's two scripts against `gptdeploy generate`. The default suite
runs each script on the graphs whose loading differs: onnxruntime-node on model.onnx, its no-cache graph,
fp16 (a float16 KV cache) and q4 (MatMulNBits); transformers.js on model.onnx, the fused graph (named by
model_file_name) and q4 (a dtype's file suffix); both on the shared-weights folder. The other graphs
(int8 like q4, q8, and the rest) are `heavy`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from gptdeploy.export_folder import VARIANTS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "node"
PROMPTS = ["ROMEO:", "JULIET: O"]
NEW_TOKENS = 20
# npm's words for a registry it could not reach
OFFLINE = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENETUNREACH", "network")


# (test id, transformers.js dtype, model_file_name, the graph, gptdeploy's --variant or None for model.onnx)
CASES = [
    ("fp32", "fp32", "model", "onnx/model.onnx", None),
    ("fp32-fused", "fp32", "model_fused", "onnx/model_fused.onnx", "fp32-fused"),
    ("int8", "int8", "model", "onnx/model_int8.onnx", "int8"),
    ("q4", "q4", "model", "onnx/model_q4.onnx", "q4"),
    ("fp16", "fp16", "model", "onnx/model_fp16.onnx", "fp16"),
    ("q8", "q8", "model", "onnx/model_quantized.onnx", "q8"),
]


def cases(rows, default):
    """The rows as pytest params, those not named in `default` marked heavy."""
    return [pytest.param(*row, id=row[0], marks=() if row[0] in default else pytest.mark.heavy) for row in rows]


def _installed(example: Path) -> bool:
    """node_modules holds what package-lock.json pins, and the lock file is package.json's: npm's record of
    what it installed there (node_modules/.package-lock.json) has every package of the lock file at the
    same entry (optional ones, other platforms' binaries, aside), and every package it lists is there."""
    try:
        package = json.loads((example / "package.json").read_text())
        want = json.loads((example / "package-lock.json").read_text())["packages"]
        have = json.loads((example / "node_modules" / ".package-lock.json").read_text())["packages"]
    except (OSError, ValueError, KeyError):
        return False
    root = want.get("", {})
    return (all(package.get(k, {}) == root.get(k, {}) for k in ("dependencies", "devDependencies"))
            and all(want.get(name) == entry and (example / name / "package.json").is_file()
                    for name, entry in have.items())
            and all(name in have for name, entry in want.items() if name and not entry.get("optional")))


@pytest.fixture(scope="module")
def node_example():
    """examples/node with its packages installed (npm ci), held by this session alone while the module runs."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("examples/node needs Node.js: `node` and `npm` are not on PATH")
    # Another pytest on this checkout would run npm ci in the same folder: one at a time.
    key = hashlib.sha256(str(EXAMPLE).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"gptdeploy-node-example-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed(EXAMPLE):
            yield node
            return
        env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}  # no download of onnxruntime's GPU binaries
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, env=env,
                                capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            log = result.stdout + result.stderr
            reason = next((line for line in log.splitlines() if any(word in line for word in OFFLINE)), None)
            if reason is not None:
                pytest.skip(f"npm ci could not reach the npm registry: {reason.strip()}")
            pytest.fail(f"npm ci failed in {EXAMPLE}:\n{log}")
        yield node


@pytest.fixture(scope="module")
def folder(node_example, request):
    """The lively export with every variant (conftest's, shared with the Python examples' tests)."""
    # Asked for here, not as an argument, so that a missing Node.js skips before the export is made
    return request.getfixturevalue("lively_optimized_path")


def _node(node, script, *args) -> dict:
    result = subprocess.run([node, script, *map(str, args)], cwd=EXAMPLE, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"node {script} {' '.join(map(str, args))}:\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(folder, greedy_ids):
    """reference(variant, prompts): gptdeploy's greedy outputs (prompt_ids, generated_ids), the prompts as one batch."""
    return lambda variant, prompts: greedy_ids(folder, prompts, NEW_TOKENS, variant)


def _case(folder, graph, variant):
    """Every graph of the table is in the folder, and is the variant it is compared with."""
    assert (folder / graph).is_file()
    assert variant is None and graph == "onnx/model.onnx" or VARIANTS[variant].file == graph


@pytest.mark.parametrize("name, dtype, model_file, graph, variant", cases(CASES, {"fp32", "fp32-fused", "q4"}))
def test_pipeline_matches_gptdeploy(node_example, folder, reference, name, dtype, model_file, graph, variant):
    _case(folder, graph, variant)
    out = _node(node_example, "pipeline.mjs", folder, PROMPTS[0], "--dtype", dtype, "--model-file", model_file,
                "--max-new-tokens", NEW_TOKENS)
    assert out["file"] == graph
    (expected,) = reference(variant, PROMPTS[:1])
    assert {k: out[k] for k in expected} == expected


@pytest.mark.parametrize("name, dtype, model_file, graph, variant",
                         cases(CASES + [("decoder_model", None, None, "onnx/decoder_model.onnx", None)],
                               {"fp32", "decoder_model", "fp16", "q4"}))
def test_onnxruntime_matches_gptdeploy(node_example, folder, reference, name, dtype, model_file, graph, variant):
    """Two prompts as a left-padded batch (and, for model.onnx and decoder_model.onnx, one prompt alone);
    decoder_model.onnx (no KV cache) against model.onnx's ids."""
    if graph != "onnx/decoder_model.onnx":
        _case(folder, graph, variant)
    for prompts in (PROMPTS[:1], PROMPTS) if variant is None else (PROMPTS,):
        out = _node(node_example, "onnxruntime.mjs", folder, *prompts, "--file", graph,
                    "--max-new-tokens", NEW_TOKENS)
        assert out["file"] == graph
        got = [{k: o[k] for k in ("prompt_ids", "generated_ids")} for o in out["outputs"]]
        assert got == reference(variant, prompts), prompts


@pytest.mark.parametrize("name, dtype, model_file, graph, variant", cases(CASES[:2], {"fp32"}))
def test_shared_weights(node_example, lively_shared, greedy_ids, name, dtype, model_file, graph, variant):
    """The fp32 graphs of a folder whose weights are in one shared file (onnx/model.onnx_data, which config.json
    names for transformers.js): both scripts load them as they are."""
    folder = lively_shared[0]
    out = _node(node_example, "pipeline.mjs", folder, PROMPTS[0], "--dtype", dtype, "--model-file", model_file,
                "--max-new-tokens", NEW_TOKENS)
    (expected,) = greedy_ids(folder, PROMPTS[:1], NEW_TOKENS, variant)
    assert {k: out[k] for k in expected} == expected
    out = _node(node_example, "onnxruntime.mjs", folder, *PROMPTS, "--file", graph, "--max-new-tokens", NEW_TOKENS)
    got = [{k: o[k] for k in ("prompt_ids", "generated_ids")} for o in out["outputs"]]
    assert got == greedy_ids(folder, PROMPTS, NEW_TOKENS, variant)
