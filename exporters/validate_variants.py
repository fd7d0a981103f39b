"""Validation of an ONNX Runtime variant before it is written: the variant, run the way gptdeploy runs
it, against the reference.

The inputs are exporters.validate's: a batch of two prompts of different lengths (the shorter
left-padded), a prefill, then DECODE_STEPS decode steps with the KV cache, each step feeding the
reference's greedy token, so both sides see the same sequence. The variant runs in
runtimes.ort.OrtRunner, with its own KV cache handling (preallocated shared buffers, with room to
spare, for the CPU variants). The reference is the PyTorch model when given, else the export's
portable onnx/model.onnx in ONNX Runtime (itself validated against the PyTorch model at export).

Checked at every step (bounds in BOUNDS, the README says how they were chosen):
- finite logits and KV cache;
- logits: max |variant - reference| over every position, padding included, within the bound:
  absolute for fp32-fused (the fp32 parity of the export, 1e-4), relative to the step's largest
  reference logit for the others (their error scales with the logits);
- fp16, int8, q4: the cosine similarity of the variant's and the reference's logit vectors, at every
  real (not padding) position, at least the bound;
- top-1: where the reference's two best logits are further apart than the bound, the variant picks
  the same token (decisive top-1, 100%); the plain top-1 agreement over real positions is reported;
- fp32-fused only: its KV cache within the same absolute bound.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import ExportFolder

DECODE_STEPS = 3  # the inputs of exporters.validate (which needs torch; this module needs it only for a
PROMPT_LENGTHS = (9, 5)  # PyTorch reference)


@dataclass(frozen=True)
class Bounds:
    max_abs: float | None = None  # absolute bound on |logits diff|
    max_rel: float | None = None  # bound on |logits diff| / max(1, max |reference logits| of the step)
    min_cosine: float | None = None  # of the variant's and the reference's logit vectors, at every real position
    check_kv: bool = False  # the KV cache within max_abs too

    def logits_bound(self, reference: np.ndarray) -> float:
        if self.max_abs is not None:
            return self.max_abs
        return self.max_rel * max(1.0, float(np.abs(reference).max()))


# fp32-fused: the export's fp32 bound. fp16: the export's fp16 bound (exporters.validate). int8, q4:
# about twice the worst measured on the models at hand (random-weight GPT-2 is the worst; see the README);
# they catch a broken graph, not a slightly worse quantization: its quality is measured on a trained model.
BOUNDS = {
    "fp32-fused": Bounds(max_abs=1e-4, check_kv=True),
    "fp16": Bounds(max_rel=1e-2, min_cosine=0.999),
    "int8": Bounds(max_rel=5e-2, min_cosine=0.999),
    "q4": Bounds(max_rel=5e-1, min_cosine=0.9),
}


def bounds_for(variant: str) -> Bounds:
    return BOUNDS[variant]


def validate_variant(staging, folder: ExportFolder, name: str, entry: dict, reference_model, bounds: Bounds,
                     *, seed: int = 1234) -> dict:
    """Runs variant `name`, staged in the folder `staging` (its file at entry["file"] there), against the
    reference; returns the manifest's validation entry (with "passed" and, if not, "failures")."""
    from runtimes.ort import OrtRunner, SessionConfig

    staged = ExportFolder(staging, {**folder.manifest, "variants": {name: entry}})
    runner = OrtRunner(staged, SessionConfig(), variant=name)
    reference, described = _reference(folder, reference_model)
    config = folder.config
    token_limit = min(folder.manifest["tokenizer"]["vocab_size"], config["vocab_size"])
    lengths = [min(n, config["block_size"] - DECODE_STEPS) for n in PROMPT_LENGTHS]
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, token_limit, (len(lengths), max(lengths)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, ids.shape[1] - n:] = 1
    positions = np.maximum(mask.cumsum(-1) - 1, 0)

    steps, failures = [], []
    ref_cache, cache = reference.new_cache(len(lengths)), runner.new_cache(len(lengths))
    for step in range(DECODE_STEPS + 1):
        ref_logits, ref_cache = reference.step(ids, mask, positions, ref_cache)
        logits, cache = runner.step(ids, mask, positions, cache)
        label = "prefill" if step == 0 else f"decode {step}"
        result = _compare(label, logits, ref_logits, runner.cache_to_numpy(cache), reference.cache_to_numpy(ref_cache),
                          mask[:, -ids.shape[1]:].astype(bool), bounds)
        failures += [f"{label}: {f}" for f in result.pop("failures")]
        steps.append(result)
        ids = ref_logits[:, -1, :token_limit].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
        positions = positions[:, -1:] + 1
    runner.close()
    reference.close()
    return {
        "passed": not failures, "runtime": "onnxruntime CPUExecutionProvider", "reference": described,
        "bounds": {k: v for k, v in asdict(bounds).items() if v is not None},
        "max_abs_diff": max(s["max_abs_diff"] for s in steps),
        "max_rel_diff": max(s["max_rel_diff"] for s in steps),
        "top1_agreement": min(s["top1_agreement"] for s in steps),
        "decisive_top1_agreement": min(s["decisive_top1_agreement"] for s in steps),
        "cosine": min(s["cosine"] for s in steps),
        "kv_max_abs_diff": max(s["kv_max_abs_diff"] for s in steps),
        "steps": steps,
        **({"failures": "; ".join(failures)} if failures else {}),
    }


