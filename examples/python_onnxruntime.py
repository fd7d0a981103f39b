"""Greedy generation from a gptdeploy export folder with onnxruntime, numpy and tokenizers: no gptdeploy, no torch.

    pip install onnxruntime numpy tokenizers
    python python_onnxruntime.py shakespeare-onnx "ROMEO:" "JULIET: O" --max-new-tokens 20
    python python_onnxruntime.py shakespeare-onnx "ROMEO:" --file onnx/model_int8.onnx   # a variant

The prompts run as one left-padded batch through the graph with the KV cache (onnx/model.onnx by default,
or any variant that `gptdeploy optimize` wrote; they all have the same inputs and outputs). The first step
passes a past of length 0, every later step the previous step's presents. Prints the text of each row and,
with --json, gptdeploy generate --json's "prompt_ids" and "generated_ids" per row.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an export folder (gptdeploy export)")
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--file", help="the graph, relative to the folder (default: the manifest's with_past graph)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print the ids as JSON")
    args = parser.parse_args()

    manifest = json.loads((args.folder / "gptdeploy.json").read_text())
    config = json.loads((args.folder / "config.json").read_text())
    eos = json.loads((args.folder / "generation_config.json").read_text())["eos_token_id"]
    tokenizer = Tokenizer.from_file(str(args.folder / "tokenizer.json"))  # GPT-2 BPE exports have one
    session = ort.InferenceSession(str(args.folder / (args.file or manifest["graphs"]["with_past"]["file"])),
                                   providers=["CPUExecutionProvider"])
    past_type = NUMPY_TYPES[next(i.type for i in session.get_inputs() if i.name.startswith("past_key_values."))]
    n_layer, n_head = config["n_layer"], config["n_head"]
    head_dim = config["n_embd"] // n_head

    # Left padding: the prompts end at the same column; padded columns have mask 0 and are never attended to.
    prompt_ids = [tokenizer.encode(p).ids for p in args.prompts]
    width, batch = max(map(len, prompt_ids)), len(prompt_ids)
    ids = np.full((batch, width), eos, np.int64)
    mask = np.zeros((batch, width), np.int64)
    for row, p in enumerate(prompt_ids):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # each row counts its own tokens from 0
    past = {f"past_key_values.{i}.{kv}": np.zeros((batch, n_head, 0, head_dim), past_type)
            for i in range(n_layer) for kv in ("key", "value")}
    output_names = [o.name for o in session.get_outputs()]

    generated = [[] for _ in range(batch)]
    done = np.zeros(batch, bool)
    for _ in range(min(args.max_new_tokens, config["n_positions"] - width)):
        outputs = dict(zip(output_names, session.run(None, {"input_ids": ids, "attention_mask": mask,
                                                            "position_ids": positions, **past})))
        past = {f"past_key_values.{name[len('present.'):]}": value
                for name, value in outputs.items() if name.startswith("present.")}
        next_ids = outputs["logits"][:, -1, :].argmax(-1)
        for row in np.flatnonzero(~done):
            generated[row].append(int(next_ids[row]))
        done |= next_ids == eos  # a row ends at end-of-text (included, as gptdeploy does)
        if done.all():
            break
        ids = next_ids[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1

    if args.json:
        print(json.dumps({"file": args.file or manifest["graphs"]["with_past"]["file"],
                          "outputs": [{"prompt_ids": p, "generated_ids": g} for p, g in zip(prompt_ids, generated)]}))
    else:
        for prompt, new in zip(args.prompts, generated):
            print(prompt + tokenizer.decode(new))
            print("---")


if __name__ == "__main__":
    main()
