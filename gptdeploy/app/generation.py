"""Text generation: one loop over any runner (gptdeploy.runtimes.base.Runner), in numpy, without torch.

    config = GenerationConfig(max_new_tokens=32, temperature=0.8, top_k=200, seed=1)
    result = generate(runner, tokenizer, ["Hello", "The meaning of life is"], config)
    result.texts(tokenizer)
    for piece in (s := stream(runner, tokenizer, "Hello", config)): print(piece, end="", flush=True)
    s.generation   # the ids, finish reason and timings, once the stream is exhausted

Prompts of different lengths are left-padded into one batch: the attention mask hides the padding
and the position ids count only real tokens, so each row computes what it would alone. A row that
emits end-of-text stops (the end-of-text id ends its ids, not its text); the others go on.

Context policy: the prompt plus max_new_tokens must fit in the model's block_size; longer requests
are refused with the numbers, never silently cropped (nanoGPT's sample.py slides a window over the
context instead, which changes what the model sees without saying so).
"""

from __future__ import annotations

import codecs
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from gptdeploy.errors import GptDeployError, RuntimeFailed
from gptdeploy.steps import PAD_ID, decode_inputs, prefill_inputs
from gptdeploy.tokenizer import Tokenizer


# Below this, logits divided by the temperature leave float64's range (a subnormal temperature gives inf).
MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    greedy: bool = False  # argmax at every step; temperature 0 means the same
    temperature: float = 1.0
    top_k: int | None = None  # sample among the k most likely tokens only
    top_p: float | None = None  # ... among the fewest tokens whose probabilities reach top_p (nucleus)
    seed: int | None = None  # the same seed on the same runner gives the same tokens; None: fresh entropy
    stop_at_eot: bool = True

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise GptDeployError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0 or 0 < self.temperature < MIN_TEMPERATURE:
            raise GptDeployError(f"temperature must be 0 (greedy) or a number from {MIN_TEMPERATURE:g}, got "
                                 f"{self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GptDeployError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GptDeployError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise GptDeployError(f"seed must be an integer from 0 to 2**64 - 1, got {self.seed}")


@dataclass
class Generation:
    prompt_ids: list[list[int]]
    new_ids: list[list[int]]  # per row; ends with the end-of-text id when that stopped the row
    finish_reasons: list[str]  # per row: "eot" or "length"
    prefill_s: float  # the prompts through the model and the first tokens chosen (time to first token)
    decode_s: float  # every later step
    eot_id: int | None

    @property
    def steps(self) -> int:
        return max(len(ids) for ids in self.new_ids)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Steps after the first per second, per row."""
        return (self.steps - 1) / self.decode_s if self.steps > 1 and self.decode_s > 0 else None

    def texts(self, tokenizer: Tokenizer) -> list[str]:
        """The generated text of each row (end-of-text not included)."""
        return [tokenizer.decode([i for i in ids if i != self.eot_id]) for ids in self.new_ids]


def choose_tokens(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator,
                  vocab_limit: int) -> np.ndarray:
    """The next token of every row from logits [batch, vocab], among ids below vocab_limit.

    Ids from vocab_limit on (nanoGPT pads its vocabulary to 50304; the tokenizer has 50257) are never
    chosen. Sampling scales by temperature, keeps the top_k, then the top_p nucleus, and draws with the
    Gumbel-max trick (argmax of scores + Gumbel noise samples from their softmax).
    """
    if config.is_greedy:  # the logits as they are: widening them would not change the argmax
        return logits[:, :vocab_limit].argmax(-1)
    scores = logits[:, :vocab_limit].astype(np.float64)
    scores /= config.temperature
    if config.top_k is not None and config.top_k < vocab_limit:
        kth = np.partition(scores, -config.top_k, axis=-1)[:, -config.top_k, None]
        scores[scores < kth] = -np.inf
    if config.top_p is not None and config.top_p < 1:
        order = np.argsort(-scores, axis=-1)
        ranked = np.take_along_axis(scores, order, axis=-1)
        probs = np.exp(ranked - ranked[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        mass_before = np.cumsum(probs, axis=-1) - probs  # the most likely token always stays
        drop = np.empty_like(mass_before, dtype=bool)
        np.put_along_axis(drop, order, mass_before >= config.top_p, axis=-1)
        scores[drop] = -np.inf
    return (scores + rng.gumbel(size=scores.shape)).argmax(-1)


def prepare_prompts(tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]], runner_vocab: int,
                    block_size: int, max_new_tokens: int) -> list[list[int]]:
    """Token ids of each prompt, checked: in the vocabulary, and fitting the context with the new tokens.

    An empty prompt starts from end-of-text (as GPT-2 samples unconditionally), when the tokenizer has one.
    """
    if not prompts:
        raise GptDeployError("no prompt given")
    if tokenizer.vocab_size > runner_vocab:
        raise GptDeployError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {runner_vocab}")
    rows = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            if tokenizer.eot_id is None:
                raise GptDeployError("empty prompt, and this tokenizer has no end-of-text token to start from")
            ids = [tokenizer.eot_id]
        bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise GptDeployError(f"token id {bad[0]} is out of range: the tokenizer has {tokenizer.vocab_size} "
                                 f"tokens (ids 0..{tokenizer.vocab_size - 1})")
        rows.append(ids)
    longest = max(len(ids) for ids in rows)
    if longest + max_new_tokens > block_size:
        raise GptDeployError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens = {longest + max_new_tokens} is more than "
            f"the model's context of {block_size} tokens (block_size); shorten the prompt or ask for at most "
            f"{max(block_size - longest, 0)} new tokens"
        )
    return rows


def _tokens(runner, rows: list[list[int]], config: GenerationConfig, vocab_limit: int,
            eot_id: int | None) -> Iterator[np.ndarray]:
    """Yields, per step, the new token of every row; -1 for rows that have finished."""
    rng = np.random.default_rng(config.seed)
    inputs = prefill_inputs(rows)
    logits, cache = runner.step(*inputs, runner.new_cache(len(rows)), last_only=True)
    finished = np.zeros(len(rows), dtype=bool)
    for step in range(config.max_new_tokens):
        _check_finite(logits[:, -1], step, finished, runner)
        tokens = choose_tokens(logits[:, -1], config, rng, vocab_limit)
        yield np.where(finished, -1, tokens)
        if config.stop_at_eot and eot_id is not None:
            finished |= tokens == eot_id
        if finished.all() or step == config.max_new_tokens - 1:
            return  # the last token never goes through the model
        inputs = decode_inputs(inputs, np.where(finished, PAD_ID, tokens))
        logits, cache = runner.step(*inputs, cache, last_only=True)


def _check_finite(logits: np.ndarray, step: int, finished: np.ndarray, runner) -> None:
    """NaN or Inf in a row still generating: the weights or the runtime are broken; never pick a token from it."""
    bad = ~np.isfinite(logits).all(-1) & ~finished
    if bad.any():
        raise RuntimeFailed(f"{runner.describe()} gave NaN or Inf logits at step {step + 1} (row "
                            f"{int(np.flatnonzero(bad)[0])}): its weights or the runtime are broken")


def _request(runner, tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]],
             config: GenerationConfig) -> list[list[int]]:
    """The prompts' ids, checked with the options before anything runs."""
    config.check()
    return prepare_prompts(tokenizer, prompts, runner.info.vocab_size, runner.info.block_size, config.max_new_tokens)


def _run(runner, tokenizer: Tokenizer, rows: list[list[int]],
         config: GenerationConfig) -> Iterator[tuple[int, int] | Generation]:
    """The one generation loop: yields (row, token id) as tokens come, then the Generation."""
    eot_id = tokenizer.eot_id
    new_ids: list[list[int]] = [[] for _ in rows]
    times = []
    steps = _tokens(runner, rows, config, tokenizer.vocab_size, eot_id)
    while True:
        start = time.perf_counter()
        tokens = next(steps, None)
        times.append(time.perf_counter() - start)  # the model and sampling only, not the caller's work
        if tokens is None:
            break
        for r, token in enumerate(tokens.tolist()):
            if token >= 0:
                new_ids[r].append(token)
                yield r, token
    reasons = ["eot" if config.stop_at_eot and ids[-1] == eot_id else "length" for ids in new_ids]
    yield Generation(rows, new_ids, reasons, times[0], sum(times[1:]), eot_id)


def generate(runner, tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]],
             config: GenerationConfig = GenerationConfig(), *,
             on_token: Callable[[int, int], None] | None = None) -> Generation:
    """Generates from each prompt (text, or token ids) on `runner`; a row stops at the tokenizer's end-of-text.

    on_token(row, token_id) is called for every token as it comes (streaming).
    """
    for event in _run(runner, tokenizer, _request(runner, tokenizer, prompts, config), config):
        if isinstance(event, Generation):
            return event
        if on_token is not None:
            on_token(*event)
    raise AssertionError("the generation loop ended without a result")


