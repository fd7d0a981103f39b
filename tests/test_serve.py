"""gptdeploy's Triton repository served by the real Triton server of nvidia-pytriton (the serve extra), on
loopback: greedy ids over HTTP generate, generate_stream and gRPC streaming equal `gptdeploy generate
--greedy`'s; concurrent requests batched together stay correct; bad requests get 4xx and the server
keeps serving; a client gone mid-stream frees its slot; `gptdeploy serve` stops on SIGTERM with no
process left. One server is shared by the module's tests."""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="the serve extra is not installed (pip install 'gptdeploy[serve]')")
pytest.importorskip("tritonclient.grpc", reason="the serve extra is not installed (pip install 'gptdeploy[serve]')")

from gptdeploy.app.generation import GenerationConfig, generate  # noqa: E402
from gptdeploy.app.serving import Ports, TritonServer, free_ports  # noqa: E402

NAME = "shakespeare"
PROMPTS = ["ROMEO:", "JULIET: O Romeo, Romeo", "First Citizen:\nBefore we proceed any further, hear me speak."]
NEW = 24


@pytest.fixture(scope="module")
def folder(shakespeare_folder):
    return shakespeare_folder


@pytest.fixture(scope="module")
def repo(triton_repository):
    return triton_repository


@pytest.fixture(scope="module")
def server(repo):
    http_port, grpc_port, metrics_port = free_ports()
    with TritonServer(repo, ports=Ports(http_port, grpc_port, metrics_port), models=[NAME]) as s:
        yield s


@pytest.fixture(scope="module")
def cli_greedy(folder):
    """`gptdeploy generate --greedy --json` on the same export: the ids every protocol must give."""
    args = [sys.executable, "-m", "gptdeploy", "generate", str(folder.path), "--runtime", "ort", "--greedy",
            "--max-new-tokens", str(NEW), "--json"]
    for p in PROMPTS:
        args += ["--prompt", p]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120).stdout
    return [row["generated_ids"] for row in json.loads(out)["outputs"]]


@pytest.fixture(scope="module")
def local(folder):
    from gptdeploy.app import open_runner

    return open_runner("ort", folder.path)


def post(server, path: str, body: bytes | dict, timeout: float = 60) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.ports.http, timeout=timeout)
    try:
        conn.request("POST", path, body if isinstance(body, bytes) else json.dumps(body).encode())
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def ids_of(value) -> list[int]:
    return [value] if isinstance(value, int) else list(value)


def stream_events(data: bytes) -> list[dict]:
    return [json.loads(line[5:]) for line in data.decode().splitlines() if line.startswith("data:")]


def test_http_generate_equals_cli_greedy(server, cli_greedy):
    for prompt, expected in zip(PROMPTS, cli_greedy):
        status, body = post(server, f"/v2/models/{NAME}/generate",
                            {"text_input": prompt, "max_tokens": NEW, "temperature": 0})
        assert status == 200, body
        reply = json.loads(body)
        assert ids_of(reply["token_ids"]) == expected
        assert reply["finish_reason"] == "length"


def test_http_generate_stream_equals_cli_greedy(server, cli_greedy, local):
    runner, tokenizer = local
    for prompt, expected in zip(PROMPTS, cli_greedy):
        status, body = post(server, f"/v2/models/{NAME}/generate_stream",
                            {"text_input": prompt, "max_tokens": NEW, "temperature": 0, "stream": True})
        assert status == 200, body
        events = stream_events(body)
        assert len(events) == NEW + 1  # one per token, then the finish reason
        assert [i for e in events for i in ids_of(e["token_ids"])] == expected
        assert "".join(e["text_output"] for e in events) == tokenizer.decode(expected)


def test_grpc_stream_equals_cli_greedy(server, cli_greedy):
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for n, prompt in enumerate(PROMPTS):
            text = grpcclient.InferInput("text_input", [1], "BYTES")
            text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
            client.async_stream_infer(NAME, [text], request_id=str(n), enable_empty_final_response=True,
                                      parameters={"max_tokens": NEW, "temperature": 0.0, "stream": True})
        got: dict[str, list[int]] = {str(n): [] for n in range(len(PROMPTS))}
        finished = 0
        while finished < len(PROMPTS):
            result, error = results.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            ids = result.as_numpy("token_ids")
            if ids is not None:
                got[response.id] += ids.tolist()
            if response.parameters["triton_final_response"].bool_param:
                finished += 1
    finally:
        client.stop_stream()
        client.close()
    assert [got[str(n)] for n in range(len(PROMPTS))] == cli_greedy


