"""onnxruntime-genai on an export's variants, past_present_share_buffer true against false.

    python scripts/genai_share_buffer.py FOLDER [--variants fp32-fused,int8,q4] [--prompt-tokens 16]
        [--new-tokens 128] [--repeats 5]

Per variant whose manifest entry says kv_cache "shared-buffer": greedy generation of --new-tokens
tokens from a prompt of --prompt-tokens ids, once with the variant's overlay as the manifest gives it
(share buffer true) and once with it false (past and present concatenated every step), alternating,
after one warm-up each; prints the median seconds, tokens per second and the ratio, whether the two
generated the same ids, and the load average. Needs onnxruntime-genai (and neither torch nor gptdeploy).
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import onnxruntime_genai as og


def model_of(folder: Path, overlay: dict):
    config = og.Config(str(folder))
    config.overlay(json.dumps(overlay))
    return og.Model(config)


def generate(model, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    start = time.perf_counter()
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return time.perf_counter() - start, [int(t) for t in generator.get_sequence(0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--variants", default="fp32-fused,int8,q4")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    manifest = json.loads((args.folder / "gptdeploy.json").read_text())
    # Token ids with no end-of-text among them, so that every run generates the same number of tokens
    prompt = [(7 * i + 11) % 50000 + 100 for i in range(args.prompt_tokens)]
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name in args.variants.split(","):
        entry = manifest["variants"][name]
        if entry["kv_cache"] != "shared-buffer":
            print(f"{name}: kv_cache {entry['kv_cache']}, no shared buffer to measure")
            continue
        models = {share: model_of(args.folder, {**entry["genai"], "search": {"past_present_share_buffer": share}})
                  for share in (True, False)}
        times, ids = {True: [], False: []}, {}
        for share in (True, False):
            generate(models[share], prompt, args.new_tokens)  # warm-up
        for _ in range(args.repeats):
            for share in (True, False):
                seconds, ids[share] = generate(models[share], prompt, args.new_tokens)
                times[share].append(seconds)
        median = {share: statistics.median(t) for share, t in times.items()}
        generated = len(ids[True]) - len(prompt)
        print(f"{name}: share buffer true {median[True] * 1000:.1f} ms ({generated / median[True]:.0f} tokens/s), "
              f"false {median[False] * 1000:.1f} ms ({generated / median[False]:.0f} tokens/s), "
              f"false/true {median[False] / median[True]:.2f}; same ids: {ids[True] == ids[False]}; "
              f"{generated} new tokens, median of {args.repeats}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