class TextStream:
    """Turns one row's tokens into text as they come.

    A token may hold part of a UTF-8 character (GPT-2's byte-level BPE splits emoji and CJK): its
    bytes are held back until the character is complete, so every piece is valid text and the pieces
    join into exactly tokenizer.decode(ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_ids: Sequence[int | None] = ()):
        self._tokenizer = tokenizer
        self._skip = {i for i in skip_ids if i is not None}
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""
        return self._decoder.decode(self._tokenizer.decode_bytes([token_id]))

    def finish(self) -> str:
        """What is held back at the end (a character cut off by the last token, as U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class Stream:
    """The text generated from one prompt, piece by piece as the tokens come (iterate over it).

    Once exhausted, `generation` holds the ids, the finish reason and the timings.
    """

    def __init__(self, runner, tokenizer: Tokenizer, prompt: str | Sequence[int], config: GenerationConfig):
        self._events = _run(runner, tokenizer, _request(runner, tokenizer, [prompt], config), config)
        self._text = TextStream(tokenizer, skip_ids=[tokenizer.eot_id])
        self.generation: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        for event in self._events:
            if isinstance(event, Generation):
                self.generation = event
            elif piece := self._text.push(event[1]):
                yield piece
        if tail := self._text.finish():
            yield tail


def stream(runner, tokenizer: Tokenizer, prompt: str | Sequence[int],
           config: GenerationConfig = GenerationConfig()) -> Stream:
    """The text generated from one prompt, piece by piece as the tokens come (see Stream). Bad options and
    prompts are refused here, before the first piece."""
    return Stream(runner, tokenizer, prompt, config)
