"""Runners: torch and ONNX Runtime compute the same steps and generate the same tokens; the registry;
the ONNX Runtime path without torch; `gptdeploy generate` as a user meets it."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import read_export
from gptdeploy.app.generation import GenerationConfig, generate
from gptdeploy.loading import load
from gptdeploy.tokenizer import BPETokenizer
from gptdeploy.runtimes.ort import OrtCudaRunner, OrtRunner, SessionConfig
from gptdeploy.app.sources import open_runner
from gptdeploy.runtimes.registry import RUNTIMES, require
from gptdeploy.runtimes.torch_runner import TorchRunner
from tests.test_cli import assert_one_line_error, gptdeploy

PROMPTS = ["Hello world", "The", "A longer prompt, so that the batch is ragged: eleven tokens"]
GREEDY = GenerationConfig(max_new_tokens=32, greedy=True)


def assert_same_greedy_tokens(reference, runner, tok):
    for prompt in PROMPTS:
        assert generate(runner, tok, [prompt], GREEDY).new_ids == generate(reference, tok, [prompt], GREEDY).new_ids
    batch = generate(runner, tok, PROMPTS, GREEDY)
    assert batch.new_ids == generate(reference, tok, PROMPTS, GREEDY).new_ids
    return batch


def test_torch_and_ort_generate_the_same_tokens(lively, lively_export_path):
    batch = assert_same_greedy_tokens(TorchRunner(lively.model), OrtRunner(lively_export_path), BPETokenizer())
    assert all(len(set(ids)) > 10 for ids in batch.new_ids)  # many different tokens, not one repeated


def test_torch_and_ort_agree_on_the_tiny_preset(tiny_export_path):
    assert_same_greedy_tokens(TorchRunner(load("tiny", weights="random", seed=0).model), OrtRunner(tiny_export_path),
                              BPETokenizer())


def test_transformers_folder_on_torch_and_ort_matches_transformers_generate(hf_folder, hf_export_path):
    """The independent oracle: transformers' own greedy generate on the same saved model."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    tok, runner = BPETokenizer(), OrtRunner(hf_export_path)
    assert_same_greedy_tokens(TorchRunner(load(hf_folder).model), runner, tok)
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                              min_new_tokens=32, pad_token_id=tok.eot_id)
        assert generate(runner, tok, [prompt], GREEDY).new_ids[0] == out[0, ids.shape[1]:].tolist()


def test_sampling_with_a_seed_repeats_on_ort(lively_export_path):
    runner, tok = OrtRunner(lively_export_path), BPETokenizer()
    config = GenerationConfig(max_new_tokens=24, temperature=0.8, top_k=100, top_p=0.9, seed=11)
    first = generate(runner, tok, PROMPTS, config).new_ids
    assert generate(runner, tok, PROMPTS, config).new_ids == first
    assert generate(runner, tok, PROMPTS, GenerationConfig(max_new_tokens=24, seed=12)).new_ids != first


