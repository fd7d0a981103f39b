"""Continuous batching (gptdeploy.app.batching) in-process: jobs that join a running batch at different
steps give generate()'s ids, greedy and seeded; a job whose client is gone leaves at once; a runner
whose cache cannot be reshaped on the host makes it again from the tokens and gives the same ids."""

from __future__ import annotations

import threading
import time

import pytest

from gptdeploy.app.batching import CANCELLED, EOT, LENGTH, Batcher, Job
from gptdeploy.app.generation import GenerationConfig, generate

PROMPTS = ["ROMEO:", "JULIET: O Romeo, Romeo, wherefore art thou", "KING", "First Citizen:\nBefore we proceed",
           "To be, or not to be", "HAMLET:"]
CONFIGS = [GenerationConfig(max_new_tokens=n, greedy=True) for n in (30, 12, 40, 5, 25)] + [
    GenerationConfig(max_new_tokens=20, temperature=0.8, top_k=50, top_p=0.95, seed=7)]


@pytest.fixture(scope="module")
def local(shakespeare_export_path):
    from gptdeploy.app import open_runner

    return open_runner("ort", shakespeare_export_path)


def run_staggered(batcher, tokenizer, stop_after: dict[int, int] | None = None) -> dict:
    """Submits the jobs one by one, each later one once the first has streamed two more tokens (or has
    ended): they join a batch that is already decoding whatever the machine's speed (a clock-driven
    stagger let a loaded machine finish one job before the next came)."""
    results, streams, progress = {}, [], threading.Condition()
    for i, (prompt, config) in enumerate(zip(PROMPTS, CONFIGS)):
        streamed = []
        streams.append(streamed)

        def emit(token, i=i, streamed=streamed):
            with progress:
                streamed.append(token)
                progress.notify_all()
            return not (stop_after and len(streamed) >= stop_after.get(i, 10**9))

        def finish(reason, ids, message, i=i, streamed=streamed):
            with progress:
                results[i] = (reason, ids, list(streamed), message)
                progress.notify_all()

        if i:
            with progress:
                assert progress.wait_for(lambda i=i: len(streams[0]) >= 2 * i or 0 in results, timeout=60)
        batcher.submit(Job(tokenizer.encode(prompt), config, emit, finish))
    with progress:
        assert progress.wait_for(lambda: len(results) == len(PROMPTS), timeout=60 * len(PROMPTS))
    return results


@pytest.mark.parametrize("reshape", ["host-cache", "recompute"])
def test_jobs_joining_a_running_batch_give_generates_ids(local, reshape):
    runner, tokenizer = local
    expected = [generate(runner, tokenizer, [p], c) for p, c in zip(PROMPTS, CONFIGS)]
    batcher = Batcher(runner, tokenizer, max_batch=4)
    if reshape == "recompute":
        batcher._build_cache = None  # as for a runner whose cache has no way back from the host
    try:
        results = run_staggered(batcher, tokenizer)
    finally:
        batcher.close()
    for i, want in enumerate(expected):
        reason, ids, streamed, _ = results[i]
        assert ids == want.new_ids[0] == streamed
        assert reason == {"eot": EOT, "length": LENGTH}[want.finish_reasons[0]]
    assert batcher.rows_stepped / batcher.steps > 1.5  # rows were decoded together


def test_a_job_whose_client_is_gone_leaves_and_the_others_go_on(local):
    runner, tokenizer = local
    batcher = Batcher(runner, tokenizer, max_batch=8)
    try:
        results = run_staggered(batcher, tokenizer, stop_after={0: 3})
    finally:
        batcher.close()
    assert results[0][0] == CANCELLED and len(results[0][1]) == 3
    assert [results[i][0] for i in range(1, len(PROMPTS))] == [LENGTH] * (len(PROMPTS) - 1)


def test_close_ends_every_job_it_was_given(local):
    """Jobs submitted up to close() all hear their end: the rows decoding and those still queued (more than
    max_batch) finish, with CANCELLED unless they were done; a submit after close is refused."""
    runner, tokenizer = local
    batcher = Batcher(runner, tokenizer, max_batch=2)
    ended, lock = [], threading.Lock()

    def finish(reason, ids, message):
        with lock:
            ended.append(reason)

    config = GenerationConfig(max_new_tokens=200, greedy=True, stop_at_eot=False)
    for prompt in PROMPTS:
        batcher.submit(Job(tokenizer.encode(prompt), config, lambda token: True, finish))
    time.sleep(0.05)
    batcher.close()
    assert not batcher._thread.is_alive()
    assert len(ended) == len(PROMPTS) and set(ended) == {CANCELLED}, ended
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(Job(tokenizer.encode("ROMEO:"), config, lambda token: True, finish))
