"""The hf runtime: transformers' GPT2LMHeadModel on the reference model's weights, as a runner."""

import numpy as np
import pytest
import torch

from gptdeploy.errors import GptDeployError
from gptdeploy.app.generation import GenerationConfig, generate
from gptdeploy.loading import load
from gptdeploy.tokenizer import BPETokenizer
from gptdeploy.app.sources import open_runner
from gptdeploy.runtimes.torch_runner import TorchRunner

transformers = pytest.importorskip("transformers")
from gptdeploy.runtimes.hf import HfRunner  # noqa: E402  (needs transformers)

IDS = np.array([[464, 2068, 7586, 21831, 18045, 625, 262, 16931]])


def test_weights_convert_back_to_the_saved_transformers_model(hf_folder):
    """The independent oracle: the folder transformers saved, loaded by transformers itself."""
    oracle = transformers.GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    runner = HfRunner.from_gpt(load(hf_folder).model)
    ours = runner.model.state_dict()
    for name, tensor in oracle.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    with torch.no_grad():
        expected = oracle(torch.from_numpy(IDS)).logits.numpy()
    logits, _ = runner.step(IDS, np.ones_like(IDS), np.arange(IDS.shape[1])[None], runner.new_cache(1))
    assert np.array_equal(logits, expected)


def test_steps_match_the_torch_runner_and_old_caches_stay_valid(hf_folder):
    loaded = load(hf_folder)
    hf, reference = HfRunner.from_gpt(loaded.model), TorchRunner(loaded.model)
    mask, positions = np.ones((1, 5), dtype=np.int64), np.arange(5)[None]
    hf_logits, hf_cache = hf.step(IDS[:, :5], mask, positions, hf.new_cache(1), last_only=True)
    ref_logits, ref_cache = reference.step(IDS[:, :5], mask, positions, reference.new_cache(1), last_only=True)
    assert hf_logits.shape == (1, 1, 50257) and np.abs(hf_logits - ref_logits).max() <= 1e-4
    step = (IDS[:, 5:6], np.ones((1, 6), dtype=np.int64), np.array([[5]]))
    first, advanced = hf.step(*step, hf_cache)
    again, _ = hf.step(*step, hf_cache)  # transformers advanced hf_cache's storage in place: reused, it must not show
    expected, ref_advanced = reference.step(*step, ref_cache)
    assert hf.cache_length(hf_cache) == 5 and hf.cache_length(advanced) == 6
    assert np.array_equal(first, again) and np.abs(first - expected).max() <= 1e-4
    for (k, v), (rk, rv) in zip(hf.cache_to_numpy(advanced), reference.cache_to_numpy(ref_advanced)):
        assert k.shape == rk.shape == (1, 4, 6, 16)
        assert np.abs(k - rk).max() <= 1e-5 and np.abs(v - rv).max() <= 1e-5
    assert hf.cache_to_numpy(hf_cache)[0][0].shape == (1, 4, 5, 16)


def test_greedy_generation_matches_torch_on_a_ragged_batch(lively):
    prompts = ["Hello world", "The", "A longer prompt, so that the batch is ragged"]
    config = GenerationConfig(max_new_tokens=24, greedy=True)
    tok = BPETokenizer()
    expected = generate(TorchRunner(lively.model), tok, prompts, config).new_ids
    assert generate(HfRunner.from_gpt(lively.model), tok, prompts, config).new_ids == expected


def test_open_runner_and_its_errors(tmp_path):
    runner, tokenizer = open_runner("hf", "tiny", weights="random")
    assert runner.name == "hf" and runner.precision == "fp32" and tokenizer.eot_id == 50256
    assert "GPT2LMHeadModel" in runner.describe()
    from tests.conftest import write_nanogpt_checkpoint

    path, _ = write_nanogpt_checkpoint(tmp_path / "nobias", bias=False)
    with pytest.raises(GptDeployError, match="bias=False"):
        open_runner("hf", path)
