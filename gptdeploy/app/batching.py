"""Continuous batching: requests that arrive while others run join the running batch at a step boundary.

    batcher = Batcher(runner, tokenizer, max_batch=16)        # a thread that owns the runner
    batcher.submit(Job(prompt_ids, config, emit, finish))      # from any thread
    ...
    batcher.close()

Each job is one prompt with its own GenerationConfig (greedy or sampled, its own seed). The batcher
thread loops: the jobs waiting are prefilled together (a left-padded batch, gptdeploy.steps) and join
the rows that are decoding; then every row takes one decode step together. A row leaves at its
end-of-text, at its max_new_tokens, or when its client is gone (emit returns False), and its slot
goes to the next job. Each row computes what it would alone: the attention mask hides the left
padding of every row and the position ids count its real tokens only, so greedy ids equal
gptdeploy.app.generation.generate's, and a seeded row draws the same tokens (one
numpy Generator per row, seeded as generate seeds it).

Joining and leaving reshape the KV cache (rows added, removed, left-padded to a common length). That
is done on a host copy (Runner.cache_to_numpy) and needs a way back into the runner's own cache: the
ONNX Runtime runners' concat cache (onnx/model.onnx, the default) has one. With any other runner (a
shared-buffer variant, TensorRT) the running rows' cache is made again from their tokens (one
prefill) whenever rows join or leave.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gptdeploy.app.generation import GenerationConfig, choose_tokens
from gptdeploy.steps import prefill_inputs
from gptdeploy.tokenizer import Tokenizer

# What ends a row: its end-of-text, its max_new_tokens, its client gone, or an error (the message follows).
EOT, LENGTH, CANCELLED, ERROR = "eot", "length", "cancelled", "error"


@dataclass
class Job:
    """One prompt to generate from. emit(token_id) is called from the batcher thread for every new token and
    returns False when nobody wants more (the row then leaves); finish(reason, new_ids, message) once at the end."""

    prompt_ids: list[int]
    config: GenerationConfig
    emit: Callable[[int], bool]
    finish: Callable[[str, list[int], str], None]


@dataclass
class _Row:
    job: Job
    rng: np.random.Generator
    length: int  # positions of this row in the cache (its prompt, then the tokens fed back)
    new_ids: list[int] = field(default_factory=list)
    pending: int = 0  # the last chosen token, fed at the next step
    done: str | None = None
    message: str = ""
    ended: bool = False  # its job was told it finished: never twice


def concat_cache_of(runner) -> Callable | None:
    """A function (arrays, length) -> the runner's cache from host arrays, or None when the runner's cache has
    no way back from the host (then jobs join only an empty batch)."""
    try:
        from gptdeploy.export_folder import KV_CONCAT
        from gptdeploy.runtimes.ort import OrtCache, OrtRunner
    except ImportError:
        return None
    if not isinstance(runner, OrtRunner) or runner.kv_cache != KV_CONCAT:
        return None
    import onnxruntime as ort

    def build(layers: list[tuple[np.ndarray, np.ndarray]], length: int):
        values = tuple(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), runner.device_type,
                                                       runner.device_id) for kv in layers for a in kv)
        return OrtCache(values, length)

    return build


class Batcher:
    """A thread that owns `runner` and decodes every submitted job, max_batch rows at a time."""

    def __init__(self, runner, tokenizer: Tokenizer, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.runner, self.tokenizer, self.max_batch = runner, tokenizer, max_batch
        self._build_cache = concat_cache_of(runner)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._closed = threading.Event()
        self._lock = threading.Lock()  # submit and close: every job queued before close is ended by the thread
        self.steps = 0  # decode steps run, and the rows they carried: rows_stepped / steps is the mean batch
        self.rows_stepped = 0
        self._thread = threading.Thread(target=self._loop, name="gptdeploy-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("the batcher is closed")
            self._queue.put(job)

    def close(self, timeout: float = 10) -> None:
        """Stops the thread; rows still running, and jobs still waiting, finish with CANCELLED."""
        with self._lock:
            self._closed.set()
            self._queue.put(None)  # after every job a submit queued: submit holds the lock to check and put
        self._thread.join(timeout)

    # --- the batcher thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        rows: list[_Row] = []
        state = None  # (cache, mask [batch, past]) of `rows`
        while True:
            joining = self._take(block=not rows, room=self.max_batch - len(rows))
            if self._closed.is_set():
                for row in rows + [_Row(j, None, 0) for j in joining + self._drain()]:
                    self._end(row, CANCELLED)
                return
            try:
                if joining:
                    rows, state = self._join(rows, state, joining)
                rows, state = self._leave(rows, state)
                if rows:
                    state = self._decode(rows, state)
                    rows, state = self._leave(rows, state)
            except Exception as e:  # noqa: BLE001 - a runtime failure ends the rows it hit, not the server
                message = str(e).splitlines()[0] if str(e) else type(e).__name__
                running = {id(row.job) for row in rows}
                for row in rows + [_Row(job, None, 0) for job in joining if id(job) not in running]:
                    row.done, row.message = ERROR, message
                    self._end(row, ERROR)
                rows, state = [], None

    def _take(self, block: bool, room: int) -> list[Job]:
        jobs = []
        while len(jobs) < room:
            try:
                job = self._queue.get(block=block and not jobs, timeout=0.5 if block and not jobs else None)
            except queue.Empty:
                break
            if job is None:
                break
            jobs.append(job)
        return jobs

    def _drain(self) -> list[Job]:
        """The jobs still queued (close has put its None after them), taken without waiting."""
        jobs = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)

    def _choose(self, row: _Row, logits: np.ndarray) -> None:
        """The row's next token from its logits [vocab], sent to its client; marks the row done when it ends."""
        if not np.isfinite(logits).all():
            row.done, row.message = ERROR, f"{self.runner.describe()} gave NaN or Inf logits"
            return
        token = int(choose_tokens(logits[None], row.job.config, row.rng, self.tokenizer.vocab_size)[0])
        row.new_ids.append(token)
        row.pending = token
        config = row.job.config
        if not row.job.emit(token):
            row.done = CANCELLED
        elif config.stop_at_eot and token == self.tokenizer.eot_id:
            row.done = EOT
        elif len(row.new_ids) >= config.max_new_tokens:
            row.done = LENGTH

    def _join(self, rows: list[_Row], state, jobs: list[Job]):
        new_rows = [_Row(job, np.random.default_rng(job.config.seed), len(job.prompt_ids)) for job in jobs]
        if rows and self._build_cache is None:  # the running rows' cache made again, with the new rows
            inputs = prefill_inputs([_fed(row) for row in rows] + [job.prompt_ids for job in jobs])
            logits, cache = self.runner.step(*inputs, self.runner.new_cache(len(inputs.input_ids)), last_only=True)
            for r, row in enumerate(new_rows):
                self._choose(row, logits[len(rows) + r, -1])
            return rows + new_rows, (cache, inputs.attention_mask)
        inputs = prefill_inputs([job.prompt_ids for job in jobs])
        logits, cache = self.runner.step(*inputs, self.runner.new_cache(len(jobs)), last_only=True)
        for r, row in enumerate(new_rows):
            self._choose(row, logits[r, -1])
        if not rows:
            return new_rows, (cache, inputs.attention_mask)
        old_cache, old_mask = state
        past = max(old_mask.shape[1], inputs.attention_mask.shape[1])
        old_layers, new_layers = self.runner.cache_to_numpy(old_cache), self.runner.cache_to_numpy(cache)
        layers = [tuple(np.concatenate([_left_pad(a, past, 2), _left_pad(b, past, 2)]) for a, b in zip(old, new))
                  for old, new in zip(old_layers, new_layers)]
        mask = np.concatenate([_left_pad(old_mask, past, 1), _left_pad(inputs.attention_mask, past, 1)])
        return rows + new_rows, (self._build_cache(layers, past), mask)

    def _leave(self, rows: list[_Row], state):
        """Ends the rows that are done; drops them from the cache, and the positions no row uses any more."""
        kept = [row for row in rows if row.done is None]
        for row in rows:
            if row.done is not None:
                self._end(row, row.done)
        if len(kept) == len(rows) or state is None:
            return rows, state
        if not kept:
            return [], None
        cache, mask = state
        if self._build_cache is None:  # the kept rows' cache made again from their tokens
            inputs = prefill_inputs([_fed(row) for row in kept])
            _, cache = self.runner.step(*inputs, self.runner.new_cache(len(kept)), last_only=True)
            return kept, (cache, inputs.attention_mask)
        keep = [r for r, row in enumerate(rows) if row.done is None]
        mask = mask[keep]
        first = int(np.argmax(mask.any(0)))  # the leading positions that only the ended rows used
        layers = [(k[keep][:, :, first:], v[keep][:, :, first:]) for k, v in self.runner.cache_to_numpy(cache)]
        return kept, (self._build_cache(layers, mask.shape[1] - first), mask[:, first:])

    def _decode(self, rows: list[_Row], state):
        cache, mask = state
        batch = len(rows)
        tokens = np.array([[row.pending] for row in rows], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        positions = np.array([[row.length] for row in rows], dtype=np.int64)
        logits, cache = self.runner.step(tokens, mask, positions, cache, last_only=True)
        self.steps += 1
        self.rows_stepped += batch
        for r, row in enumerate(rows):
            row.length += 1
            self._choose(row, logits[r, -1])
        return cache, mask

    def _end(self, row: _Row, reason: str) -> None:
        if row.ended:
            return
        row.ended = True
        try:
            row.job.finish(reason, row.new_ids, row.message)
        except Exception:  # noqa: BLE001 - a client that cannot be told any more
            pass


def _fed(row: _Row) -> list[int]:
    """The tokens a row's cache holds: its prompt and every new token but the last (not fed yet)."""
    return row.job.prompt_ids + row.new_ids[:-1]


def _left_pad(array: np.ndarray, length: int, axis: int) -> np.ndarray:
    missing = length - array.shape[axis]
    if missing == 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (missing, 0)
    return np.pad(array, widths)
