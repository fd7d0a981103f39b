"""Where a decode step's time goes in ONNX Runtime, per op type, for each variant of an export.

    python scripts/profile_decode.py [SOURCE] [--random] [--variants export,fp32-fused,int8,q4]
        [--prompt-len 128] [--new-tokens 128] [--threads 2] [--huge-pages] [--json FILE]

SOURCE (default gpt2; --random for seeded random weights) is exported into the export cache with the
variants named, as `gptdeploy bench` does. Per variant:
- ONNX Runtime's profiler over a round as bench runs it (the prompt, then new_tokens - 1 decode steps
  fed fixed ids), the decode steps only: each op type's kernel time per step and its share; the session's
  own time outside kernels; the Python time around each run (binding inputs, reading the logits);
- without the profiler: the median decode step as bench times it, and gptdeploy's generate() loop per
  token after the first ((total - first token) / (new tokens - 1)), whose difference is the loop's own
  cost (choosing the token, building the next inputs).
Prints one markdown table per variant and the load average; --json writes every figure.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gptdeploy.app.bench_worker import token_ids
from gptdeploy.app.export_cache import ExportCache
from gptdeploy.app.exporting import optimize_export
from gptdeploy.app.generation import GenerationConfig, generate
from gptdeploy.loading import load
from gptdeploy.runtimes.ort import OrtRunner, SessionConfig
from gptdeploy.steps import decode_inputs, prefill_inputs


def round_times(runner, ids: np.ndarray, prompt_len: int) -> list[float]:
    """The prompt then the decode steps, fed ids; each decode step's wall seconds."""
    inputs = prefill_inputs(ids[:, :prompt_len])
    _, cache = runner.step(*inputs, runner.new_cache(ids.shape[0]), last_only=True)
    times = []
    for i in range(ids.shape[1] - prompt_len):
        inputs = decode_inputs(inputs, ids[:, prompt_len + i])
        start = time.perf_counter()
        _, cache = runner.step(*inputs, cache, last_only=True)
        times.append(time.perf_counter() - start)
    return times


def per_op(profile: Path, decode_runs: int) -> dict:
    """Kernel time per op type over the last `decode_runs` model runs of a profile, per run."""
    events = json.loads(profile.read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[-decode_runs:]
    start, end = runs[0]["ts"], runs[-1]["ts"] + runs[-1]["dur"]
    ops: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and start <= e["ts"] <= end:
            ops[e["args"]["op_name"]] += e["dur"]
    return {"run_us": statistics.mean(r["dur"] for r in runs),
            "ops_us": {op: us / len(runs) for op, us in sorted(ops.items(), key=lambda kv: -kv[1])}}


def profile_variant(folder, variant, ids, prompt_len, new_tokens, threads, tmp: Path, tokenizer,
                    huge_pages: bool = False) -> dict:
    name = variant or "export"
    # the timed runner first: its session's memory is the process's new memory (--huge-pages moves that)
    start = time.perf_counter()
    runner = OrtRunner(folder, SessionConfig(intra_op_threads=threads, huge_pages=huge_pages), variant=variant)
    session_s = time.perf_counter() - start
    profiled = OrtRunner(folder, SessionConfig(intra_op_threads=threads, profile_prefix=str(tmp / name),
                                               huge_pages=huge_pages), variant=variant)
    round_times(profiled, ids, prompt_len)  # warm-up, in the profile too but before the counted runs
    steps_profiled = round_times(profiled, ids, prompt_len)
    files = [Path(f) for f in profiled.end_profiling()]
    profile = per_op(max(files, key=lambda f: f.stat().st_size), len(steps_profiled))
    profiled.close()
    steps, loops = [], []
    config = GenerationConfig(max_new_tokens=new_tokens, greedy=True, stop_at_eot=False)
    for _ in range(4):  # the first of each is a warm-up
        steps.append(statistics.median(round_times(runner, ids, prompt_len)))
        result = generate(runner, tokenizer, ids[:, :prompt_len].tolist(), config)
        loops.append(result.decode_s / (new_tokens - 1))
    step_ms, loop_ms = statistics.median(steps[1:]) * 1e3, statistics.median(loops[1:]) * 1e3
    kernels_us = sum(profile["ops_us"].values())
    return {"variant": name, "session_s": session_s, "huge_page_mib": runner.huge_page_bytes / 2**20,
            "decode_step_ms": step_ms, "generate_per_token_ms": loop_ms,
            "profiled_step_ms": statistics.median(steps_profiled) * 1e3, "session_run_us": profile["run_us"],
            "kernels_us": kernels_us, "ops_us": profile["ops_us"]}


def markdown(result: dict) -> str:
    kernels = result["kernels_us"]
    lines = [f"#### {result['variant']}", "", "| op type | µs per decode step | share of kernel time |",
             "|---|---:|---:|"]
    lines += [f"| {op} | {us:,.0f} | {us / kernels:.1%} |" for op, us in result["ops_us"].items() if us / kernels >= 0.001]
    lines += [f"| **all kernels** | **{kernels:,.0f}** | |",
              f"| session run, outside kernels | {result['session_run_us'] - kernels:,.0f} | |",
              f"| Python around the run (profiled step − session run) | "
              f"{result['profiled_step_ms'] * 1e3 - result['session_run_us']:,.0f} | |", "",
              f"Without the profiler: decode step {result['decode_step_ms']:.2f} ms (median), generate() "
              f"{result['generate_per_token_ms']:.2f} ms per token after the first: the loop's own cost "
              f"{result['generate_per_token_ms'] - result['decode_step_ms']:+.2f} ms per token. Session made in "
              f"{result['session_s']:.2f} s; {result['huge_page_mib']:.0f} MiB moved into huge pages.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", default="gpt2")
    parser.add_argument("--random", action="store_true")
    parser.add_argument("--variants", default="export,fp32-fused,int8,q4")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--huge-pages", action="store_true", help="as gptdeploy generate --huge-pages")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    loaded = load(args.source, weights="random" if args.random else None)
    variants = [None if v == "export" else v for v in args.variants.split(",")]
    folder = ExportCache().export(loaded, "fp32")
    if named := [v for v in variants if v]:
        optimize_export(folder, named, reference=loaded.model)
    ids = token_ids(0, 1, args.prompt_len + args.new_tokens - 1, loaded.tokenizer.vocab_size)
    load_start = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            results.append(profile_variant(folder.path, variant, ids, args.prompt_len, args.new_tokens,
                                           args.threads, Path(tmp), loaded.tokenizer, args.huge_pages))
            print(markdown(results[-1]), flush=True)
    loads = {"start": load_start, "end": os.getloadavg()}
    print(f"load average: {loads['start'][0]:.2f} at start, {loads['end'][0]:.2f} at end")
    if args.json:
        args.json.write_text(json.dumps({"source": args.source, "random": args.random, "huge_pages": args.huge_pages,
                                         "prompt_len": args.prompt_len,
                                         "new_tokens": args.new_tokens, "threads": args.threads,
                                         "load_average": loads, "variants": results}, indent=2))


if __name__ == "__main__":
    main()