def assert_close(actual, expected):
    """fp32 through another runtime: equal up to rounding, relative to the tensor's scale."""
    assert np.abs(actual - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


def test_ort_steps_match_torch_logits_and_cache(lively, lively_export_path):
    """Step by step, from past length 0: logits and every KV tensor, through cache_to_numpy."""
    torch_runner, ort_runner = TorchRunner(lively.model), OrtRunner(lively_export_path)
    ids = np.array([[0, 0, 15496, 995], [464, 3290, 318, 257]])
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    caches = [torch_runner.new_cache(2), ort_runner.new_cache(2)]
    assert ort_runner.cache_length(caches[1]) == 0 and ort_runner.cache_to_numpy(caches[1])[0][0].shape == (2, 4, 0, 16)
    for step in range(3):
        (t_logits, caches[0]), (o_logits, new_ort_cache) = (
            torch_runner.step(ids, mask, positions, caches[0]), ort_runner.step(ids, mask, positions, caches[1]))
        assert o_logits.dtype == np.float32 and o_logits.shape == t_logits.shape == (2, ids.shape[1], 50257)
        assert_close(o_logits, t_logits)
        for (tk, tv), (ok, ov) in zip(torch_runner.cache_to_numpy(caches[0]), ort_runner.cache_to_numpy(new_ort_cache)):
            assert ok.shape == tk.shape == ov.shape == (2, 4, mask.shape[1], 16)
            assert_close(ok, tk)
            assert_close(ov, tv)
        old_length = ort_runner.cache_length(caches[1])
        caches[1] = new_ort_cache
        assert ort_runner.cache_length(caches[1]) == old_length + ids.shape[1]
        ids = o_logits[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        positions = mask.sum(-1, keepdims=True) - 1
    last, _ = ort_runner.step(ids, mask, positions, caches[1], last_only=True)
    full, _ = ort_runner.step(ids, mask, positions, caches[1])  # the old cache is still valid
    assert last.shape == (2, 1, 50257) and np.array_equal(last, full[:, -1:])


def test_fp16_export_runs_with_a_float16_cache(tiny, tiny_export_fp16_path):
    """fp16 graphs: past and present float16, logits float32; close to the fp32 reference."""
    runner, reference = OrtRunner(tiny_export_fp16_path), TorchRunner(tiny.model)
    assert runner.precision == "fp16"
    ids, mask, positions = np.array([[15496, 995, 11]]), np.ones((1, 3)), np.array([[0, 1, 2]])
    logits, cache = runner.step(ids, mask, positions, runner.new_cache(1))
    expected, expected_cache = reference.step(ids, mask, positions, reference.new_cache(1))
    assert logits.dtype == np.float32 and all(k.dtype == v.dtype == np.float16 for k, v in runner.cache_to_numpy(cache))
    assert np.abs(logits - expected).max() <= 2e-2 * np.abs(expected).max()
    assert logits[0, -1].argmax() == expected[0, -1].argmax()
    tok = BPETokenizer()
    result = generate(runner, tok, PROMPTS, GREEDY)  # a ragged batch through float16 past tensors
    assert [len(ids) for ids in result.new_ids] == [32, 32, 32]


def test_step_inputs_are_checked(lively_export_path):
    runner = OrtRunner(lively_export_path)
    cache = runner.new_cache(1)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        runner.step(np.array([[1, 2]]), np.ones((1, 3)), np.array([[0, 1]]), cache)
    with pytest.raises(ValueError, match="block_size 128"):
        runner.step(np.zeros((1, 129)), np.ones((1, 129)), np.arange(129)[None], cache)
    with pytest.raises(ValueError, match="token ids must be in"):
        runner.step(np.array([[50257]]), np.ones((1, 1)), np.zeros((1, 1)), cache)


def test_session_options_are_applied(lively_export_path):
    tok = BPETokenizer()
    reference = generate(OrtRunner(lively_export_path), tok, PROMPTS, GREEDY).new_ids
    plain = OrtRunner(lively_export_path, SessionConfig(intra_op_threads=1, optimization_level="disable"))
    options = plain.session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.graph_optimization_level.name == "ORT_DISABLE_ALL"
    assert generate(plain, tok, PROMPTS, GREEDY).new_ids == reference
    assert "1 threads, optimization disable" in plain.describe()
    with pytest.raises(GptDeployError, match="unknown graph optimization level 'max'"):
        OrtRunner(lively_export_path, SessionConfig(optimization_level="max"))


def _spinning_entries(runner) -> set[str | None]:
    """What ONNX Runtime's own options of each of the runner's sessions say of spinning (None: not set)."""
    found = set()
    for session in runner._sessions.values():  # runner.session is one of them
        options = session.get_session_options()
        for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
            try:
                found.add(options.get_session_config_entry(key))
            except RuntimeError:  # "does not have configuration with key": ONNX Runtime's default
                found.add(None)
    return found


def test_spinning_follows_the_environment_unless_the_config_says(lively_export_path, monkeypatch):
    """GPTDEPLOY_ORT_SPINNING reaches every session (0 or 1; unset: ONNX Runtime's default, left alone);
    SessionConfig(spinning=...) wins over it; a bad value is one clear error."""
    monkeypatch.delenv("GPTDEPLOY_ORT_SPINNING", raising=False)
    default = OrtRunner(lively_export_path)
    assert _spinning_entries(default) == {None} and "spinning" not in default.describe()
    monkeypatch.setenv("GPTDEPLOY_ORT_SPINNING", "0")
    off = OrtRunner(lively_export_path)
    assert _spinning_entries(off) == {"0"} and "optimization all, no spinning" in off.describe()
    assert _spinning_entries(OrtRunner(lively_export_path, SessionConfig(spinning=True))) == {"1"}
    tok = BPETokenizer()
    assert generate(off, tok, PROMPTS, GREEDY).new_ids == generate(default, tok, PROMPTS, GREEDY).new_ids
    monkeypatch.setenv("GPTDEPLOY_ORT_SPINNING", "1")
    assert _spinning_entries(OrtRunner(lively_export_path)) == {"1"}
    monkeypatch.setenv("GPTDEPLOY_ORT_SPINNING", "yes")
    with pytest.raises(GptDeployError, match="GPTDEPLOY_ORT_SPINNING must be 0 .* or 1 .*, not 'yes'"):
        OrtRunner(lively_export_path)


def test_a_graph_off_the_contract_is_refused(lively_export_path, tmp_path):
    import shutil

    folder = tmp_path / "renamed"
    shutil.copytree(lively_export_path, folder)
    manifest = json.loads((folder / "gptdeploy.json").read_text())
    manifest["precision"] = "fp16"  # the fp32 graph's past tensors are float, not float16
    manifest["graphs"]["with_past"]["file"] = "onnx/model.onnx"
    (folder / "gptdeploy.json").write_text(json.dumps(manifest))
    with pytest.raises(GptDeployError, match="past_key_values.0.key is tensor\\(float\\), expected tensor\\(float16\\)"):
        OrtRunner(folder)


# --- the registry ---


def test_registry_names_every_runtime():
    assert {"torch", "ort", "ort-cuda", "trt", "ort-trt"} <= set(RUNTIMES)
    assert require("torch").runs == "checkpoint" and require("ort").runs == "export folder"
    with pytest.raises(GptDeployError, match="unknown runtime 'tensorflow'; choose one of torch, ") as error:
        require("tensorflow")
    assert all(name in str(error.value) for name in RUNTIMES)


@pytest.mark.parametrize("name", ["trt", "ort-trt"])
def test_tensorrt_runtimes_are_refused_with_everything_missing(name):
    missing = RUNTIMES[name].missing()
    if not missing:
        pytest.skip(f"TensorRT and a GPU are here: {name} can run")
    with pytest.raises(GptDeployError, match=f"runtime '{name}' cannot run on this machine: ") as error:
        require(name)
    assert all(line in str(error.value) for line in missing) and "\n" not in str(error.value)


@pytest.mark.skipif(not RUNTIMES["ort-cuda"].missing(), reason="this machine can run ort-cuda")
def test_ort_cuda_without_gpu_says_how_to_install():
    with pytest.raises(GptDeployError, match=r"runtime 'ort-cuda' cannot run on this machine: .*pip install"):
        require("ort-cuda")


def test_a_runtime_is_one_module_and_one_registry_entry():
    """Each entry's factory names a Runner subclass with an `open`; nothing is imported before it is used."""
    from gptdeploy.runtimes.base import Runner

    for spec in RUNTIMES.values():
        module, _, name = spec.factory.partition(":")
        assert module.startswith("gptdeploy.runtimes.") and name
    for name in ("torch", "ort"):
        cls = RUNTIMES[name].runner_class()
        assert issubclass(cls, Runner) and cls.open.__func__ is not Runner.open.__func__


def test_open_runner_sources(lively_export_path, tmp_path):
    runner, tok = open_runner("ort", lively_export_path)
    assert isinstance(runner, OrtRunner) and tok.eot_id == 50256
    with pytest.raises(GptDeployError, match="torch runtime runs a checkpoint.*export folder.*lively-tiny"):
        open_runner("torch", lively_export_path)
    with pytest.raises(GptDeployError, match="fp32 export; it cannot run in fp16"):
        open_runner("ort", lively_export_path, precision="fp16")
    with pytest.raises(GptDeployError, match="ort runtime runs on the CPU"):
        open_runner("ort", lively_export_path, device="cuda")
    torch_runner, _ = open_runner("torch", "tiny", weights="random", precision="bf16")
    assert torch_runner.precision == "bf16" and torch_runner.cache_to_numpy(torch_runner.new_cache(1))[0][0].dtype == np.float32


def test_checkpoint_is_exported_once_into_the_cache(tmp_path, monkeypatch, tiny_export_path):
    """An entry for the same weights and precision is reused (a broken one: the next test)."""
    import shutil

    from gptdeploy.app.export_cache import ExportCache

    monkeypatch.setenv("GPTDEPLOY_CACHE", str(tmp_path / "cache"))
    cache, loaded = ExportCache(), load("tiny", weights="random")
    entry = cache.path(loaded, "fp32")
    assert entry == tmp_path / "cache" / "exports" / f"{loaded.fingerprint}-fp32"
    assert cache.path(load("tiny", weights="random", seed=1), "fp32") != entry
    assert cache.path(loaded, "fp16") != entry
    shutil.copytree(tiny_export_path, entry)  # as if exported before
    created = read_export(entry).manifest["created"]
    runner, _ = open_runner("ort", "tiny", weights="random")
    assert runner.folder.path == entry and read_export(entry).manifest["created"] == created
    tok = BPETokenizer()
    assert generate(runner, tok, PROMPTS, GREEDY).new_ids == generate(OrtRunner(tiny_export_path), tok, PROMPTS, GREEDY).new_ids


# --- without torch ---

NO_TORCH = textwrap.dedent("""
    import sys
    for blocked in ("torch", "onnx", "onnxscript", "transformers"):
        sys.modules[blocked] = None  # importing any of them now raises ImportError
    try:
        import torch
    except ImportError:
        pass
    else:
        raise SystemExit("torch is importable")
""")


def run_without_torch(code, *args):
    return subprocess.run([sys.executable, "-c", NO_TORCH + textwrap.dedent(code), *args],
                          capture_output=True, text=True)


def test_ort_runner_and_generation_need_no_torch(lively, lively_export_path):
    code = """
        import json
        from gptdeploy.export_folder import read_export
        from gptdeploy.app.generation import GenerationConfig, generate, stream
        from gptdeploy.runtimes.ort import OrtRunner
        folder = read_export(sys.argv[1])
        runner, tok = OrtRunner(folder), folder.tokenizer()
        result = generate(runner, tok, json.loads(sys.argv[2]), GenerationConfig(max_new_tokens=32, greedy=True))
        text = "".join(stream(runner, tok, "Hello", GenerationConfig(max_new_tokens=8, seed=1)))
        print(json.dumps({"ids": result.new_ids, "text": text, "torch": "torch" in sys.modules and sys.modules["torch"] is not None}))
    """
    result = run_without_torch(code, str(lively_export_path), json.dumps(PROMPTS))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["torch"] is False
    tok = BPETokenizer()
    assert out["ids"] == generate(TorchRunner(lively.model), tok, PROMPTS, GREEDY).new_ids
    assert out["text"] == generate(OrtRunner(lively_export_path), tok, ["Hello"], GenerationConfig(max_new_tokens=8, seed=1)).texts(tok)[0]


def test_generate_command_needs_no_torch_for_an_export_folder(lively_export_path):
    code = """
        from gptdeploy.app.cli import main
        sys.argv = ["gptdeploy", "generate", sys.argv[1], "--prompt", "Hello world", "--greedy", "--json",
                    "--max-new-tokens", "32"]
        main()
    """
    result = run_without_torch(code, str(lively_export_path))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["runtime"] == "ort"
    assert out["outputs"][0]["generated_ids"] == generate(OrtRunner(lively_export_path), BPETokenizer(), ["Hello world"],
                                                          GREEDY).new_ids[0]


# --- the generate command ---


def test_generate_json_on_ort_and_torch(lively_export_path, hf_folder, hf_export_path):
    args = ["--prompt", "Hello world", "--greedy", "--max-new-tokens", "32", "--json"]
    on_ort = gptdeploy("generate", str(hf_export_path), *args)
    on_torch = gptdeploy("generate", str(hf_folder), "--runtime", "torch", *args)
    assert on_ort.returncode == 0 and on_torch.returncode == 0, on_ort.stderr + on_torch.stderr
    ort_out, torch_out = json.loads(on_ort.stdout), json.loads(on_torch.stdout)
    assert ort_out["runtime"] == "ort" and torch_out["runtime"] == "torch"
    row = ort_out["outputs"][0]
    assert row["prompt_ids"] == [15496, 995] and len(row["generated_ids"]) == 32
    assert row["generated_ids"] == torch_out["outputs"][0]["generated_ids"]
    assert row["text"] == BPETokenizer().decode(row["generated_ids"]) and row["finish_reason"] == "length"
    assert set(ort_out["timings"]) == {"load_s", "prefill_s", "decode_s", "decode_tokens_per_s"}


def test_generate_streams_text_to_stdout(lively_export_path):
    result = gptdeploy("generate", str(lively_export_path), "--prompt", "Hello", "--max-new-tokens", "16", "--seed", "3")
    assert result.returncode == 0, result.stderr
    expected = generate(OrtRunner(lively_export_path), BPETokenizer(), ["Hello"],
                        GenerationConfig(max_new_tokens=16, seed=3)).texts(BPETokenizer())[0]
    assert result.stdout == "Hello" + expected + "\n"
    assert "16 tokens in" in result.stderr and "ort (CPUExecutionProvider" in result.stderr
    again = gptdeploy("generate", str(lively_export_path), "--prompt", "Hello", "--max-new-tokens", "16", "--seed", "3")
    assert again.stdout == result.stdout


def test_generate_exports_a_preset_into_the_cache(tmp_path, tiny):
    """Into a cache whose entry for these weights died half-way: exported again, then reused."""
    from gptdeploy.app.export_cache import ExportCache

    env = {**os.environ, "GPTDEPLOY_CACHE": str(tmp_path)}
    entry = ExportCache(tmp_path).path(tiny, "fp32")
    (entry / "onnx").mkdir(parents=True)  # an export that died half-way
    args = ["generate", "tiny", "--random", "--runtime", "ort", "--prompt", "Hi", "--greedy", "--json"]
    first = gptdeploy(*args, env=env)
    assert first.returncode == 0, first.stderr
    exports = list((tmp_path / "exports").iterdir())
    assert exports == [entry] and read_export(entry).manifest["source"]["sha256"] == tiny.fingerprint
    second = gptdeploy(*args, env=env)
    assert json.loads(second.stdout)["outputs"] == json.loads(first.stdout)["outputs"]
    assert list((tmp_path / "exports").iterdir()) == exports


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["tiny", "--random", "--runtime", "tensorflow"], "unknown runtime 'tensorflow'"),
        (["tiny", "--random", "--runtime", "trt"], "runtime 'trt' cannot run on this machine"),
        (["tiny", "--random", "--prompt", "Hi", "--max-new-tokens", "128"], "prompt of 1 tokens + 128 new tokens"),
        (["tiny", "--random", "--prompt-ids", "15496,50257"], "token id 50257 is out of range"),
        (["tiny", "--random", "--prompt-ids", "15496,x"], "--prompt-ids takes comma-separated integers"),
        (["tiny", "--random", "--greedy", "--top-k", "5"], "--greedy takes no --temperature"),
        (["tiny", "--random", "--prompt", "a", "--prompt-ids", "1"], "not both"),
        (["tiny", "--random", "--top-p", "2"], "top_p must be in (0, 1]"),
        (["tiny", "--random", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["tiny", "--random", "--precision", "fp8"], "unknown precision 'fp8'"),
        (["gpt5"], "unknown model 'gpt5'"),
    ],
)
def test_generate_errors_are_one_line(args, fragment):
    assert_one_line_error(gptdeploy("generate", *args), fragment)


