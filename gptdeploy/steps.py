"""The inputs of a model step: a left-padded prefill, then one token per row at a time.

Small pure functions in numpy, shared by generation, parity, export validation and bench, so that
every one of them feeds a runner the same way:

    inputs = prefill_inputs([[15496, 995], [464]])   # two prompts, the shorter left-padded
    logits, cache = runner.step(*inputs, cache)
    inputs = decode_inputs(inputs, next_tokens)      # next_tokens: one id per row

Left padding: the attention mask is 0 under the padding and the position ids count real tokens only
(cumsum(mask) - 1, clamped at 0), so every row computes what it would compute alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

PAD_ID = 0  # what padded positions hold; masked out, so any valid id does


@dataclass(frozen=True)
class StepInputs:
    input_ids: np.ndarray  # int64 [batch, seq]
    attention_mask: np.ndarray  # int64 [batch, past + seq]
    position_ids: np.ndarray  # int64 [batch, seq]

    def __iter__(self) -> Iterator[np.ndarray]:  # runner.step(*inputs, cache)
        return iter((self.input_ids, self.attention_mask, self.position_ids))

    @property
    def real(self) -> np.ndarray:
        """bool [batch, seq]: the positions of input_ids that are tokens, not left padding."""
        return self.attention_mask[:, -self.input_ids.shape[1]:] == 1

    @property
    def cache_real(self) -> np.ndarray:
        """bool [batch, past + seq]: the real positions of the cache after this step."""
        return self.attention_mask == 1


def prefill_inputs(rows: Sequence[Sequence[int]]) -> StepInputs:
    """Prompts of different lengths as one left-padded batch; positions count real tokens only."""
    longest = max(len(ids) for ids in rows)
    input_ids = np.full((len(rows), longest), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for r, ids in enumerate(rows):
        input_ids[r, longest - len(ids):] = ids
        mask[r, longest - len(ids):] = 1
    return StepInputs(input_ids, mask, np.maximum(mask.cumsum(-1) - 1, 0))


def decode_inputs(previous: StepInputs, tokens: np.ndarray) -> StepInputs:
    """The step after `previous`: one new token per row (tokens [batch]), after every cached position."""
    batch = len(tokens)
    mask = np.concatenate([previous.attention_mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
    positions = previous.position_ids[:, -1:] + 1
    return StepInputs(np.asarray(tokens, dtype=np.int64).reshape(batch, 1), mask, positions)
