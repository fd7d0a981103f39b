"""The fp32 matrix products of one gpt2 decode step alone, in PyTorch and in ONNX Runtime: the floor of each.

    python scripts/matmul_floor.py [--threads 2] [--rounds 7]

A decode step at batch 1 multiplies one 768-wide row by each of gpt2's 49 weight matrices (per layer the
attention's 768x2304 and 768x768, the MLP's 768x3072 and 3072x768; then the 768x50257 lm_head): 495 MB of
fp32 weights, each read once. This times exactly those products, with the same random weights, as
transformers runs them (torch.nn.functional.linear) and as an ONNX Runtime graph of MatMul nodes runs
them, taking turns, `--rounds` rounds of 20 steps each; prints the medians, the bandwidth each reaches
and their ratio. What hf's decode step costs beyond its products, and what gptdeploy's fp32 variant can
gain over hf at most, follow from it (docs/cpu-speed.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12 + [(768, 50257)]  # (in, out)


def ort_session(weights: list[np.ndarray], threads: int) -> ort.InferenceSession:
    nodes, outputs = [], []
    for i, w in enumerate(weights):
        nodes.append(helper.make_node("MatMul", [f"x{w.shape[0]}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, w.shape[1]]))
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in (768, 3072)]
    graph = helper.make_graph(nodes, "step_products", inputs, outputs,
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # 495 MB: under protobuf's 2 GB limit, so the graph goes to ONNX Runtime as bytes
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((k, n), dtype=np.float32) * 0.02) for k, n in SHAPES]
    linear = [torch.from_numpy(np.ascontiguousarray(w.T)) for w in weights]  # nn.Linear keeps [out, in]
    session = ort_session(weights, args.threads)
    x = {k: rng.standard_normal((1, k), dtype=np.float32) for k in (768, 3072)}
    feeds = {f"x{k}": v for k, v in x.items()}
    tx = {k: torch.from_numpy(v) for k, v in x.items()}

    def torch_step():
        for w in linear:
            torch.nn.functional.linear(tx[w.shape[1]], w)

    def ort_step():
        session.run(None, feeds)

    load_start = os.getloadavg()[0]
    times = {"torch": [], "ort": []}
    with torch.inference_mode():
        for r in range(args.rounds + 1):  # the first round warms up
            for name, step in (("torch", torch_step), ("ort", ort_step)):
                start = time.perf_counter()
                for _ in range(20):
                    step()
                if r:
                    times[name].append((time.perf_counter() - start) / 20)
    weight_bytes = sum(w.nbytes for w in weights)
    for name in times:
        ms = statistics.median(times[name]) * 1e3
        print(f"{name:5s} {ms:6.2f} ms per step ({weight_bytes / ms / 1e6:.1f} GB/s), rounds "
              f"{', '.join(f'{t * 1e3:.2f}' for t in times[name])}")
    ratio = statistics.median(times["torch"]) / statistics.median(times["ort"])
    print(f"torch / ort: {ratio:.2f}; {weight_bytes / 1e6:.1f} MB of fp32 weights; {args.threads} threads; "
          f"load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
