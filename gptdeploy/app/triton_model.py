"""The python-backend model of a gptdeploy Triton repository (`gptdeploy triton` copies this file as model.py).

Decoupled: execute() checks each request, hands it to a Batcher (gptdeploy.app.batching: continuous
batching over gptdeploy's runner) and returns at once; the batcher thread sends the responses. It
imports gptdeploy from the copy beside it, and runs the export folder beside it, so the repository
needs nothing outside itself.

Inputs (one of them): text_input (BYTES), input_ids (INT64 [-1]). The generation settings are request
parameters (Triton's parameters extension; the generate extension makes every JSON key that is not an
input one): max_tokens (int), temperature (number; 0 is greedy), top_k (int), top_p (number), seed (int),
stream (bool: one response per token; otherwise one response with every token). As parameters, a value
of the wrong type reaches the model, which refuses it with 400, where an input's would get Triton's 500.
Outputs: text_output (BYTES: the new text of this response), token_ids (INT64 [-1]: its token ids),
finish_reason (BYTES: "" while streaming, then eot, length or cancelled).
A bad request gets an error response (HTTP 400): the prompt too long, max_tokens out of range, a
wrong parameter.

Metrics (Prometheus, beside Triton's own on its metrics port; labels model and version): counters
gptdeploy_decode_steps (decode steps the instance's batcher ran) and gptdeploy_decode_rows (the rows
those steps carried: rows / steps is the mean batch), brought up to date once a second by a thread of
their own, so that no decode step waits for a round trip to the server.
"""

from __future__ import annotations

import itertools
import json
import queue
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # the gptdeploy copy in this model's version folder

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# How often a running request asks whether its client is gone (a round trip to the server, which holds up
# the stub's other threads: asked every 4th token, it cost a tiny model's concurrency-1 stream some 5%)
CANCEL_CHECK_S = 0.1


class BadRequest(Exception):
    pass


# The request parameters the model reads, and what each must be
SETTINGS = {"max_tokens": "an integer", "temperature": "a number", "top_k": "an integer", "top_p": "a number",
            "seed": "an integer", "stream": "true or false"}


def _settings(request) -> dict:
    """The request's generation settings (its parameters), each checked for its type."""
    raw = request.parameters()
    try:
        params = json.loads(raw) if raw else {}
    except ValueError:
        raise BadRequest("the request's parameters are not JSON") from None
    unknown = sorted(set(params) - set(SETTINGS))
    if unknown:
        raise BadRequest(f"unknown parameter {', '.join(unknown)}; the model takes text_input or input_ids, and "
                         f"{', '.join(SETTINGS)}")
    for name, value in params.items():
        kind = SETTINGS[name]
        ok = (isinstance(value, bool) if kind == "true or false" else
              not isinstance(value, bool) and isinstance(value, int | float if kind == "a number" else int))
        if not ok:
            raise BadRequest(f"{name} must be {kind}, got {json.dumps(value)}")
    return params


