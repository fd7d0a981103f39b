"""ONNX export: the folder, its IO contract, its numbers against independent references, and its failure modes.

Exports are shared per session (a tiny export takes seconds); tests that change an export work on a copy.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import gptdeploy
from gptdeploy.app import validation
from gptdeploy.app.cli import default_out_dir
from gptdeploy.app.exporting import export_model
from gptdeploy.compare import TOLERANCES
from gptdeploy.errors import GptDeployError
from gptdeploy.exporters import onnx_export
from gptdeploy.export_folder import NO_PAST, WITH_PAST, graph_file, read_export
from gptdeploy.loading import config_from_hf
from tests.test_cli import assert_one_line_error, gptdeploy as run_cli

PLAIN_SCRIPT = Path(__file__).with_name("plain_ort_decode.py")
DECODE_STEPS = 3


def left_padded_prompts(vocab: int, lengths=(7, 4), seed=5):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), max(lengths)), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, ids.shape[1] - n:] = 1
        ids[row, : ids.shape[1] - n] = 0  # what sits under the padding must not matter
    return ids, mask


def run_plain_script(folder: Path, ids, mask, tmp_path, steps=DECODE_STEPS) -> dict:
    """The plain onnxruntime script, from another working directory, with an environment without gptdeploy on the path."""
    np.savez(tmp_path / "prompts.npz", input_ids=ids.numpy(), attention_mask=mask.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-I", str(PLAIN_SCRIPT), str(folder), str(tmp_path / "prompts.npz"), str(steps),
         str(tmp_path / "out.npz")],
        capture_output=True, text=True, cwd="/", env=env,
    )
    assert result.returncode == 0, result.stderr
    return dict(np.load(tmp_path / "out.npz"))


def reference_steps(forward, ids, mask, chosen) -> list[np.ndarray]:
    """Logits of the prefill and of each decode step, fed the tokens the script chose.

    forward(ids, mask, positions, past) -> (logits, past): a reference model's step.
    """
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, past = forward(ids, mask, positions, None)
    steps = [logits]
    for step in range(chosen.shape[1]):
        next_ids = chosen[:, step : step + 1]
        mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        positions = positions[:, -1:] + 1
        logits, past = forward(next_ids, mask, positions, past)
        steps.append(logits)
    return steps


# --- the folder -----------------------------------------------------------------------------------

def test_folder_layout_and_manifest(tiny_export, tiny):
    folder = tiny_export.path
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["config.json", "genai_config.json", "generation_config.json", "gpt2.tiktoken", "gptdeploy.json",
                     "onnx/decoder_model.onnx", "onnx/model.onnx", "tokenizer.json", "tokenizer_config.json"]
    genai = json.loads((folder / "genai_config.json").read_text())["model"]
    assert genai["type"] == "decoder" and genai["decoder"]["filename"] == "onnx/model.onnx"
    assert (genai["context_length"], genai["vocab_size"], genai["eos_token_id"]) == (128, 50257, 50256)
    assert (genai["decoder"]["num_hidden_layers"], genai["decoder"]["head_size"]) == (2, 16)
    manifest = json.loads((folder / "gptdeploy.json").read_text())
    assert manifest == tiny_export.manifest
    assert manifest["format"] == "gptdeploy-export" and manifest["format_version"] == 1
    assert manifest["source"] == {"source": "tiny", "origin": tiny.origin, "sha256": tiny.fingerprint, "random_seed": 0}
    assert manifest["config"] == tiny.config.to_dict()
    assert manifest["precision"] == "fp32" and manifest["opset"] == 18
    assert set(manifest["versions"]) == {"gptdeploy", "torch", "onnx", "onnxscript", "onnxruntime"}
    assert manifest["tokenizer"] == {"type": "gpt2-bpe", "file": "gpt2.tiktoken", "vocab_size": 50257, "eot_id": 50256}
    assert manifest["graphs"][WITH_PAST]["file"] == "onnx/model.onnx"
    assert manifest["graphs"][NO_PAST]["file"] == "onnx/decoder_model.onnx"
    assert manifest["graphs"][WITH_PAST]["external_data"] is None
    assert set(manifest["files"]) == set(files) - {"gptdeploy.json"}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert manifest["validation"]["passed"] is True
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_reader_reads_the_folder(tiny_export):
    export = read_export(tiny_export.path)
    assert export.precision == "fp32" and export.config["n_layer"] == 2
    assert export.graph_path(WITH_PAST) == tiny_export.path / "onnx/model.onnx"
    assert export.tokenizer().encode("Hello world") == [15496, 995]


def test_config_json_is_gpt2_config(tiny_export, tiny):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2Config.from_pretrained(tiny_export.path)
    assert (hf.model_type, hf.n_layer, hf.n_head, hf.n_embd, hf.n_positions, hf.vocab_size) == ("gpt2", 2, 4, 64, 128, 50257)
    assert hf.bos_token_id == hf.eos_token_id == 50256
    assert config_from_hf(json.loads((tiny_export.path / "config.json").read_text())) == tiny.config
    generation = transformers.GenerationConfig.from_pretrained(tiny_export.path)
    assert generation.eos_token_id == 50256


TOKENIZER_TEXTS = [
    "Hello world",
    "It's a test: they'll've done it, we're 12345678 times 3.14 <|endoftext|> and again<|endoftext|>",
    "  leading spaces\n\n\ttabs   and trailing   \r\n",
    "naïve café, Straße,東京タワー, Привет, مرحبا, 🤗🚀 emoji, \u00a0nbsp and \u200b zero width",
    "def f(x):\n    return x**2  # code\n",
]


def test_hf_tokenizer_json_matches_tiktoken(tiny_export):
    """tokenizer.json (for transformers and transformers.js) gives tiktoken's ids and decodes back."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    hf = tokenizers.Tokenizer.from_file(str(tiny_export.path / "tokenizer.json"))
    bpe = read_export(tiny_export.path).tokenizer()
    texts = TOKENIZER_TEXTS + [Path(__file__).resolve().parents[1].joinpath("README.md").read_text()]  # prose, code, tables
    gen = np.random.default_rng(0)  # random bytes, decoded leniently: odd code points and broken sequences
    texts += [bytes(gen.integers(0, 256, 300, dtype=np.uint8)).decode("utf-8", errors="replace") for _ in range(5)]
    for text in texts:
        ids = bpe.encode(text)
        assert hf.encode(text).ids == ids, text[:60]
        assert hf.decode(ids, skip_special_tokens=False) == text
    auto = transformers.AutoTokenizer.from_pretrained(tiny_export.path)
    assert auto("Hello world<|endoftext|>")["input_ids"] == [15496, 995, 50256]
    assert auto.eos_token_id == 50256 and auto.model_max_length == 128