def _reference(folder: ExportFolder, model):
    """The reference runner: the PyTorch model (fp32, CPU), or the folder's portable graph in ONNX Runtime."""
    from runtimes.ort import OrtRunner, SessionConfig

    if model is None:
        return OrtRunner(folder, SessionConfig()), f"{folder.manifest['graphs']['with_past']['file']} in ONNX Runtime"
    import torch

    from runtimes.torch_runner import TorchRunner

    param = next(model.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu":
        raise GptDeployError(f"the reference model must be fp32 on the CPU, not {param.dtype} on {param.device}")
    return TorchRunner(model), "the PyTorch model (fp32)"


def _compare(label: str, logits, ref_logits, kv, ref_kv, real: np.ndarray, bounds: Bounds) -> dict:
    failures = []
    finite = bool(np.isfinite(logits).all() and all(np.isfinite(t).all() for pair in kv for t in pair))
    diff = float(np.abs(logits - ref_logits).max())
    scale = max(1.0, float(np.abs(ref_logits).max()))
    bound = bounds.logits_bound(ref_logits)
    kv_diff = max(float(np.abs(t.astype(np.float32) - r).max()) for pair, ref_pair in zip(kv, ref_kv)
                  for t, r in zip(pair, ref_pair))
    norms = np.linalg.norm(logits, axis=-1) * np.linalg.norm(ref_logits, axis=-1)
    cosine = float(((logits * ref_logits).sum(-1) / np.maximum(norms, 1e-30))[real].min())
    agree = logits.argmax(-1) == ref_logits.argmax(-1)
    top_two = np.sort(ref_logits, axis=-1)[..., -2:]
    decisive = real & (top_two[..., 1] - top_two[..., 0] > bound)
    decisive_agreement = float(agree[decisive].mean()) if decisive.any() else 1.0
    if not finite:
        failures.append("non-finite values in the logits or the KV cache")
    if not diff <= bound:
        failures.append(f"max |logits diff| {diff:.3g} > bound {bound:.3g}")
    if bounds.min_cosine is not None and not cosine >= bounds.min_cosine:
        failures.append(f"logits cosine similarity {cosine:.4f} < {bounds.min_cosine}")
    if bounds.check_kv and not kv_diff <= bounds.max_abs:
        failures.append(f"max |KV cache diff| {kv_diff:.3g} > bound {bounds.max_abs:.3g}")
    if decisive_agreement < 1.0:
        failures.append(f"top-1 differs where the reference's lead exceeds the bound ({decisive_agreement:.1%} agree)")
    return {"step": label, "max_abs_diff": diff, "max_rel_diff": diff / scale, "bound": bound, "cosine": cosine,
            "top1_agreement": float(agree[real].mean()), "decisive_top1_agreement": decisive_agreement,
            "decisive_positions": int(decisive.sum()), "kv_max_abs_diff": kv_diff, "finite": finite,
            "failures": failures}