def decode_counters(server) -> tuple[float, float]:
    """(gptdeploy_decode_steps, gptdeploy_decode_rows) of the model, from the server's Prometheus metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", server.ports.metrics, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    values = {}
    for line in text.splitlines():
        if line.startswith(("gptdeploy_decode_steps{", "gptdeploy_decode_rows{")) and f'model="{NAME}"' in line:
            values[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
    return values.get("gptdeploy_decode_steps", 0.0), values.get("gptdeploy_decode_rows", 0.0)


def settled_counters(server) -> tuple[float, float]:
    """The counters once the model's metrics thread (once a second) has caught up: two equal readings."""
    last = decode_counters(server)
    for _ in range(20):
        time.sleep(1.1)
        now = decode_counters(server)
        if now == last:
            return now
        last = now
    return last


def test_32_concurrent_requests_are_batched_and_correct(server, local):
    runner, tokenizer = local
    steps_before, rows_before = settled_counters(server)
    rng = np.random.default_rng(0)
    requests = []
    for n in range(32):
        prompt = " ".join(["ROMEO:", "JULIET:", "O", "speak", "again,", "bright", "angel!"][:1 + n % 7]) * (1 + n % 3)
        body = {"text_input": prompt, "max_tokens": int(rng.integers(4, 40))}
        if n % 3 == 0:
            body.update(temperature=0.8, top_k=40, seed=n)
        elif n % 3 == 1:
            body.update(temperature=0.9, top_p=0.9, seed=1000 + n)
        else:
            body.update(temperature=0)
        requests.append(body)

    def ask(body):
        endpoint = "generate_stream" if body["max_tokens"] % 2 else "generate"
        status, data = post(server, f"/v2/models/{NAME}/{endpoint}", {**body, "stream": endpoint != "generate"})
        assert status == 200, data
        if endpoint == "generate":
            return ids_of(json.loads(data)["token_ids"])
        return [i for e in stream_events(data) for i in ids_of(e["token_ids"])]

    start = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, requests))
    elapsed = time.perf_counter() - start
    for body, ids in zip(requests, got):
        config = GenerationConfig(max_new_tokens=body["max_tokens"], temperature=body["temperature"],
                                  top_k=body.get("top_k"), top_p=body.get("top_p"), seed=body.get("seed"))
        expected = generate(runner, tokenizer, [body["text_input"]], config).new_ids[0]
        assert ids == expected, body
    assert elapsed < 60
    steps, rows = settled_counters(server)
    # rows / steps: the mean batch of the decode steps these requests took; one at a time it would be 1
    assert steps > steps_before and (rows - rows_before) / (steps - steps_before) > 2, (steps, rows)


# Triton's generate endpoint answers the JSON it cannot parse itself, before the model sees it, and gives
# those errors HTTP 500 (Triton 2.51, nvidia-pytriton 0.7.0): the PARSED_BY_TRITON cases, a body that is
# not JSON and a prompt input of the wrong type. The settings are request parameters, whose types the model
# checks: a wrong one gets 400 with the model's message, as does every request the model refuses.
PARSED_BY_TRITON = 500


