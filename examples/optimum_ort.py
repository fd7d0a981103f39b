"""Greedy generation from a gptdeploy export folder with Hugging Face Optimum's ORTModelForCausalLM.

    pip install "optimum-onnx[onnxruntime]"
    python optimum_ort.py shakespeare-onnx "ROMEO:" --max-new-tokens 20
    python optimum_ort.py shakespeare-onnx "ROMEO:" --file model_q4.onnx    # a variant, by its file in onnx/

Optimum reads config.json, the tokenizer files and the graph with the KV cache (onnx/model.onnx, or a
variant's file); the variants keep model.onnx's inputs and outputs, so each loads the same way. Each
prompt runs on its own; prints its text, or with --json gptdeploy generate --json's "prompt_ids" and
"generated_ids".
"""

import argparse
import json
from pathlib import Path

from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an export folder of a GPT-2 BPE model (gptdeploy export)")
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--file", default="model.onnx", help="the graph in onnx/ (default model.onnx)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print the ids as JSON")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model = ORTModelForCausalLM.from_pretrained(args.folder, subfolder="onnx", file_name=args.file, use_cache=True)
    outputs = []
    for prompt in args.prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        sequence = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id)[0].tolist()
        prompt_ids = inputs.input_ids[0].tolist()
        outputs.append({"prompt_ids": prompt_ids, "generated_ids": sequence[len(prompt_ids):]})
        if not args.json:
            print(prompt + tokenizer.decode(sequence[len(prompt_ids):]))
            print("---")
    if args.json:
        print(json.dumps({"file": f"onnx/{args.file}", "outputs": outputs}))


if __name__ == "__main__":
    main()
