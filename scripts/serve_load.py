"""Load on `gptdeploy serve`: tokens/s, time to first token and per-token latency (p50, p99) at several
concurrencies over loopback, against in-process generation at batch 1 on the same export.

    python scripts/serve_load.py shakespeare --concurrency 1,4,16 --requests 32 --max-tokens 64

It serves SOURCE with the Triton server of the serve extra on free loopback ports (the repository
`gptdeploy serve` builds), sends a bounded number of greedy generate_stream requests per concurrency
(each client sends its next request when its last one ended), and prints one table, and JSON with --json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

PROMPTS = ["ROMEO:", "JULIET: O Romeo, Romeo, wherefore art thou", "First Citizen:\nBefore we proceed any further",
           "KING RICHARD III:\nNow is the winter of our discontent", "HAMLET:", "To be, or not to be",
           "MENENIUS:\nI tell you, friends,", "O, speak again, bright angel!"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def one_request(port: int, model: str, prompt: str, max_tokens: int) -> dict:
    body = json.dumps({"text_input": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    start = time.perf_counter()
    conn.request("POST", f"/v2/models/{model}/generate_stream", body)
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    stamps = []
    while line := response.readline():
        if line.startswith(b"data:"):
            event = json.loads(line[5:])
            ids = event["token_ids"]
            for _ in [ids] if isinstance(ids, int) else ids:
                stamps.append(time.perf_counter())
    conn.close()
    return {"ttft": stamps[0] - start, "gaps": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps),
            "end": stamps[-1]}


def load(port: int, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    lock = threading.Lock()
    results = []

    def client(k: int):
        while True:
            with lock:
                if not jobs:
                    return
                prompt = jobs.pop()
            result = one_request(port, model, prompt, max_tokens)
            with lock:
                results.append(result)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    elapsed = time.perf_counter() - start
    gaps = [g for r in results for g in r["gaps"]]
    ttfts = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens, "seconds": elapsed,
            "tokens_per_s": tokens / elapsed, "ttft_p50_ms": 1e3 * percentile(ttfts, 50),
            "ttft_p99_ms": 1e3 * percentile(ttfts, 99), "token_p50_ms": 1e3 * percentile(gaps, 50),
            "token_p99_ms": 1e3 * percentile(gaps, 99)}


def in_process(folder, requests: int, max_tokens: int, threads: int) -> dict:
    from gptdeploy.app import open_runner
    from gptdeploy.app.generation import GenerationConfig, generate

    runner, tokenizer = open_runner("ort", folder.path, threads=threads)
    config = GenerationConfig(max_new_tokens=max_tokens, greedy=True)
    generate(runner, tokenizer, [PROMPTS[0]], config)  # warm-up
    ttfts, per_token, tokens = [], [], 0
    start = time.perf_counter()
    for i in range(requests):
        result = generate(runner, tokenizer, [PROMPTS[i % len(PROMPTS)]], config)
        ttfts.append(result.prefill_s)
        if result.steps > 1:
            per_token.append(result.decode_s / (result.steps - 1))
        tokens += result.steps
    elapsed = time.perf_counter() - start
    return {"concurrency": "in-process", "requests": requests, "tokens": tokens, "seconds": elapsed,
            "tokens_per_s": tokens / elapsed, "ttft_p50_ms": 1e3 * percentile(ttfts, 50),
            "ttft_p99_ms": 1e3 * percentile(ttfts, 99), "token_p50_ms": 1e3 * statistics.median(per_token),
            "token_p99_ms": 1e3 * percentile(per_token, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", default="shakespeare")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads, in the server and in-process alike (0: one per core)")
    parser.add_argument("--json", help="also write the figures as JSON to this file")
    args = parser.parse_args()

    from gptdeploy.app.serving import Ports, TritonServer, export_of, free_ports, served_repository
    from gptdeploy.app.triton_repo import RepoSettings

    folder = export_of(args.source)
    settings = RepoSettings("load", max_batch=args.max_batch, threads=args.threads)
    # in-process before and after the server's runs: on a shared machine the load moves in between
    rows = [{**in_process(folder, min(args.requests, 16), args.max_tokens, args.threads),
             "concurrency": "in-process b1, before"}]
    with open("/proc/loadavg") as f:
        before = f.read().strip()
    with TritonServer(served_repository(folder, settings), ports=Ports(*free_ports()), models=["load"]) as server:
        one_request(server.ports.http, "load", PROMPTS[0], 8)  # warm-up
        for c in (int(x) for x in args.concurrency.split(",")):
            rows.append(load(server.ports.http, "load", c, max(args.requests, c), args.max_tokens))
    rows.append({**in_process(folder, min(args.requests, 16), args.max_tokens, args.threads),
                 "concurrency": "in-process b1, after"})
    with open("/proc/loadavg") as f:
        after = f.read().strip()
    print(f"{args.source}, greedy, {args.max_tokens} new tokens per request, {args.threads} ONNX Runtime threads, "
          f"{os.cpu_count()} CPUs; "
          f"/proc/loadavg before: {before}, after: {after}")
    print(f"{'concurrency':>22} {'requests':>8} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'token p50':>9} "
          f"{'token p99':>9}  (ms)")
    for r in rows:
        print(f"{r['concurrency']!s:>22} {r['requests']:>8} {r['tokens_per_s']:>9.0f} {r['ttft_p50_ms']:>9.1f} "
              f"{r['ttft_p99_ms']:>9.1f} {r['token_p50_ms']:>9.2f} {r['token_p99_ms']:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": args.source, "max_tokens": args.max_tokens, "threads": args.threads,
                       "loadavg_before": before,
                       "loadavg_after": after, "rows": rows}, f, indent=2)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
