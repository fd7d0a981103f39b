"""The comparator: how far a runtime's outputs are from a reference's, and whether that is within tolerance.

One piece of code for every comparison gptdeploy makes: the validation of an export before it is
written, the validation of an ONNX Runtime variant, and `gptdeploy parity`. It takes host arrays and
knows nothing of runners or torch (Polygraphy's split: runners produce outputs, a comparator compares
them). Logits come as [positions, vocab] rows, one row per real (non-padding) position.

Metrics (their names are the keys of METRICS and of --tol):
  max_abs     max |test - ref| over the rows and the whole vocabulary
  mean_abs    mean |test - ref| over the same
  max_rel     max over rows of  max_v |test - ref| / max_v |ref|: the error relative to the row's
              largest logit. Elementwise |test - ref| / |ref| is useless for logits (they cross zero,
              and a tiny reference logit makes any error huge); floating-point error scales with the
              magnitude of what is computed, and the row's largest logit is that scale.
  cosine      min over rows of the cosine similarity of the two logit vectors
  top1        the fraction of rows whose most likely token (argmax) is the reference's
  flip_lead   where the top-1 token differs: the reference's lead of its own top-1 over the token the
              runtime chose, relative to the row's largest |logit| like max_rel; the largest over the
              rows, 0 without a flip. Reduced precisions may resolve a near tie the other way (a lead
              within their rounding error); a flip across a clear lead means another computation.
  top5        the mean over rows of |top-5 ∩ reference top-5| / 5
  kv_max_abs  max |KV - reference KV| over every layer's keys and values, at real positions
  nonfinite   the count of NaN and Inf values in the logits and the KV cache
  greedy      greedy generation on each runtime alone: the smallest fraction, over the prompts, of
              generated tokens that agree with the reference's before the first divergence
top1, top5 and greedy look only at ids below the tokenizer's vocabulary size (nanoGPT pads the
vocabulary to 50304; the extra ids are never generated); the other logit metrics at every id.

Tolerances: one table per precision (TOLERANCES). A profile says which metrics a kind of comparison
checks: `parity` all of them; `export` (the validation of an export or a variant before it is written)
all but the fractions top1 and top5 and greedy generation, because its few positions of random
token ids make a fraction of near ties meaningless (flip_lead still forbids a flip across a clear
lead) and it generates nothing. docs/parity.md has the measurements behind every figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from gptdeploy.errors import GptDeployError
from gptdeploy.precision import tolerance_key


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool  # checked as value >= tolerance; otherwise value <= tolerance
    summary: str  # for the table's legend and the JSON report


METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("max_abs", False, "max |logits - reference logits|"),
        Metric("mean_abs", False, "mean |logits - reference logits|"),
        Metric("max_rel", False, "max over positions of max|diff| / max|reference logit| of the position"),
        Metric("cosine", True, "min over positions of the cosine similarity of the logit vectors"),
        Metric("top1", True, "fraction of positions whose top-1 token is the reference's"),
        Metric("flip_lead", False, "largest reference lead (relative to max|reference logit|) overturned where "
                                   "the top-1 token differs; 0 without a flip"),
        Metric("top5", True, "mean overlap of the top-5 tokens with the reference's (fraction of 5)"),
        Metric("kv_max_abs", False, "max |KV cache - reference KV cache| at real positions"),
        Metric("nonfinite", False, "NaN and Inf values in the logits and the KV cache"),
        Metric("greedy", True, "greedy generation: smallest fraction of tokens that agree before the first "
                               "divergence, over the prompts"),
    ]
}
PROFILES = {
    "parity": tuple(METRICS),
    "export": ("max_abs", "mean_abs", "max_rel", "cosine", "flip_lead", "kv_max_abs", "nonfinite"),
}


def logits_metrics(test: np.ndarray, ref: np.ndarray, vocab_limit: int | None = None) -> dict:
    """The logit metrics of `test` against `ref`, both [positions, vocab]; see the module docstring.

    Also returns nan / inf (counts in test) and flip_lead_abs, flip_lead in logits (not relative).
    """
    if test.shape != ref.shape or test.ndim != 2 or test.shape[0] == 0:
        raise ValueError(f"expected two equal [positions, vocab] arrays, got {test.shape} and {ref.shape}")
    t, r = test.astype(np.float64), ref.astype(np.float64)
    diff = np.abs(t - r)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        row_scale = np.maximum(np.abs(r).max(-1), np.finfo(np.float64).tiny)
        norms = np.linalg.norm(t, axis=-1) * np.linalg.norm(r, axis=-1)
        dots = (t * r).sum(-1)
        # two zero vectors are the same vector; one zero vector is unlike any other; NaN stays NaN
        cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0),
                          np.where(np.linalg.norm(t, axis=-1) == np.linalg.norm(r, axis=-1), 1.0, 0.0))
        cosine[np.isnan(norms)] = np.nan
    limit = vocab_limit or t.shape[1]
    t_top, r_top = t[:, :limit], r[:, :limit]
    top1_test, top1_ref = _nan_to_neg_inf(t_top).argmax(-1), r_top.argmax(-1)
    flipped = top1_test != top1_ref
    rows = np.arange(len(r))
    lead = r[rows, top1_ref] - r[rows, top1_test]  # >= 0; 0 where the tokens agree
    top5_test, top5_ref = _top_k(t_top, 5), _top_k(r_top, 5)
    overlap = (top5_test[:, :, None] == top5_ref[:, None, :]).any(-1).sum(-1) / top5_ref.shape[1]
    return {
        "max_abs": _max(diff),
        "mean_abs": float(diff.mean()),
        "max_rel": _max(diff.max(-1) / row_scale),
        "cosine": float(np.min(cosine)),
        "top1": float(1.0 - flipped.mean()),
        "flip_lead": _max((lead / row_scale)[flipped]),
        "top5": float(overlap.mean()),
        "nan": int(np.isnan(test).sum()),
        "inf": int(np.isinf(test).sum()),
        "flip_lead_abs": _max(lead[flipped]),
    }


def cache_metrics(test: list[tuple[np.ndarray, np.ndarray]], ref: list[tuple[np.ndarray, np.ndarray]],
                  real: np.ndarray) -> dict:
    """kv_max_abs, and NaN/Inf counts of `test`, over a cache's real positions.

    test, ref: per layer (key, value), each [batch, n_head, length, head_dim] (Runner.cache_to_numpy);
    real: bool [batch, length], True where the attention mask is 1.
    """
    diffs, nan, inf = [0.0], 0, 0
    for test_kv, ref_kv in zip(test, ref, strict=True):
        for t, r in zip(test_kv, ref_kv):
            if t.shape != r.shape:
                raise ValueError(f"cache shapes differ: {t.shape} and {r.shape}")
            # [batch, n_head, length, head_dim] -> the (batch, length) pairs that are real
            t_real = t.transpose(0, 2, 1, 3)[real]
            r_real = r.transpose(0, 2, 1, 3)[real]
            diffs.append(_max(np.abs(t_real.astype(np.float64) - r_real.astype(np.float64))))
            nan += int(np.isnan(t_real).sum())
            inf += int(np.isinf(t_real).sum())
    return {"kv_max_abs": float(np.max(diffs)), "nan": nan, "inf": inf}  # np.max: NaN if any is


def step_metrics(test: list[np.ndarray], ref: list[np.ndarray], caches: list[dict], vocab_limit: int) -> dict:
    """Every metric but greedy over several cases' rows of one step (or of every step) together:
    test / ref, lists of [positions, vocab]; caches, their cache_metrics."""
    metrics = logits_metrics(np.concatenate(test), np.concatenate(ref), vocab_limit)
    metrics["kv_max_abs"] = worst([c["kv_max_abs"] for c in caches], higher_is_better=False)
    metrics["nan"] += sum(c["nan"] for c in caches)
    metrics["inf"] += sum(c["inf"] for c in caches)
    metrics["nonfinite"] = metrics["nan"] + metrics["inf"]
    return metrics


def agreeing_prefix(test: list[int], ref: list[int]) -> int:
    """How many tokens agree before the first divergence."""
    for i, (a, b) in enumerate(zip(test, ref)):
        if a != b:
            return i
    return min(len(test), len(ref))


def worst(values: list[float], higher_is_better: bool) -> float:
    if any(math.isnan(v) for v in values):
        return math.nan
    return min(values) if higher_is_better else max(values)


def _max(values: np.ndarray) -> float:
    """The max, NaN if any value is NaN (np.max does that; it says that something is broken)."""
    return float(values.max()) if values.size else 0.0


def _nan_to_neg_inf(x: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(x), -np.inf, x)


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    k = min(k, x.shape[1])
    return np.argpartition(-_nan_to_neg_inf(x), k - 1, axis=-1)[:, :k]


# --- tolerances ---

# One table per precision; None: reported, not checked. How each was chosen, with the measurements
# behind it, is in docs/parity.md: a round figure some 3-10x beyond the worst value measured on a
# trained model and on random ones. fp32 checks absolute differences (two fp32 runtimes differ by
# summation order only). Reduced precisions check relative ones (their error scales with the logits,
# whose size differs by model) and stay demanding on the top-1 token: it may differ only in near ties
# (flip_lead), and rarely (top1). Their greedy generation diverges after the first near tie resolved
# the other way, at no predictable token: reported, not checked.
TOLERANCES: dict[str, dict[str, float | None]] = {
    "fp32": {"max_abs": 1e-4, "mean_abs": 1e-5, "max_rel": 1e-5, "cosine": 0.999999, "top1": 0.99,
             "flip_lead": 1e-5, "top5": 0.99, "kv_max_abs": 1e-4, "nonfinite": 0, "greedy": 1.0},
    "fp16": {"max_abs": None, "mean_abs": None, "max_rel": 1e-2, "cosine": 0.9999, "top1": 0.99,
             "flip_lead": 5e-3, "top5": 0.95, "kv_max_abs": None, "nonfinite": 0, "greedy": None},
    "bf16": {"max_abs": None, "mean_abs": None, "max_rel": 5e-2, "cosine": 0.999, "top1": 0.95,
             "flip_lead": 2e-2, "top5": 0.9, "kv_max_abs": None, "nonfinite": 0, "greedy": None},
    "int8": {"max_abs": None, "mean_abs": None, "max_rel": 1e-1, "cosine": 0.999, "top1": 0.95,
             "flip_lead": 2e-2, "top5": 0.9, "kv_max_abs": None, "nonfinite": 0, "greedy": None},
    # int4: cosine and flip_lead cover GPT-2 124M's q4 variant with random weights (export-time inputs, measured
    # 2026-12-01: cosine 0.961, flip_lead 0.132, max_rel 0.31), whose near-uniform logits 4-bit weights move by a
    # third of their scale; trained models stay far inside (shakespeare q4: cosine 0.995). top1 and top5 keep
    # the trained and tiny models' bounds: random GPT-2 fails them (60% top-1), pass --tol to accept it.
    "int4": {"max_abs": None, "mean_abs": None, "max_rel": 5e-1, "cosine": 0.9, "top1": 0.8,
             "flip_lead": 3e-1, "top5": 0.8, "kv_max_abs": None, "nonfinite": 0, "greedy": None},
}


def tolerances_for(precision: str, profile: str = "parity") -> dict[str, float | None]:
    """The table of `precision` (a gptdeploy.precision name), with the metrics `profile` does not check
    set to None."""
    key = tolerance_key(precision)
    if key not in TOLERANCES:
        raise GptDeployError(f"no tolerances for precision {precision!r}; known: {', '.join(TOLERANCES)} "
                             f"(give every metric with --tol)")
    checked = PROFILES[profile]
    return {name: value if name in checked else None for name, value in TOLERANCES[key].items()}


def looser_precision(a: str, b: str) -> str:
    """Of two precisions, the one whose tolerances are the looser (the order of TOLERANCES)."""
    order = list(TOLERANCES)
    rank = {p: order.index(tolerance_key(p)) if tolerance_key(p) in order else len(order) for p in (a, b)}
    return a if rank[a] >= rank[b] else b


def parse_tolerances(specs: list[str]) -> dict[str, float]:
    """--tol values ("max_abs=1e-3", "top1=0.99") as {metric: tolerance}; GptDeployError for bad ones."""
    overrides = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        name = name.strip()
        if not sep or name not in METRICS:
            raise GptDeployError(f"--tol takes METRIC=VALUE with METRIC one of {', '.join(METRICS)}; got {spec!r}")
        try:
            overrides[name] = float(value)
        except ValueError:
            raise GptDeployError(f"--tol {name}: {value!r} is not a number") from None
        if not math.isfinite(overrides[name]):
            raise GptDeployError(f"--tol {name}: the tolerance must be a finite number, got {value!r}")
    return overrides


def passes(metric: str, value: float, tolerance: float | None) -> bool:
    """Whether value meets tolerance; NaN never does, an unchecked metric (None) always."""
    if tolerance is None:
        return True
    return value >= tolerance if METRICS[metric].higher_is_better else value <= tolerance


def passing_tolerance(metric: str, value: float) -> float | None:
    """The tolerance, rounded outward to 2 significant digits, that `value` would have passed.

    For metrics where higher is better (at most 1), the distance from 1 is what gets rounded:
    a cosine of 0.9999873 would have passed 0.999987, not 0.99. The result prints exactly (str) as
    a short decimal. None if nothing passes (NaN).
    """
    if math.isnan(value):
        return None
    if not METRICS[metric].higher_is_better:
        return _round_up(value)
    if value >= 1.0:
        return 1.0
    gap = float(f"{1.0 - value:.2g}")  # 1 - value carries float noise: 1 - 0.95 = 0.05000000000000004
    places = 1 - math.floor(math.log10(gap))  # the decimals of a 2-digit gap: 5.6e-6 -> 7
    tolerance = round(1.0 - gap, places)
    while tolerance > value:  # the gap was rounded down
        tolerance = round(tolerance - 10.0 ** -places, places)
    return tolerance


def _round_up(x: float) -> float:
    """x rounded up to 2 significant digits (3.21e-3 -> 3.3e-3); never below x."""
    if x <= 0 or math.isinf(x):
        return max(x, 0.0)
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    rounded = float(f"{math.ceil(x / step) * step:.2g}")
    while rounded < x:  # float rounding in the line above
        rounded = float(f"{rounded + step:.2g}")
    return rounded


# --- checks ---


@dataclass
class Check:
    """One metric against its tolerance, over every step of a comparison."""

    metric: str
    value: float  # over every step's positions together (for the max and min metrics: the worst step)
    tolerance: float | None  # None: reported, not checked
    passed: bool
    failing_steps: list[str] = field(default_factory=list)
    passing_tolerance: float | None = None  # what would have passed (None: nothing would, the value is NaN)
    steps_checked: int = 1  # how many steps the metric was checked at (1: greedy generation)

    def describe(self) -> str:
        """'max_abs 3.2e-03 > 1e-04 at prefill, decode 1 (passes with --tol max_abs=0.0033)'"""
        op = "<" if METRICS[self.metric].higher_is_better else ">"
        if not self.failing_steps:
            where = ""
        elif len(self.failing_steps) == self.steps_checked > 1:
            where = " at every step"
        else:
            where = f" at {', '.join(self.failing_steps)}"
        fix = ("no tolerance passes a NaN" if self.passing_tolerance is None
               else f"passes with --tol {self.metric}={self.passing_tolerance}")
        if METRICS[self.metric].higher_is_better and math.isfinite(self.value):  # a fraction, as --tol takes it
            value = f"{math.floor(self.value * 1e6) / 1e6:g}"
        else:
            value = f"{self.value:.3g}"
        return f"{self.metric} {value} {op} {format_tolerance(self.tolerance)}{where} ({fix})"


def check(metric: str, value: float, tolerance: float | None, per_step: dict[str, float] | None = None) -> Check:
    """`value` of `metric` against `tolerance`; per_step (step label -> value) names the steps that miss it."""
    per_step = per_step or {}
    failing = [step for step, v in per_step.items() if not passes(metric, v, tolerance)]
    return Check(metric, value, tolerance, passes(metric, value, tolerance), failing, passing_tolerance(metric, value),
                 max(len(per_step), 1))


def format_tolerance(tolerance: float | None) -> str:
    return "-" if tolerance is None else f"{tolerance:.6g}"