def io_of(path: Path) -> dict:
    model = onnx.load(path, load_external_data=False)

    def describe(v):
        t = v.type.tensor_type
        return onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, [d.dim_param or d.dim_value for d in t.shape.dim]

    return {"inputs": {v.name: describe(v) for v in model.graph.input},
            "outputs": {v.name: describe(v) for v in model.graph.output}}


@pytest.mark.parametrize("precision, cache", [("fp32", "float32"), ("fp16", "float16")])
def test_io_contract(request, precision, cache):
    folder = request.getfixturevalue("tiny_export" if precision == "fp32" else "tiny_export_fp16").path
    with_past = io_of(folder / graph_file(WITH_PAST, precision))
    past, total = "past_sequence_length", "past_sequence_length + sequence_length"
    kv = lambda length: (cache, ["batch_size", 4, length, 16])  # noqa: E731
    assert list(with_past["inputs"]) == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                                         "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert with_past["inputs"]["input_ids"] == ("int64", ["batch_size", "sequence_length"])
    assert with_past["inputs"]["attention_mask"] == ("int64", ["batch_size", total])
    assert with_past["inputs"]["position_ids"] == ("int64", ["batch_size", "sequence_length"])
    assert with_past["inputs"]["past_key_values.1.value"] == kv(past)
    assert list(with_past["outputs"]) == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert with_past["outputs"]["logits"] == ("float32", ["batch_size", "sequence_length", 50257])
    assert with_past["outputs"]["present.0.key"] == kv(total)

    no_past = io_of(folder / graph_file(NO_PAST, precision))
    assert list(no_past["inputs"]) == ["input_ids", "attention_mask", "position_ids"]
    assert no_past["inputs"]["attention_mask"] == ("int64", ["batch_size", "sequence_length"])
    assert no_past["outputs"]["logits"] == ("float32", ["batch_size", "sequence_length", 50257])
    assert no_past["outputs"]["present.1.value"] == kv("sequence_length")

    manifest = json.loads((folder / "gptdeploy.json").read_text())
    for role, io in ((WITH_PAST, with_past), (NO_PAST, no_past)):
        for kind in ("inputs", "outputs"):
            listed = {t["name"]: (t["dtype"], t["shape"]) for t in manifest["graphs"][role][kind]}
            assert listed == io[kind]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_checker_and_shape_inference_pass(request, precision, tmp_path):
    folder = request.getfixturevalue("tiny_export" if precision == "fp32" else "tiny_export_fp16").path
    for role in (WITH_PAST, NO_PAST):
        path = folder / graph_file(role, precision)
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(tmp_path / "inferred.onnx"), strict_mode=True)
        inferred = onnx.load(tmp_path / "inferred.onnx")
        assert inferred.graph.value_info, "shape inference found no intermediate shapes"


