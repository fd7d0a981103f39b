"""Precisions, and the one resolver from what a user asks for to what runs.

A precision name means one thing here: the number format of the weights that a runner computes with.
fp32, fp16 and bf16 are dtypes of the PyTorch model; an export's graphs come in fp32 or fp16; int8
and int4 are the weights of ONNX Runtime variants (an export's onnx/model_int8.onnx, model_q4.onnx).

    resolve(CHECKPOINT, "bf16", None)                      -> Resolved("bf16", variant=None)
    resolve(EXPORT, "int4", None, runs_variants=True)      -> Resolved("int4", variant="q4")
    resolve(EXPORT, None, "fp32-fused", runs_variants=True) -> Resolved("fp32", variant="fp32-fused")
    resolve(EXPORT, "fp16", None, folder_precision="fp32", folder_variants={"fp16"}) -> the fp16 variant

The CLI, generation, parity, bench and the runtime registry all ask `resolve`, so that
`--precision int8`, `--variant int8` and `ort:int8` mean the same everywhere.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import PRECISION_SUFFIXES, VARIANTS

CHECKPOINT, EXPORT = "checkpoint", "export folder"  # what a runtime runs: the PyTorch model, or ONNX graphs


@dataclass(frozen=True)
class Precision:
    name: str
    # int8 / int4: the values plus, per block of 128 (the variants' default quantization), an fp32 scale, and
    # for int4 a 4-bit zero point (int8 is symmetric: none)
    bytes_per_weight: float
    kv: str  # the KV cache's precision (weight-only quantization keeps an fp32 cache)
    tolerances: str  # its row of gptdeploy.compare.TOLERANCES


PRECISIONS: dict[str, Precision] = {p.name: p for p in [
    Precision("fp32", 4, "fp32", "fp32"),
    Precision("fp16", 2, "fp16", "fp16"),
    Precision("bf16", 2, "bf16", "bf16"),
    Precision("int8", 1 + 4 / 128, "fp32", "int8"),
    Precision("int4", 0.5 + 4.5 / 128, "fp32", "int4"),
]}
ALIASES = {"q4": "int4", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
MODEL_PRECISIONS = ("fp32", "fp16", "bf16")  # what the PyTorch model runs in
# Precision names that stand for an ONNX Runtime variant of an export
VARIANT_OF_PRECISION = {"int8": "int8", "q8": "q8", "int4": "q4", "q4": "q4", "fp32-fused": "fp32-fused"}


def canonical(name: str) -> str:
    """fp32, fp16, bf16, int8 or int4 for any name gptdeploy accepts (q4, float16, a variant's name)."""
    if name in VARIANTS:
        return VARIANTS[name].precision
    name = ALIASES.get(name, name)
    if name not in PRECISIONS:
        known = sorted({*PRECISIONS, *ALIASES, *VARIANTS})
        raise GptDeployError(f"unknown precision {name!r}; choose one of {', '.join(known)}")
    return name


def tolerance_key(name: str) -> str:
    """The row of the comparator's tolerance table for a precision or variant name (unknown: itself)."""
    try:
        return PRECISIONS[canonical(name)].tolerances
    except GptDeployError:
        return name


@dataclass(frozen=True)
class Resolved:
    precision: str  # canonical: what the runner computes with
    variant: str | None = None  # an ONNX Runtime variant of the export, or None for its own graphs

    @property
    def export_precision(self) -> str:
        """The precision of the export whose graphs (or variant) run: variants are made from fp32 exports."""
        return "fp32" if self.variant else self.precision


def resolve(runs: str, precision: str | None, variant: str | None, *, runtime: str = "this",
            runs_variants: bool = False, folder_precision: str | None = None,
            folder_variants: Collection[str] = ()) -> Resolved:
    """What runs, from --precision and --variant (either may be None) for a runtime that runs `runs`.

    runs_variants: whether the runtime runs ONNX Runtime variants (ort, ort-cuda).
    folder_precision, folder_variants: an export folder's own precision and the variants it holds,
        when the source is an export folder.
    """
    if runs == CHECKPOINT:
        if variant is not None or precision in VARIANT_OF_PRECISION:
            raise _not_variants(runtime, variant or VARIANT_OF_PRECISION[precision])
        name = canonical(precision or "fp32")
        if name not in MODEL_PRECISIONS:
            raise GptDeployError(f"{runtime} runs in {', '.join(MODEL_PRECISIONS)}, not {precision}")
        return Resolved(name)

    named = VARIANT_OF_PRECISION.get(precision)
    if variant is None and named is None and precision == "fp16" and folder_precision == "fp32" \
            and "fp16" in folder_variants:
        named = "fp16"  # an fp32 export runs in fp16 through its fp16 variant
    variant = variant or named
    if variant is not None:
        if variant not in VARIANTS:
            raise GptDeployError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if precision is not None and canonical(precision) != VARIANTS[variant].precision and named != variant:
            raise GptDeployError(f"variant {variant} runs in {VARIANTS[variant].precision}, not {precision}")
        if not runs_variants:
            raise _not_variants(runtime, variant)
        if folder_precision not in (None, "fp32"):
            raise GptDeployError(f"variants are made from fp32 exports; this one is {folder_precision}")
        return Resolved(VARIANTS[variant].precision, variant)
    name = canonical(precision) if precision else (folder_precision or "fp32")
    if name not in PRECISION_SUFFIXES:
        raise GptDeployError(f"ONNX exports are {' or '.join(PRECISION_SUFFIXES)}, not {precision}")
    if folder_precision not in (None, name):
        raise GptDeployError(f"this is a {folder_precision} export; it cannot run in {name} (export the "
                             f"checkpoint again with --precision {name})")
    return Resolved(name)


def _not_variants(runtime: str, variant: str) -> GptDeployError:
    return GptDeployError(f"variants are ONNX Runtime graphs: the {runtime} runtime cannot run variant {variant} "
                          f"(use --runtime ort, or ort-cuda for fp16)")
