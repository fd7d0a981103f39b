"""The reference GPT: nanoGPT's model, which follows GPT-2, plus what deployment needs.

Everything else in gptdeploy is measured against this file. Parameter names are nanoGPT's
(`transformer.wte`, `transformer.h.0.attn.c_attn.weight`, `lm_head.weight`, ...), so nanoGPT
state dicts load unchanged. Beyond nanoGPT, `forward` returns logits for every position and
takes a KV cache, an attention mask for left-padded batches and explicit position ids.

KV cache layout, per layer: a (key, value) pair of tensors shaped [batch, n_head, past_len, head_dim].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.nn import functional as F

from gptdeploy.config import GPTConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class GPTOutput(NamedTuple):
    logits: torch.Tensor  # [batch, seq, vocab]
    loss: torch.Tensor | None  # mean cross-entropy when targets were given
    present: KVCache  # past keys/values with this call's appended


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x, mask, past: tuple[torch.Tensor, torch.Tensor] | None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        # The mask is always explicit: is_causal=True is wrong once the query is shorter than the keys.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh" if config.gelu == "tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, mask, past):
        attn_out, present = self.attn(self.ln_1(x), mask, past)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, config.bias, config.layer_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying

    def num_params(self) -> int:
        """All parameters, the tied embedding counted once, position embeddings included."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """GPT-2's initialisation, as nanoGPT does it, from a fixed seed."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # scaled residual projections, per GPT-2
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            else:
                std = 0.02
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("weight"):  # LayerNorm gains
                p.fill_(1.0)
            else:
                p.zero_()

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> GPTOutput:
        """Logits for every position of `idx` [batch, seq].

        attention_mask: [batch, past_len + seq], 1 for real tokens, 0 for (left) padding.
        position_ids: [batch, seq]; by default counted over the real tokens of attention_mask,
            or from past_len when there is no mask.
        past_key_values: the `present` of the previous call, or None.
        """
        B, T = idx.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(B, past_len + T, dtype=torch.long, device=idx.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
        if not torch.compiler.is_compiling():  # data-dependent checks cannot be traced
            self._check_inputs(idx, attention_mask, position_ids, past_len)

        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))
        mask = attention_bias_mask(attention_mask, T)
        present = []
        for i, block in enumerate(self.transformer.h):
            x, layer_present = block(x, mask, None if past_key_values is None else past_key_values[i])
            present.append(layer_present)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return GPTOutput(logits, loss, present)

    def _check_inputs(self, idx, attention_mask, position_ids, past_len):
        T = idx.shape[1]
        if attention_mask.shape != (idx.shape[0], past_len + T):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                f"({idx.shape[0]}, {past_len + T}) = (batch, past_len + seq)"
            )
        if past_len + T > self.config.block_size or (
            position_ids.numel() and int(position_ids.max()) >= self.config.block_size
        ):
            raise ValueError(
                f"sequence of {past_len + T} positions is longer than the model's context "
                f"(block_size {self.config.block_size})"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got {int(idx.min())}..{int(idx.max())}")


def attention_bias_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Boolean [batch, 1, seq, past_len + seq] mask: True where a query may attend to a key.

    The queries are the last `seq_len` positions. A query attends to earlier real tokens and
    always to itself, so padding rows never become all-False (which would give NaN).
    """
    total = attention_mask.shape[-1]
    past_len = total - seq_len
    q_pos = torch.arange(seq_len, device=attention_mask.device).unsqueeze(1) + past_len
    k_pos = torch.arange(total, device=attention_mask.device).unsqueeze(0)
    causal = k_pos <= q_pos  # [seq, total]
    is_self = k_pos == q_pos
    real_key = attention_mask.bool()[:, None, None, :]  # [batch, 1, 1, total]
    return causal & (real_key | is_self)
