"""One copy of the weights: the graphs of an export share one external-data file (gptdeploy.exporters.weights).

Forced on a small model (external_data=True; by default from 100 MB of weights): conftest's lively_shared.
Outside clients on such a folder: tests/test_examples.py and tests/test_example_node.py. The command line's
--external-data: tests/test_export.py (test_cli_export_replaces_with_force_optimizes_and_reports).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from gptdeploy.app import open_runner
from gptdeploy.app.generation import GenerationConfig, generate
from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import data_files, differences, read_export
from gptdeploy.exporters.onnx_export import EXTERNAL_FROM, uses_external_data
from gptdeploy.exporters.weights import ALIGN, ALIGN_FROM, INLINE_BELOW
from gptdeploy.model import GPT
from gptdeploy.presets import PRESETS
from gptdeploy.runtimes.ort import OrtRunner
from tests.test_cli import gptdeploy

SHARED = "onnx/model.onnx_data"
PROMPTS = ["Hello world", "A longer prompt, so that the batch is ragged"]


def external_refs(graph):
    """(location, offset, length) of each external initializer of a graph; and the bytes it keeps inside."""
    model = onnx.load(str(graph), load_external_data=False)
    refs, inline = [], 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            refs.append((info["location"], int(info.get("offset", 0)), int(info["length"])))
        else:
            inline += len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
    return refs, inline


def test_the_fp32_graphs_read_one_file(lively_shared, lively):
    folder, _ = lively_shared
    export = read_export(folder)
    graphs = export.manifest["graphs"]
    fused = export.variants["fp32-fused"]
    for entry in (graphs["with_past"], graphs["no_past"], fused):
        assert data_files(entry) == [SHARED]
        refs, inline = external_refs(folder / entry["file"])
        assert {location for location, _, _ in refs} == {"model.onnx_data"} and inline < 64 * INLINE_BELOW
        assert all(offset % ALIGN == 0 for _, offset, length in refs if length >= ALIGN_FROM)
    assert data_files(export.variants["q4"]) == []  # quantized variants keep their own weights
    # The one copy: no second file of weights, and the fp32 graphs together within 5% of the weights' bytes
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == [
        "decoder_model.onnx", "model.onnx", "model.onnx_data", "model_fused.onnx", "model_q4.onnx"]
    weights = sum(p.numel() for p in lively.model.parameters()) * 4
    fp32 = sum((folder / f).stat().st_size for f in ("onnx/model.onnx", "onnx/decoder_model.onnx",
                                                      "onnx/model_fused.onnx", SHARED))
    assert fp32 <= 1.05 * weights, (fp32, weights)
    assert export.manifest["files"][SHARED] and list(export.manifest["files"]).count(SHARED) == 1
    config = json.loads((folder / "config.json").read_text())
    assert config["transformers.js_config"] == {"use_external_data_format": {"model.onnx": 1}}


def test_a_variant_added_later_leaves_the_shared_file_as_it_was(lively_shared):
    folder, before = lively_shared
    after = (folder / SHARED).stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns, after.st_nlink) == (
        before.st_ino, before.st_size, before.st_mtime_ns, 1)  # the staging's link to it is gone
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # nothing left of the staging


def test_shared_weights_compute_what_whole_graphs_compute(lively_shared, lively_export_path):
    """The same graphs, the same weights: the same logits to the bit, on the plain graph and the fused one."""
    folder, _ = lively_shared
    tok = read_export(folder).tokenizer()
    config = GenerationConfig(max_new_tokens=16, greedy=True)
    for variant in (None, "fp32-fused"):
        shared, whole = OrtRunner(folder, variant=variant), OrtRunner(lively_export_path)
        assert generate(shared, tok, PROMPTS, config).new_ids == generate(whole, tok, PROMPTS, config).new_ids
    ids = np.array([tok.encode("Hello world")])
    steps = [r.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], r.new_cache(1)).logits
             for r in (OrtRunner(folder), OrtRunner(lively_export_path), OrtRunner(folder, graph="no_past"))]
    assert np.array_equal(steps[0], steps[1]) and np.array_equal(steps[0], steps[2])


def test_a_changed_shared_file_is_caught_for_every_graph_that_reads_it(lively_shared, tmp_path):
    folder = shutil.copytree(lively_shared[0], tmp_path / "lively")
    with open(folder / SHARED, "r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 1]))
    assert [d for d in differences(read_export(folder)) if SHARED in d]
    for variant in (None, "fp32-fused"):
        with pytest.raises(GptDeployError, match="model.onnx_data"):
            open_runner("ort", str(folder), variant=variant)
    result = gptdeploy("verify", folder)
    assert result.returncode != 0 and SHARED in result.stdout + result.stderr


def test_by_size_gpt2_shares_and_shakespeare_keeps_whole_graphs():
    with torch.device("meta"):
        gpt2, shakespeare = GPT(PRESETS["gpt2"].config), GPT(PRESETS["shakespeare"].config)
    assert uses_external_data(gpt2, "fp32") and uses_external_data(gpt2, "fp16")  # 498 MB, 249 MB
    assert not uses_external_data(shakespeare, "fp32")  # 31 MB
    assert uses_external_data(shakespeare, "fp32", True) and not uses_external_data(gpt2, "fp32", False)
    assert EXTERNAL_FROM == 100_000_000


def test_manifests_of_earlier_versions_name_one_file_or_none():
    assert data_files({"external_data": None}) == [] and data_files({}) == []
    assert data_files({"external_data": "onnx/model.onnx_data"}) == ["onnx/model.onnx_data"]
    assert data_files({"external_data": ["onnx/model.onnx_data", "onnx/model_fused.onnx_data"]}) == [
        "onnx/model.onnx_data", "onnx/model_fused.onnx_data"]


@pytest.mark.heavy
def test_gpt2_medium_shares_one_copy_and_its_clients_load_it(tmp_path, greedy_ids):
    """gpt2-medium (random weights, 1.42 GB in fp32) exported by size into one shared file, with the fused
    variant: within 5% of the weights' bytes, and the Python clients match gptdeploy on both graphs."""
    from gptdeploy.app.exporting import export_model, optimize_export
    from gptdeploy.loading import load
    from tests.test_examples import NEW_TOKENS, PROMPTS as CLIENT_PROMPTS, run_example

    loaded = load("gpt2-medium", weights="random")
    folder = export_model(loaded, tmp_path / "gpt2-medium").path
    optimize_export(folder, ["fp32-fused"], reference=loaded.model)
    weights = sum(p.numel() for p in loaded.model.parameters()) * 4
    del loaded
    fp32 = sum((folder / f).stat().st_size for f in ("onnx/model.onnx", "onnx/decoder_model.onnx",
                                                      "onnx/model_fused.onnx", SHARED))
    assert fp32 <= 1.05 * weights, (fp32, weights)
    for variant, graph in ((None, "onnx/model.onnx"), ("fp32-fused", "onnx/model_fused.onnx")):
        expected = greedy_ids(folder, CLIENT_PROMPTS, NEW_TOKENS, variant)
        out = run_example("python_onnxruntime.py", folder, *CLIENT_PROMPTS, "--file", graph, "--max-new-tokens",
                          NEW_TOKENS, "--json")
        assert out["outputs"] == expected
        out = run_example("genai.py", folder, *CLIENT_PROMPTS, "--max-new-tokens", NEW_TOKENS, "--json",
                          *(["--variant", variant] if variant else []))
        assert out["outputs"] == [row for p in CLIENT_PROMPTS for row in greedy_ids(folder, [p], NEW_TOKENS, variant)]
