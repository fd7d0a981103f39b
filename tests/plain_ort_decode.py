"""Greedy decoding with an export folder and nothing but onnxruntime and numpy (no gptdeploy, no torch).

How an app outside gptdeploy uses the folder: the first step passes past tensors of length 0, every
later step the previous step's presents. Usage:

    python plain_ort_decode.py FOLDER PROMPTS.npz STEPS OUT.npz

PROMPTS.npz holds input_ids and attention_mask [batch, seq] (left-padded). OUT.npz gets the logits
of every step (step0 = the prefill's, [batch, seq, vocab]; stepN = [batch, 1, vocab]) and the ids chosen.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

folder, prompts, steps, out = Path(sys.argv[1]), np.load(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
config = json.loads((folder / "config.json").read_text())
fp16 = config["torch_dtype"] == "float16"
session = ort.InferenceSession(str(folder / "onnx" / ("model_fp16.onnx" if fp16 else "model.onnx")),
                               providers=["CPUExecutionProvider"])
n_layer, n_head, head_dim = config["n_layer"], config["n_head"], config["n_embd"] // config["n_head"]

ids, mask = prompts["input_ids"], prompts["attention_mask"]
positions = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)
batch = ids.shape[0]
past = {f"past_key_values.{i}.{kv}": np.zeros((batch, n_head, 0, head_dim), np.float16 if fp16 else np.float32)
        for i in range(n_layer) for kv in ("key", "value")}
results, chosen = {}, []
for step in range(steps + 1):
    outputs = session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past})
    names = [o.name for o in session.get_outputs()]
    logits = outputs[names.index("logits")]
    results[f"step{step}"] = logits
    past = {f"past_key_values.{name.split('.', 1)[1]}": value
            for name, value in zip(names, outputs) if name.startswith("present.")}
    ids = logits[:, -1, :].argmax(-1)[:, None].astype(np.int64)
    chosen.append(ids)
    mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
    positions = positions[:, -1:] + 1

assert "gptdeploy" not in sys.modules and "torch" not in sys.modules
np.savez(out, chosen=np.concatenate(chosen[:-1], axis=1), **results)