# --- the numbers ----------------------------------------------------------------------------------

def test_plain_onnxruntime_reproduces_reference_step_by_step(tiny_export, tiny, tmp_path):
    ids, mask = left_padded_prompts(tiny.config.vocab_size)
    out = run_plain_script(tiny_export.path, ids, mask, tmp_path)

    def forward(step_ids, step_mask, positions, past):
        with torch.no_grad():
            o = tiny.model(step_ids, attention_mask=step_mask, position_ids=positions, past_key_values=past)
        return o.logits.numpy(), o.present

    chosen = torch.from_numpy(out["chosen"])
    assert chosen.shape == (2, DECODE_STEPS)
    for step, ref in enumerate(reference_steps(forward, ids, mask, chosen)):
        assert out[f"step{step}"].shape == ref.shape
        assert np.abs(out[f"step{step}"] - ref).max() <= 1e-4, step


def test_hf_export_matches_transformers_step_by_step(hf_export, hf_folder, tmp_path):
    """An independent oracle: transformers' GPT2LMHeadModel, with its own cache, on the same tokens."""
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    cache_arg = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
    ids, mask = left_padded_prompts(hf_model.config.vocab_size, seed=11)
    out = run_plain_script(hf_export.path, ids, mask, tmp_path)

    def forward(step_ids, step_mask, positions, past):
        with torch.no_grad():
            o = hf_model(input_ids=step_ids, attention_mask=step_mask, position_ids=positions, use_cache=True,
                         **{cache_arg: past})
        return o.logits.numpy(), o.past_key_values

    steps = reference_steps(forward, ids, mask, torch.from_numpy(out["chosen"]))
    real = [mask.bool().numpy()] + [np.ones((2, 1), bool)] * DECODE_STEPS
    for step, (ref, keep) in enumerate(zip(steps, real)):
        # transformers' padded positions differ (it masks them fully); compare the real tokens
        assert np.abs(out[f"step{step}"] - ref)[keep].max() <= 1e-4, step


def test_with_past_graph_at_past_length_zero_equals_no_past_graph(tiny_export):
    options = dict(providers=["CPUExecutionProvider"])
    with_past = ort.InferenceSession(str(tiny_export.path / "onnx/model.onnx"), **options)
    no_past = ort.InferenceSession(str(tiny_export.path / "onnx/decoder_model.onnx"), **options)
    ids, mask = left_padded_prompts(50257)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).numpy()}
    empty = np.zeros((2, 4, 0, 16), np.float32)
    a = with_past.run(None, {**feed, **{i.name: empty for i in with_past.get_inputs()[3:]}})
    b = no_past.run(None, feed)
    assert a[1].shape == (2, 4, 7, 16)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_left_padded_row_equals_the_prompt_alone(tiny_export):
    """Padding changes nothing for the real tokens: the padded row's logits are those of the prompt run alone."""
    session = ort.InferenceSession(str(tiny_export.path / "onnx/decoder_model.onnx"), providers=["CPUExecutionProvider"])
    ids, mask = left_padded_prompts(50257, lengths=(7, 4))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                     "position_ids": positions.numpy()})[0]
    alone_ids = ids[1:, 3:]
    alone = session.run(["logits"], {"input_ids": alone_ids.numpy(), "attention_mask": np.ones((1, 4), np.int64),
                                     "position_ids": np.arange(4)[None]})[0]
    np.testing.assert_allclose(batch[1, 3:], alone[0], atol=1e-5)