class TritonPythonModel:
    def initialize(self, args):
        from gptdeploy.app.batching import Batcher
        from gptdeploy.export_folder import read_export, verify
        from gptdeploy.runtimes.base import OpenOptions
        from gptdeploy.runtimes.registry import require

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.model_name = args["model_name"]
        folder = read_export(HERE / "export")
        verify(folder)  # every file against its size and sha256 in the manifest, before it runs
        device = None
        if params.get("runtime", "ort") != "ort":
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        variant = params.get("variant") or None
        self.runner = require(params.get("runtime", "ort")).open(
            folder, OpenOptions(device=device, variant=variant, threads=int(params.get("threads", "0")),
                                huge_pages=params.get("huge_pages") == "1"))
        self.tokenizer = folder.tokenizer()
        self.block_size = self.runner.info.block_size
        self.max_prompt_bytes = int(params.get("max_prompt_bytes", "65536"))
        self.default_max_tokens = int(params.get("default_max_tokens", "64"))
        self.outbox = Outbox()
        self.batcher = Batcher(self.runner, self.tokenizer, max_batch=int(params.get("max_batch", "16")))
        self.metrics = BatchMetrics(self.batcher, {"model": self.model_name, "version": args["model_version"]})

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompt_ids, generation, streaming = self._parse(request)
            except BadRequest as e:
                self._refuse(sender, str(e))
                continue
            except Exception as e:  # noqa: BLE001 - whatever the checks raise (GptDeployError): the client's fault
                self._refuse(sender, str(e).splitlines()[0] if str(e) else type(e).__name__)
                continue
            self.batcher.submit(self._job(prompt_ids, generation, streaming, sender))
        return None

    def _refuse(self, sender, message: str) -> None:
        error = pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
        sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)

    def _parse(self, request):
        from gptdeploy.app.generation import GenerationConfig, prepare_prompts

        text = pb_utils.get_input_tensor_by_name(request, "text_input")
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if (text is None) == (ids is None):
            raise BadRequest("give text_input or input_ids (one of them)")
        if text is not None:
            values = text.as_numpy().reshape(-1)
            if values.size != 1:
                raise BadRequest(f"text_input takes one string, got {values.size}")
            raw = values[0]
            raw = raw if isinstance(raw, bytes) else str(raw).encode()
            if len(raw) > self.max_prompt_bytes:
                raise BadRequest(f"text_input has {len(raw)} bytes; at most {self.max_prompt_bytes}")
            try:
                prompt = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest("text_input is not UTF-8") from None
        else:
            array = ids.as_numpy().reshape(-1)
            if not np.issubdtype(array.dtype, np.integer):
                raise BadRequest("input_ids must be integers")
            if array.size > self.block_size:
                raise BadRequest(f"input_ids has {array.size} tokens; the model's context is {self.block_size}")
            prompt = [int(i) for i in array]
        settings = _settings(request)
        max_tokens = settings.get("max_tokens", self.default_max_tokens)
        if not 1 <= max_tokens <= self.block_size:
            raise BadRequest(f"max_tokens must be from 1 to {self.block_size} (the model's context), got {max_tokens}")
        top_p = float(settings.get("top_p", 1.0))
        generation = GenerationConfig(max_new_tokens=max_tokens, temperature=float(settings.get("temperature", 1.0)),
                                      top_k=settings.get("top_k") or None, top_p=None if top_p == 1.0 else top_p,
                                      seed=settings.get("seed"))
        generation.check()
        rows = prepare_prompts(self.tokenizer, [prompt], self.runner.info.vocab_size, self.block_size, max_tokens)
        return rows[0], generation, settings.get("stream", False)

    def _job(self, prompt_ids, generation, streaming: bool, sender):
        """The Job of one request. The batcher thread only queues what to send: the outbox thread builds and
        sends the responses and asks whether the client is gone (each a round trip to the server), so that
        the next decode step does not wait for them."""
        from gptdeploy.app.batching import CANCELLED, ERROR, Job
        from gptdeploy.app.generation import TextStream

        pieces = TextStream(self.tokenizer, skip_ids=[self.tokenizer.eot_id])
        gone = threading.Event()  # set by the outbox thread; the batcher drops the row at its next token
        last_check = [-CANCEL_CHECK_S]  # when the outbox was last told to ask whether the client is gone

        def response(text: str, ids: list[int], reason: str | None):
            tensors = [pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_)),
                       pb_utils.Tensor("token_ids", np.array(ids, dtype=np.int64))]
            if reason is not None:
                tensors.append(pb_utils.Tensor("finish_reason", np.array([reason.encode()], dtype=np.object_)))
            return pb_utils.InferenceResponse(output_tensors=tensors)

        def send_token(token: int) -> None:
            if gone.is_set():
                return
            try:
                sender.send(response(pieces.push(token), [token], ""))
            except Exception:  # noqa: BLE001 - the client is gone
                gone.set()

        def check_gone() -> None:
            if not gone.is_set() and sender.is_cancelled():
                gone.set()

        def emit(token: int) -> bool:
            if gone.is_set():
                return False
            now = time.monotonic()
            if now - last_check[0] >= CANCEL_CHECK_S:  # at the first token, then at most every 0.1 s
                last_check[0] = now
                self.outbox.put(check_gone, urgent=True)  # ahead of the tokens still waiting to be sent
            if streaming:
                self.outbox.put(lambda: send_token(token))
            return True

        def send_final(reason: str, new_ids: list[int], message: str) -> None:
            if reason == ERROR:
                error = pb_utils.TritonError(message or "generation failed", pb_utils.TritonError.INTERNAL)
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
            elif reason == CANCELLED:
                pb_utils.Logger.log_info(f"gptdeploy: a request was cancelled after {len(new_ids)} tokens "
                                         f"(its client is gone); its slot is free")
                sender.send(flags=FINAL)
            elif streaming:
                sender.send(response(pieces.finish(), [], reason), flags=FINAL)
            else:
                text = self.tokenizer.decode([i for i in new_ids if i != self.tokenizer.eot_id])
                sender.send(response(text, new_ids, reason), flags=FINAL)

        def finish(reason: str, new_ids: list[int], message: str) -> None:
            self.outbox.put(lambda: send_final(reason, list(new_ids), message))

        return Job(prompt_ids, generation, emit, finish)

    def finalize(self):
        self.metrics.close()
        self.batcher.close()
        self.outbox.close()
        self.runner.close()


class Outbox:
    """A thread that runs what it is given: the responses of every request of this instance, in order, and
    the questions whether a client is gone, each ahead of every response still waiting. When the batcher
    runs ahead of the sends (a loaded machine), a gone client is still noticed within about 0.1 s, not
    after every token already generated for it has waited its turn."""

    URGENT, NORMAL, LAST = 0, 1, 2

    def __init__(self):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # first in, first out within a priority; calls are never compared
        self._thread = threading.Thread(target=self._run, name="gptdeploy-outbox", daemon=True)
        self._thread.start()

    def put(self, call, urgent: bool = False) -> None:
        self._queue.put((self.URGENT if urgent else self.NORMAL, next(self._order), call))

    def _run(self) -> None:
        while (call := self._queue.get()[2]) is not None:
            try:
                call()
            except Exception as e:  # noqa: BLE001 - one request's failure is not the others'
                pb_utils.Logger.log_error(f"gptdeploy: sending a response failed: {e}")

    def close(self, timeout: float = 10) -> None:
        self._queue.put((self.LAST, next(self._order), None))
        self._thread.join(timeout)


class BatchMetrics:
    """Counters of the batcher's decode steps and of the rows they carried, updated from a thread once a second."""

    def __init__(self, batcher, labels: dict[str, str], every: float = 1.0):
        kind = pb_utils.MetricFamily.COUNTER
        self._families = [  # kept: a metric lives as long as its family
            pb_utils.MetricFamily(name="gptdeploy_decode_steps", description="Decode steps the batcher ran",
                                  kind=kind),
            pb_utils.MetricFamily(name="gptdeploy_decode_rows", kind=kind,
                                  description="Rows the decode steps carried (rows / steps is the mean batch)")]
        self._steps, self._rows = (family.Metric(labels=labels) for family in self._families)
        self._batcher, self._every, self._sent = batcher, every, (0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gptdeploy-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.update()

    def update(self) -> None:
        now = (self._batcher.steps, self._batcher.rows_stepped)
        if now != self._sent:
            self._steps.increment(now[0] - self._sent[0])
            self._rows.increment(now[1] - self._sent[1])
            self._sent = now

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
