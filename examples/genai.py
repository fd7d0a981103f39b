"""Greedy generation from a gptdeploy export folder with onnxruntime-genai (no gptdeploy, no torch).

    pip install onnxruntime-genai
    python genai.py shakespeare-onnx "ROMEO:" --max-new-tokens 20
    python genai.py shakespeare-onnx "ROMEO:" --variant int8     # a variant that gptdeploy optimize wrote

The folder's genai_config.json runs onnx/model.onnx. A variant runs with the same config and the overlay
that the manifest (gptdeploy.json) keeps for it under variants.NAME.genai: its graph file, and
past_present_share_buffer true for the variants whose attention reads a preallocated KV buffer. Each
prompt runs on its own; prints its text, or with --json gptdeploy generate --json's "prompt_ids" and
"generated_ids".
"""

import argparse
import json
from pathlib import Path

import onnxruntime_genai as og


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an export folder of a GPT-2 BPE model (gptdeploy export)")
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--variant", help="a variant of the manifest (fp32-fused, int8, q8, q4, fp16)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print the ids as JSON")
    args = parser.parse_args()

    config = og.Config(str(args.folder))
    if args.variant:
        manifest = json.loads((args.folder / "gptdeploy.json").read_text())
        config.overlay(json.dumps(manifest["variants"][args.variant]["genai"]))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    context = json.loads((args.folder / "genai_config.json").read_text())["model"]["context_length"]

    outputs = []
    for prompt in args.prompts:
        prompt_ids = [int(t) for t in tokenizer.encode(prompt)]
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=min(len(prompt_ids) + args.max_new_tokens, context))
        generator = og.Generator(model, params)
        generator.append_tokens(prompt_ids)
        while not generator.is_done():  # done at max_length or after end-of-text (which the sequence keeps)
            generator.generate_next_token()
        generated = [int(t) for t in generator.get_sequence(0)][len(prompt_ids):]
        outputs.append({"prompt_ids": prompt_ids, "generated_ids": generated})
        if not args.json:
            print(prompt + tokenizer.decode(generated))
            print("---")
    if args.json:
        print(json.dumps({"variant": args.variant, "outputs": outputs}))


if __name__ == "__main__":
    main()