def test_generate_errors_on_an_export_folder(lively_export_path):
    assert_one_line_error(gptdeploy("generate", str(lively_export_path), "--runtime", "torch"),
                          "the torch runtime runs a checkpoint")
    assert_one_line_error(gptdeploy("generate", str(lively_export_path), "--precision", "fp16"),
                          "it cannot run in fp16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a CUDA GPU here")
def test_torch_on_cuda_without_a_gpu_is_one_line():
    assert_one_line_error(gptdeploy("generate", "tiny", "--random", "--device", "cuda"), "sees no CUDA GPU")


@pytest.mark.skipif(not RUNTIMES["ort-cuda"].missing(), reason="this machine can run ort-cuda")
def test_generate_on_unavailable_ort_cuda_is_one_line(lively_export_path):
    assert_one_line_error(gptdeploy("generate", str(lively_export_path), "--runtime", "ort-cuda"), "pip install")


# --- CUDA ---


@pytest.mark.gpu
@pytest.mark.skipif(bool(RUNTIMES["ort-cuda"].missing()), reason=f"ort-cuda cannot run here: {'; '.join(RUNTIMES['ort-cuda'].missing())}")
def test_ort_cuda_keeps_the_cache_on_the_gpu_and_matches_ort(lively_export_path):
    runner = OrtCudaRunner(lively_export_path)
    assert runner.session.get_providers()[0] == "CUDAExecutionProvider"
    _, cache = runner.step(np.array([[15496, 995]]), np.ones((1, 2)), np.array([[0, 1]]), runner.new_cache(1))
    assert all(value.device_name().lower() == "cuda" for value in cache.values)
    assert_same_greedy_tokens(OrtRunner(lively_export_path), runner, BPETokenizer())
    from gptdeploy.environment import cuda_device_count

    assert cuda_device_count() >= 1