def test_fp32_validation_figures(tiny_export):
    """Both graphs checked with the comparator's fp32 tolerances (max |diff| 1e-4), export-time profile."""
    v = tiny_export.manifest["validation"]
    assert v["passed"] and v["profile"] == "export" and v["reference"] == "the PyTorch model (fp32)"
    assert list(v["graphs"]) == ["onnx/model.onnx", "onnx/decoder_model.onnx"]
    with_past, no_past = v["graphs"].values()
    assert with_past["positions"] == 9 + 5 + 2 * 3  # two prompts, then three decode steps of two rows
    assert no_past["positions"] == 9 + 3 + 5 + 3  # each whole sequence at once
    for graph in (with_past, no_past):
        assert graph["checks"]["max_abs"]["tolerance"] == 1e-4 and graph["checks"]["kv_max_abs"]["tolerance"] == 1e-4
        assert set(graph["checks"]) == {"max_abs", "mean_abs", "max_rel", "cosine", "flip_lead", "kv_max_abs",
                                        "nonfinite"}
    assert 0 < v["max_abs_diff"] <= 1e-4 and v["top1_agreement"] == 1.0


def test_fp16_export_is_finite_close_and_agrees_on_top1(tiny_export_fp16, tiny, tmp_path):
    manifest = tiny_export_fp16.manifest
    assert manifest["precision"] == "fp16"
    assert sorted(manifest["files"]) == ["config.json", "genai_config.json", "generation_config.json",
                                         "gpt2.tiktoken", "onnx/decoder_model_fp16.onnx", "onnx/model_fp16.onnx",
                                         "tokenizer.json", "tokenizer_config.json"]
    genai = json.loads((tiny_export_fp16.path / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["filename"] == "onnx/model_fp16.onnx"
    assert json.loads((tiny_export_fp16.path / "config.json").read_text())["torch_dtype"] == "float16"
    v = manifest["validation"]
    assert v["passed"] and v["max_rel_diff"] <= TOLERANCES["fp16"]["max_rel"]
    assert all(g["metrics"]["flip_lead"] <= TOLERANCES["fp16"]["flip_lead"] for g in v["graphs"].values())
    assert v["fp16_ranges"]["layernorm_sum_of_squares"]["max"] > 0

    # independently of the export's own validation: the plain script against the fp32 reference
    ids, mask = left_padded_prompts(tiny.config.vocab_size)
    out = run_plain_script(tiny_export_fp16.path, ids, mask, tmp_path)

    def forward(step_ids, step_mask, positions, past):
        with torch.no_grad():
            o = tiny.model(step_ids, attention_mask=step_mask, position_ids=positions, past_key_values=past)
        return o.logits.numpy(), o.present

    for step, ref in enumerate(reference_steps(forward, ids, mask, torch.from_numpy(out["chosen"]))):
        got = out[f"step{step}"]
        assert got.dtype == np.float32 and np.isfinite(got).all()
        row_error = np.abs(got - ref).max(-1) / np.abs(ref).max(-1)  # the comparator's max_rel, per position
        assert row_error.max() <= TOLERANCES["fp16"]["max_rel"]
        assert np.abs(got - ref).max() > 1e-6, "an fp16 graph that matches fp32 exactly computes in fp32"


def test_fp16_graph_keeps_layernorm_in_fp32(tiny_export_fp16):
    model = onnx.shape_inference.infer_shapes(onnx.load(tiny_export_fp16.path / "onnx/model_fp16.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 2 * 2 + 1  # ln_1, ln_2 per block, ln_f
    for node in norms:
        assert {types[name] for name in node.input if name} == {onnx.TensorProto.FLOAT}, node.name
    matmul_weights = [t for t in model.graph.initializer if len(t.dims) == 2]
    assert matmul_weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in matmul_weights)


# --- failures leave nothing behind ---------------------------------------------------------------

@pytest.mark.heavy  # a whole export that then fails (some 7 CPU-s); by default test_optimize.py fails a variant's validation
def test_failed_validation_leaves_no_folder(tiny, tmp_path, monkeypatch):
    # fp32 ONNX Runtime never matches torch bit for bit
    monkeypatch.setitem(TOLERANCES, "fp32", {**TOLERANCES["fp32"], "max_abs": 0.0})
    with pytest.raises(GptDeployError, match="failed validation.*max_abs .* > 0 .*passes with --tol max_abs="):
        export_model(tiny, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_validation_catches_a_wrong_graph(tiny_export, tiny, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_export.path, folder)
    path = folder / "onnx/model.onnx"
    model = onnx.load(path)
    bias = next(t for t in model.graph.initializer if t.name.endswith("h.0.attn.c_attn.bias"))
    bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + 0.01, bias.name))
    onnx.save(model, path)
    report = validation.validate_export(read_export(folder), tiny.model, tiny.tokenizer)
    assert not report.passed
    failures = report.failures()
    assert failures.startswith("onnx/model.onnx: max_abs") and "at every step" in failures
    assert "decoder_model" not in failures


@pytest.mark.heavy  # a traced export in a fresh interpreter; by default test_reliability.py interrupts one (SIGKILL)
def test_interrupted_export_leaves_no_folder(tmp_path):
    """Ctrl-C half-way (the first graph written, the second being traced): exit 130, nothing left."""
    process = subprocess.Popen([sys.executable, "-m", "gptdeploy", "export", "tiny", "--random", "--out",
                                str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.*.partial/onnx/model.onnx")):
        assert process.poll() is None and time.monotonic() < deadline, "the export ended before it could be interrupted"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert list(tmp_path.iterdir()) == []


def test_an_export_is_kept_without_force(tiny, tiny_export, tmp_path):
    out = tmp_path / "tiny-onnx"
    shutil.copytree(tiny_export.path, out)
    with pytest.raises(GptDeployError, match="already exists; pass --force"):
        export_model(tiny, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-onnx"]
    assert read_export(out).manifest == tiny_export.manifest  # replacing it: the CLI --force test below


def test_force_does_not_replace_a_folder_that_is_no_export(tiny, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(GptDeployError, match="not an export folder"):
        export_model(tiny, tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# --- other sources, opsets, external data ----------------------------------------------------------

@pytest.mark.heavy  # an opset-20 export of its own (some 8 CPU-s); external data by default: the lively_shared fixture
def test_char_level_checkpoint_with_external_data_and_opset_20(tmp_path, char_meta, monkeypatch):
    """A nanoGPT char-level checkpoint: meta.pkl travels; external data (forced small) loads from any directory."""
    from tests.conftest import write_nanogpt_checkpoint

    vocab = len(char_meta["itos"])
    ckpt, _ = write_nanogpt_checkpoint(tmp_path / "shakespeare", vocab_size=vocab, meta=char_meta)
    loaded = gptdeploy.load(ckpt)
    result = export_model(loaded, tmp_path / "char-onnx", opset=20, external_data=True)
    folder = result.path
    manifest = result.manifest
    assert manifest["opset"] == 20 and onnx.load(folder / "onnx/model.onnx", load_external_data=False).opset_import[0].version == 20
    assert manifest["tokenizer"] == {"type": "char", "file": "meta.pkl", "vocab_size": vocab, "eot_id": None}
    assert (folder / "meta.pkl").read_bytes() == (tmp_path / "shakespeare/data/openwebtext/meta.pkl").read_bytes()
    assert read_export(folder).tokenizer().encode("To be") == [char_meta["stoi"][c] for c in "To be"]
    hf = json.loads((folder / "config.json").read_text())
    assert hf["activation_function"] == "gelu" and hf["eos_token_id"] is None and hf["vocab_size"] == vocab
    assert manifest["graphs"][WITH_PAST]["external_data"] == ["onnx/model.onnx_data"]
    assert manifest["graphs"][NO_PAST]["external_data"] == ["onnx/model.onnx_data"]  # one copy, shared
    graph = onnx.load(folder / "onnx/model.onnx", load_external_data=False)
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert any(t.name.endswith("lm_head.weight") for t in external)
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"model.onnx_data"}
    assert "onnx/model.onnx_data" in manifest["files"]

    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(folder, moved)  # references to the data are relative: the folder can move
    ids, mask = left_padded_prompts(vocab)
    out = run_plain_script(moved, ids, mask, tmp_path)

    def forward(step_ids, step_mask, positions, past):
        with torch.no_grad():
            o = loaded.model(step_ids, attention_mask=step_mask, position_ids=positions, past_key_values=past)
        return o.logits.numpy(), o.present

    for step, ref in enumerate(reference_steps(forward, ids, mask, torch.from_numpy(out["chosen"]))):
        assert np.abs(out[f"step{step}"] - ref).max() <= 1e-4


@pytest.mark.parametrize("opset", [11, 17, 99])
def test_unwritable_opsets_are_refused(opset):
    with pytest.raises(GptDeployError, match=f"opset {opset} cannot be written"):
        onnx_export.check_opset(opset)


def test_default_out_dir(tmp_path):
    assert default_out_dir("gpt2", "fp32") == Path("gpt2-onnx")
    assert default_out_dir("gpt2", "fp16") == Path("gpt2-onnx-fp16")
    assert default_out_dir("gpt2", "fp32", random=True) == Path("gpt2-random-onnx")
    (tmp_path / "shakespeare-char").mkdir()
    (tmp_path / "shakespeare-char" / "ckpt.pt").write_bytes(b"")
    assert default_out_dir(str(tmp_path / "shakespeare-char" / "ckpt.pt"), "fp32") == Path("shakespeare-char-onnx")
    assert default_out_dir(str(tmp_path / "shakespeare-char"), "fp32") == Path("shakespeare-char-onnx")


# --- the command line ------------------------------------------------------------------------------

def test_cli_export_replaces_with_force_optimizes_and_reports(tiny_export, tmp_path):
    """--force replaces the export; --optimize adds the variant; --external-data puts a small model's
    weights in the shared file all the same, and info names it."""
    out = tmp_path / "tiny-onnx"
    shutil.copytree(tiny_export.path, out)
    result = run_cli("export", "tiny", "--random", "--out", str(out), "--force", "--optimize", "--variants", "int8",
                     "--external-data")
    assert result.returncode == 0, result.stderr
    assert (out / "onnx/model.onnx_data").is_file() and "onnx/model.onnx_data" in result.stdout
    assert os.path.getsize(out / "onnx" / "model.onnx") < 1_000_000
    info = run_cli("info", str(out))
    assert "weights in onnx/model.onnx_data" in " ".join(info.stdout.split())
    assert read_export(out).manifest["created"] >= tiny_export.manifest["created"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-onnx"], "the replaced export or a temporary left"
    assert list(read_export(out).variants) == ["int8"] and "int8: wrote onnx/model_int8.onnx" in result.stdout
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"Wrote {out}/ (") and "onnx/model.onnx" in lines[0] and "MB)" in lines[0]
    assert "max |logits diff|" in lines[1] and "top-1 agreement 100.0%" in lines[1] and "checks passed" in lines[1]
    assert "Tracing onnx/model.onnx" in result.stderr and "Validating" in result.stderr
    assert read_export(out).manifest["source"]["source"] == "tiny"


def test_cli_default_out_dir_is_named_after_the_source(tmp_path):
    """With --random the name says so: random weights must not pass for trained ones."""
    (tmp_path / "tiny-random-onnx").mkdir()
    (tmp_path / "tiny-random-onnx" / "x").write_text("")
    assert_one_line_error(run_cli("export", "tiny", "--random", cwd=tmp_path), "tiny-random-onnx already exists")


def unwritable_folder(tmp_path) -> Path:
    if os.geteuid() == 0:  # root writes through permissions; /proc refuses everyone
        return Path("/proc/gptdeploy-test/out")
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o500)
    return folder / "out"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["export", "gpt5"], "unknown model 'gpt5'"),
        (["export", "tiny", "--random", "--opset", "99"], "opset 99 cannot be written"),
        (["export", "tiny", "--random", "--precision", "int8"], "unknown precision 'int8'"),
    ],
)
def test_cli_bad_input_is_one_line(args, fragment, tmp_path):
    assert_one_line_error(run_cli(*args, "--out", str(tmp_path / "out")), fragment)
    assert not (tmp_path / "out").exists()


def test_cli_existing_and_unwritable_folders_are_one_line(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("")
    assert_one_line_error(run_cli("export", "tiny", "--random", "--out", str(tmp_path / "taken")),
                          "already exists; pass --force")
    assert_one_line_error(run_cli("export", "tiny", "--random", "--out", str(tmp_path / "taken"), "--force"),
                          "not an export folder")
    assert_one_line_error(run_cli("export", "tiny", "--random", "--out", str(unwritable_folder(tmp_path))),
                          "cannot write the export folder")


# --- gpt2 size ---------------------------------------------------------------------------------------

@pytest.mark.heavy
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpt2_export(precision, tmp_path):
    out = tmp_path / "gpt2-onnx"
    result = run_cli("export", "gpt2", "--random", "--precision", precision, "--out", str(out))
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    manifest = read_export(out).manifest
    v = manifest["validation"]
    assert v["passed"]
    if precision == "fp32":
        assert v["max_abs_diff"] <= 1e-4
    print(json.dumps({"precision": precision, "max_abs_diff": v["max_abs_diff"], "max_rel_diff": v["max_rel_diff"],
                      "top1_agreement": v["top1_agreement"], "graphs": v["graphs"],
                      "files": {f: (out / f).stat().st_size for f in manifest["files"]},
                      "fp16_ranges": v.get("fp16_ranges")}, indent=1))
