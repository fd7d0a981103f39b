"""GPTConfig: the architecture of a GPT, checked, with what it costs. No torch: an export folder's
manifest, bench's arithmetic and the loaders all read it.

A config that could not make a working model is refused here, with the field that is wrong: counts that
are not positive integers, a width that the heads do not divide, an unknown GELU, a LayerNorm epsilon
that is not a positive number.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

INT_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    bias: bool = True
    dropout: float = 0.0
    # GPT-2's weights were trained with the tanh approximation of GELU; nanoGPT trains with exact erf.
    gelu: str = "tanh"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in INT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias must be true or false, not {self.bias!r}")
        if self.gelu not in ("tanh", "exact"):
            raise ValueError(f"gelu must be 'tanh' or 'exact', not {self.gelu!r}")
        if not _real(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), not {self.dropout!r}")
        if not _real(self.layer_norm_eps) or not 0 < self.layer_norm_eps < 1:
            raise ValueError(f"layer_norm_eps must be a number in (0, 1), not {self.layer_norm_eps!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """From a dict of its fields (a manifest's "config"); unknown keys are an error."""
        if not isinstance(d, dict):
            raise ValueError(f"a config is a mapping of its fields, not {type(d).__name__}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(sorted(unknown))}")
        return cls(**d)

    @property
    def num_params(self) -> int:
        """All parameters, the tied lm_head counted once, position embeddings included (GPT.num_params)."""
        n = self.n_embd
        per_layer = 12 * n * n + (13 * n if self.bias else 2 * n)  # 4 matrices, their biases, 2 LayerNorms
        return self.vocab_size * n + self.block_size * n + self.n_layer * per_layer + (2 * n if self.bias else n)


def _real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
