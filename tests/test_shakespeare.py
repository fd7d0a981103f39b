"""The packaged `shakespeare` preset: it loads offline from the package, it still knows its play
(its loss on held-out text stays at the model card's figure), and torch and ONNX Runtime generate the
same tokens from it."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import gptdeploy
from gptdeploy.app.generation import GenerationConfig, generate
from gptdeploy.presets import PRESETS
from gptdeploy.tokenizer import BPETokenizer
from gptdeploy.runtimes.ort import OrtRunner
from gptdeploy.runtimes.torch_runner import TorchRunner
from tests.test_cli import gptdeploy as run_cli

# The first 3,975 characters of the validation split (the last 10% of tinyshakespeare), cut at a line end.
VAL_SLICE = Path(__file__).parent / "data" / "shakespeare_val_slice.txt"
# Measured on the shipped weights when they were made (the README's model card, "Validation loss").
CARD_SLICE_LOSS = 4.557
UNIGRAM_VAL_LOSS = 6.5194  # token frequencies of the train split, add-one smoothed, on the validation split
PARAMETERS = 7_655_552
GREEDY = GenerationConfig(max_new_tokens=48, greedy=True)
PROMPTS = ["ROMEO:", "First Citizen:\nWe are", "KING RICHARD III:\nNow is the winter"]


def windowed_loss(logits_of, ids: list[int], block_size: int) -> float:
    """Mean next-token loss (nats) over consecutive windows of block_size tokens.

    logits_of(window) gives float32 logits [len(window), vocab] for a list of ids.
    """
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, block_size):
        window = ids[start : start + block_size + 1]
        logits = torch.as_tensor(logits_of(window[:-1]), dtype=torch.float32)
        targets = torch.tensor(window[1:])
        total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += len(targets)
    return total / count


def torch_logits(model):
    @torch.no_grad()
    def logits_of(window):
        return model(torch.tensor([window])).logits[0]

    return logits_of


def runner_logits(runner):
    def logits_of(window):
        ids = np.array([window], dtype=np.int64)
        positions = np.arange(len(window), dtype=np.int64)[None]
        return runner.step(ids, np.ones_like(ids), positions, runner.new_cache(1)).logits[0]

    return logits_of


@pytest.fixture(scope="module")
def val_ids():
    return BPETokenizer().encode(VAL_SLICE.read_text(encoding="utf-8"), allow_special=False)


@pytest.fixture(scope="module")
def shakespeare_export(shakespeare_export_path):
    return shakespeare_export_path


def test_loads_from_the_package(shakespeare):
    path = shakespeare.files[0]
    assert path.parent == Path(gptdeploy.__file__).parent / "data" and path.name == "shakespeare.safetensors"
    assert "packaged" in shakespeare.origin
    assert shakespeare.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    assert shakespeare.config == PRESETS["shakespeare"].config and shakespeare.model.num_params() == PARAMETERS
    assert path.stat().st_size <= 16_000_000
    # tied: the output layer is the token embedding, restored from the one stored copy
    assert shakespeare.model.lm_head.weight is shakespeare.model.transformer.wte.weight


def test_info_works_offline_with_an_empty_hub_cache(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = run_cli("info", "shakespeare", env=env)
    assert result.returncode == 0, result.stderr
    assert f"{PARAMETERS:,}" in result.stdout and "packaged" in result.stdout


def test_random_weights_keep_the_architecture(shakespeare):
    random = gptdeploy.load("shakespeare", weights="random", seed=3)
    assert random.config == shakespeare.config and "random" in random.origin
    assert random.fingerprint != shakespeare.fingerprint


def test_validation_loss_stays_at_the_card_figure(shakespeare, val_ids):
    loss = windowed_loss(torch_logits(shakespeare.model), val_ids, shakespeare.config.block_size)
    print(f"loss on the validation slice: {loss:.4f} nats/token")
    assert loss <= CARD_SLICE_LOSS + 0.01
    assert loss < UNIGRAM_VAL_LOSS - 1.0  # clearly better than counting tokens


def test_export_keeps_the_validation_loss(shakespeare, shakespeare_export, val_ids):
    block_size = shakespeare.config.block_size
    reference = windowed_loss(torch_logits(shakespeare.model), val_ids, block_size)
    exported = windowed_loss(runner_logits(OrtRunner(shakespeare_export)), val_ids, block_size)
    print(f"loss on the validation slice: torch {reference:.5f}, ONNX Runtime {exported:.5f}")
    assert abs(exported - reference) <= 1e-4


@pytest.mark.heavy  # generates on two runtimes (some 3 CPU-s); by default test_runtimes.py compares them on tiny
def test_torch_and_ort_generate_the_same_tokens(shakespeare, shakespeare_export):
    tokenizer, reference, runner = shakespeare.tokenizer, TorchRunner(shakespeare.model), OrtRunner(shakespeare_export)
    for prompt in PROMPTS:
        assert generate(runner, tokenizer, [prompt], GREEDY).new_ids == generate(reference, tokenizer, [prompt], GREEDY).new_ids
    batch = generate(runner, tokenizer, PROMPTS, GREEDY)
    assert batch.new_ids == generate(reference, tokenizer, PROMPTS, GREEDY).new_ids
    text = batch.texts(tokenizer)[0]
    print(f"ROMEO:{text}")
    assert "\n" in text and len(set(batch.new_ids[0])) > 10  # lines of many words, not one token repeated


@pytest.mark.heavy  # trains for a few steps: some 9 CPU-seconds
def test_training_script_writes_what_load_reads(tmp_path):
    """A two-step run of scripts/train_shakespeare.py; its safetensors file loads with its metadata."""
    import json
    import subprocess
    import sys

    from safetensors import safe_open

    data = tmp_path / "input.txt"
    data.write_text(VAL_SLICE.read_text(encoding="utf-8") * 4, encoding="utf-8")  # a validation part > block_size
    out = tmp_path / "weights" / "model.safetensors"
    script = Path(__file__).parents[1] / "scripts" / "train_shakespeare.py"
    result = subprocess.run(
        [sys.executable, str(script), str(data), "--out", str(out), "--max-iters", "2", "--batch-size", "2",
         "--eval-interval", "1", "--eval-batches", "1", "--warmup-iters", "1"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["data"]["train_chars"] == int(len(data.read_text(encoding="utf-8")) * 0.9)
    assert record["val_loss"] < 10.83 + 0.1 and [p["iter"] for p in record["curve"]] == [0, 1, 2]
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.safetensors"]  # no temporary file left

    loaded = gptdeploy.load(out)
    assert loaded.config == PRESETS["shakespeare"].config and loaded.files == [out]
    with safe_open(out, framework="pt") as f:
        assert json.loads(f.metadata()["gptdeploy.training"])["settings"]["max_iters"] == 2


def test_safetensors_without_gptdeploy_metadata_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"transformer.wte.weight": torch.zeros(4, 2)}, path)
    with pytest.raises(gptdeploy.GptDeployError, match="no gptdeploy.config metadata"):
        gptdeploy.load(path)
