"""A runtime whose step times are known in advance: an independent oracle for bench's arithmetic.

Each step sleeps a fixed time (PREFILL_S for a step from an empty cache, DECODE_S for every later one)
and returns zero logits, so what `gptdeploy bench` reports can be checked against these durations
rather than against its own formulas. Registered by the tests that use it (tests/test_bench.py) as
one more entry of gptdeploy.runtimes.registry.RUNTIMES: a runtime is one module plus one entry.
"""

from __future__ import annotations

import time

import numpy as np

from gptdeploy.runtimes.base import ModelInfo, OpenOptions, Runner, StepOutput

PREFILL_S = 0.040
DECODE_S = 0.015


class SleepyRunner(Runner):
    name = "sleepy"
    device = "cpu"
    precision = "fp32"

    def __init__(self, info: ModelInfo):
        self.info = info

    @classmethod
    def open(cls, target, options: OpenOptions = OpenOptions()) -> SleepyRunner:
        return cls(ModelInfo.from_config(target.config.to_dict()))

    def new_cache(self, batch: int) -> int:
        return 0

    def cache_length(self, cache: int) -> int:
        return cache

    def cache_to_numpy(self, cache: int):
        empty = np.zeros((1, self.info.n_head, cache, self.info.head_dim), np.float32)
        return [(empty, empty)] * self.info.n_layer

    def _step(self, input_ids, attention_mask, position_ids, cache, last_only) -> StepOutput:
        time.sleep(DECODE_S if cache else PREFILL_S)
        seq = 1 if last_only else input_ids.shape[1]
        return StepOutput(np.zeros((input_ids.shape[0], seq, self.info.vocab_size), np.float32),
                          cache + input_ids.shape[1])
