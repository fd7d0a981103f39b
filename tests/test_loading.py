"""gptdeploy.load against independent oracles: transformers' GPT2LMHeadModel and nanoGPT checkpoints."""

import json
import os
import pickle

import pytest
import torch

import gptdeploy
from gptdeploy.errors import GptDeployError
from gptdeploy.tokenizer import CharTokenizer
from tests.conftest import write_nanogpt_checkpoint

def hf_forward(hf, ids, past=None):
    """One call of transformers' model with its own KV cache; the keyword was renamed in transformers 5."""
    import inspect

    cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    out = hf(ids, use_cache=True, **({cache_kw: past} if past is not None else {}))
    return out.logits, getattr(out, cache_kw)


IDS = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 198, 50256]])


@torch.no_grad()
def test_hf_folder_matches_transformers(hf_folder):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    ours = gptdeploy.load(hf_folder)
    assert ours.config.gelu == "tanh" and ours.config.block_size == 128
    expected = hf(IDS).logits
    got = ours.model(IDS).logits
    diff = (got - expected).abs().max().item()
    print(f"max abs logits diff vs transformers, no cache: {diff:.3g}")
    assert diff <= 1e-4

    # with the cache: prefill 7 tokens, then one at a time, both sides using their own cache
    hf_logits, hf_cache = hf_forward(hf, IDS[:, :7])
    our_out = ours.model(IDS[:, :7])
    worst = (hf_logits - our_out.logits).abs().max().item()
    for t in range(7, IDS.shape[1]):
        hf_logits, hf_cache = hf_forward(hf, IDS[:, t : t + 1], hf_cache)
        our_out = ours.model(IDS[:, t : t + 1], past_key_values=our_out.present)
        worst = max(worst, (hf_logits - our_out.logits).abs().max().item())
    print(f"max abs logits diff vs transformers, with cache: {worst:.3g}")
    assert worst <= 1e-4


