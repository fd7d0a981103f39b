"""Invariants of the reference model."""

import pytest
import torch
from torch.nn import functional as F

from gptdeploy.model import GPT, GPTConfig
from gptdeploy.presets import PRESETS


def make_model(seed=0, **overrides):
    cfg = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=101)
    cfg.update(overrides)
    model = GPT(GPTConfig(**cfg))
    model.init_weights(seed)
    with torch.no_grad():  # non-trivial biases and gains
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    return model.eval()


@pytest.mark.heavy  # gpt2-size: 124M random parameters
def test_gpt2_parameter_count():
    assert GPT(PRESETS["gpt2"].config).num_params() == 124_439_808


def test_nanogpt_parameter_names():
    names = set(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=10)).state_dict())
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
            "transformer.h.0.attn.c_proj.bias", "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.ln_1.weight",
            "transformer.ln_f.bias", "lm_head.weight"} <= names


def test_lm_head_is_tied():
    model = make_model()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


@torch.no_grad()
@pytest.mark.parametrize("gelu", ["tanh", "exact"])
def test_cached_decoding_matches_full_forward(gelu):
    model = make_model(gelu=gelu)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    out = model(ids[:, :5])
    steps = [out.logits]
    past = out.present
    for t in range(5, 12):
        out = model(ids[:, t : t + 1], past_key_values=past)
        steps.append(out.logits)
        past = out.present
    cached = torch.cat(steps, dim=1)
    assert cached.shape == full.shape == (2, 12, 101)
    assert (cached - full).abs().max().item() <= 1e-5
    assert past[0][0].shape == (2, 4, 12, 16)


@torch.no_grad()
def test_left_padded_batch_matches_each_prompt_alone():
    model = make_model()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model(ids, attention_mask=mask)
    assert torch.isfinite(out.logits).all()  # padding rows must not become NaN
    # and two decode steps with the cache
    nxt = torch.tensor([[20], [21]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    step = model(nxt, attention_mask=mask2, past_key_values=out.present)
    for row, p in enumerate(prompts):
        alone = model(torch.tensor([p]))
        real = out.logits[row, width - len(p) :]
        assert (real - alone.logits[0]).abs().max().item() <= 1e-5
        alone_step = model(nxt[row : row + 1], past_key_values=alone.present)
        assert (step.logits[row] - alone_step.logits[0]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_explicit_position_ids_are_used():
    model = make_model()
    ids = torch.tensor([[3, 4, 5]])
    default = model(ids).logits
    shifted = model(ids, position_ids=torch.tensor([[4, 5, 6]])).logits
    assert torch.allclose(default, model(ids, position_ids=torch.tensor([[0, 1, 2]])).logits)
    assert not torch.allclose(default, shifted)


def test_loss_is_cross_entropy_of_all_positions():
    model = make_model()
    ids = torch.randint(0, 101, (2, 8))
    targets = torch.randint(0, 101, (2, 8))
    out = model(ids, targets)
    expected = F.cross_entropy(out.logits.view(-1, 101), targets.view(-1))
    assert torch.allclose(out.loss, expected)


@torch.no_grad()
def test_positions_past_block_size_are_refused():
    model = make_model()
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 33, dtype=torch.long))
    past = model(torch.zeros(1, 32, dtype=torch.long)).present
    with pytest.raises(ValueError, match="block_size 32"):
        model(torch.zeros(1, 1, dtype=torch.long), past_key_values=past)


def test_token_ids_out_of_range_are_refused():
    with pytest.raises(ValueError, match="token ids"):
        make_model()(torch.tensor([[101]]))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="gelu"):
        GPTConfig(gelu="relu")
    with pytest.raises(ValueError, match="multiple"):
        GPTConfig(n_embd=10, n_head=3)