@pytest.mark.parametrize("body, status, says", [
    (b'{"text_input": "ROMEO:", "max_tokens": ', PARSED_BY_TRITON, "JSON"),  # not JSON
    ({"text_input": 5, "max_tokens": 4}, PARSED_BY_TRITON, "string"),  # a number for the prompt input
    ({"text_input": "ROMEO:", "max_tokens": "ten"}, 400, 'max_tokens must be an integer, got "ten"'),
    ({"text_input": "ROMEO:", "max_tokens": 4.5}, 400, "max_tokens must be an integer"),
    ({"text_input": "ROMEO:", "temperature": "hot"}, 400, "temperature must be a number"),
    ({"text_input": "ROMEO:", "stream": "yes"}, 400, "stream must be true or false"),
    ({"text_input": "ROMEO:", "seed": True}, 400, "seed must be an integer"),
    ({"text_input": "ROMEO:", "max_token": 4}, 400, "unknown parameter max_token"),  # a misspelt setting
    ({"text_input": "ROMEO:", "top_k": {"k": 4}}, 400, "invalid type"),  # Triton's own 400: not a scalar
    ({"text_input": ["ROMEO:", "JULIET:"]}, 400, "text_input"),  # two prompts where one goes
    ({"text_input": "ROMEO: " * 400, "max_tokens": 8}, 400, "context"),  # the prompt too long
    ({"text_input": "ROMEO:", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"text_input": "ROMEO:", "max_tokens": 0}, 400, "max_tokens"),
    ({"text_input": "ROMEO:", "temperature": -2}, 400, "temperature"),
    ({"input_ids": [1, 2, 99999999], "max_tokens": 4}, 400, "token id"),
    ({"max_tokens": 4}, 400, "text_input or input_ids"),
    ({"text_input": "x" * 70_000, "max_tokens": 4}, 400, "bytes"),
], ids=["bad-json", "prompt-wrong-type", "string-for-int", "float-for-int", "string-for-number", "string-for-bool",
        "bool-for-int", "unknown-setting", "object-for-int", "wrong-shape", "prompt-too-long", "max-tokens-absurd", "max-tokens-0",
        "temperature", "token-id", "no-prompt", "too-many-bytes"])
def test_malformed_requests_get_an_error_and_the_server_keeps_serving(server, body, status, says):
    got, data = post(server, f"/v2/models/{NAME}/generate", body)
    assert got == status, data
    assert says in json.loads(data)["error"]
    ok, _ = post(server, f"/v2/models/{NAME}/generate", {"text_input": "ROMEO:", "max_tokens": 2})
    assert ok == 200


def test_unknown_model_gets_4xx(server):
    got, data = post(server, "/v2/models/nonesuch/generate", {"text_input": "ROMEO:"})
    assert 400 <= got < 500 and b"nonesuch" in data


def test_client_gone_mid_stream_frees_its_slot(server):
    """The client closes its connection after the first token; the model notices within about 0.1 s, drops the
    row and logs it. On a loaded machine the batcher can run 100 or more tokens ahead of the sends the client
    reads; when it has generated all 250 before the close is noticed there is nothing left to cancel, so the
    attempt is made again (at most 3 in all)."""
    for _attempt in range(3):
        seen = set(server.recent_log())
        conn = http.client.HTTPConnection("127.0.0.1", server.ports.http, timeout=30)
        conn.request("POST", f"/v2/models/{NAME}/generate_stream",
                     json.dumps({"text_input": "ROMEO:", "max_tokens": 250, "temperature": 0, "stream": True}))
        response = conn.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data:")  # the first token came
        conn.sock.close()
        conn.close()
        deadline = time.monotonic() + 5
        while not (freed := [line for line in server.recent_log() if line not in seen and "its slot is free" in line]):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if freed:
            break
    assert freed, "no cancellation logged in 3 attempts:\n" + "\n".join(server.recent_log()[-8:])
    assert int(freed[-1].split("cancelled after ")[1].split()[0]) < 250, freed
    start = time.perf_counter()
    status, body = post(server, f"/v2/models/{NAME}/generate", {"text_input": "JULIET:", "max_tokens": 8})
    assert status == 200 and len(ids_of(json.loads(body)["token_ids"])) == 8
    assert time.perf_counter() - start < 20
    assert server.process.poll() is None


def _session_processes(sid: int) -> list[str]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, pgrp, session
            found.append(stat.parent.name)
    return found


def test_serve_stops_on_sigterm_with_no_process_left(folder):
    http_port, grpc_port, metrics_port = free_ports()
    command = [sys.executable, "-m", "gptdeploy", "serve", str(folder.path), "--name", "served",
               "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
               "--huge-pages"]  # the model loads with the option too (the other tests serve without it)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        output = "".join(lines)
        assert f"http://127.0.0.1:{http_port}/v2/models/served/generate" in output, process.stderr.read()
        assert f"127.0.0.1:{grpc_port}" in output and f":{metrics_port}/metrics" in output
        conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=30)
        conn.request("GET", "/metrics")
        assert b"nv_inference_request_success" in conn.getresponse().read()
        conn.close()
        server_pid = int(output.split("(pid ")[1].split(")")[0])
        assert len(_session_processes(server_pid)) >= 2  # the server and the model's stub process
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert "Stopped" in process.stdout.read()
        assert not _session_processes(server_pid) and not _session_processes(process.pid)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