@torch.no_grad()
def test_hf_left_padded_batch_matches_transformers(hf_folder):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    ours = gptdeploy.load(hf_folder).model
    ids = torch.tensor([[50256, 50256, 464, 2068, 7586], [464, 2068, 7586, 21831, 18045]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = hf(ids, attention_mask=mask, position_ids=pos).logits
    got = ours(ids, attention_mask=mask).logits
    assert (got - expected)[mask.bool()].abs().max().item() <= 1e-4


def test_hf_pytorch_model_bin(hf_folder, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((hf_folder / "config.json").read_text())
    torch.save(load_file(hf_folder / "model.safetensors"), folder / "pytorch_model.bin")
    a = gptdeploy.load(folder).model(IDS).logits
    b = gptdeploy.load(hf_folder).model(IDS).logits
    assert torch.equal(a, b)


@torch.no_grad()
def test_nanogpt_checkpoint_with_compile_prefix_and_padded_vocab(tmp_path):
    path, reference = write_nanogpt_checkpoint(tmp_path / "out")
    loaded = gptdeploy.load(path)
    assert loaded.config.vocab_size == 50304 and loaded.config.gelu == "exact" and loaded.config.dropout == 0.0
    assert loaded.tokenizer.vocab_size == 50257  # the model's padded ids are never decodable tokens
    assert not loaded.model.training
    reference.eval()
    assert torch.equal(loaded.model(IDS).logits, reference(IDS).logits)
    assert gptdeploy.load(tmp_path / "out").fingerprint == loaded.fingerprint  # the folder finds ckpt.pt


def test_nanogpt_checkpoint_without_compile_prefix(tmp_path):
    path, _ = write_nanogpt_checkpoint(tmp_path / "out", compiled=False, bias=False)
    assert gptdeploy.load(path).model.transformer.ln_f.bias is None


def test_nanogpt_char_level_meta(tmp_path, char_meta):
    path, _ = write_nanogpt_checkpoint(
        tmp_path / "out", vocab_size=len(char_meta["itos"]), meta=char_meta, dataset="shakespeare_char"
    )
    loaded = gptdeploy.load(path)
    assert isinstance(loaded.tokenizer, CharTokenizer)
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("ROMEO:")) == "ROMEO:"
    assert any(f.name == "meta.pkl" for f in loaded.files)


def test_random_weights_are_seeded():
    a = gptdeploy.load("tiny", weights="random", seed=1)
    b = gptdeploy.load("tiny", weights="random", seed=1)
    c = gptdeploy.load("tiny", weights="random", seed=2)
    assert torch.equal(a.model.lm_head.weight, b.model.lm_head.weight)
    assert not torch.equal(a.model.lm_head.weight, c.model.lm_head.weight)
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_dtype(hf_folder):
    assert gptdeploy.load(hf_folder, dtype="fp16").model.lm_head.weight.dtype == torch.float16


# ----- errors: one clear message each -----

def test_unknown_preset_lists_known_ones():
    with pytest.raises(GptDeployError, match="known presets: gpt2, gpt2-medium"):
        gptdeploy.load("gpt3")


def test_missing_file():
    with pytest.raises(GptDeployError, match="unknown model"):
        gptdeploy.load("/nonexistent/ckpt.pt")


def test_unknown_format(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(GptDeployError, match="unknown checkpoint format"):
        gptdeploy.load(tmp_path / "weights.npz")
    with pytest.raises(GptDeployError, match="holds no model"):
        gptdeploy.load(tmp_path)


def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(GptDeployError, match="cannot read"):
        gptdeploy.load(tmp_path / "ckpt.pt")


def test_corrupt_safetensors(hf_folder, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text((hf_folder / "config.json").read_text())
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(GptDeployError, match="cannot read"):
        gptdeploy.load(folder)


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model_args": {}, "model": {}, "x": Exploit()}, tmp_path / "ckpt.pt")
    with pytest.raises(GptDeployError, match="refusing"):
        gptdeploy.load(tmp_path / "ckpt.pt")


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
    path, _ = write_nanogpt_checkpoint(tmp_path / "out")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["_orig_mod.transformer.h.0.mlp.c_fc.weight"] = torch.zeros(100, 32)
    torch.save(ckpt, path)
    with pytest.raises(GptDeployError, match=r"transformer.h.0.mlp.c_fc.weight has shape \(100, 32\), expected \(128, 32\)"):
        gptdeploy.load(path)


def test_missing_tensor_is_named(tmp_path):
    path, _ = write_nanogpt_checkpoint(tmp_path / "out")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model"]["_orig_mod.transformer.ln_f.weight"]
    torch.save(ckpt, path)
    with pytest.raises(GptDeployError, match="missing transformer.ln_f.weight"):
        gptdeploy.load(path)


def test_not_a_nanogpt_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.pt")
    with pytest.raises(GptDeployError, match="not a nanoGPT checkpoint"):
        gptdeploy.load(tmp_path / "x.pt")


def test_unsupported_hf_config(hf_folder, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    cfg = json.loads((hf_folder / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes())
    with pytest.raises(GptDeployError, match="activation_function 'relu'"):
        gptdeploy.load(folder)


def test_random_weights_need_a_preset(hf_folder):
    with pytest.raises(GptDeployError, match="random weights need a preset"):
        gptdeploy.load(hf_folder, weights="random")


def test_offline_hub_without_cache_names_alternatives(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(GptDeployError, match="local folder or checkpoint, use random weights .*shakespeare preset"):
        gptdeploy.load("gpt2")


def test_an_unreachable_hub_fails_within_seconds(tmp_path):
    """No HF_HUB_OFFLINE, but nothing answers: say what is fetched at once, then one error line, fast."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    env.pop("HF_HUB_OFFLINE", None)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "gptdeploy", "info", "gpt2"], capture_output=True, text=True,
                            env=env)
    assert time.monotonic() - start < 15
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("Downloading config.json, model.safetensors of openai-community/gpt2")
    assert lines[-1].startswith("gptdeploy: error: cannot download gpt2") and "shakespeare" in lines[-1]


def test_preset_without_pretrained_weights():
    with pytest.raises(GptDeployError, match="no pretrained weights"):
        gptdeploy.load("tiny")
