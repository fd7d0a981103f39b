"""`gptdeploy bench`: runtimes side by side on the same model, the same inputs and the same machine.

    report = run_bench(BenchSettings("gpt2", ("hf", "torch", "ort"), batches=(1, 8), random_weights=True))
    print_report(report)

What is measured, per runtime and batch size (runtimes.base.Runner.step, logits of the last position
only, as generation asks for them):
- prefill: the prompt (prompt_len tokens per row) through the model from an empty cache; latency and
  tokens/s (batch * prompt_len / latency);
- decode: the new_tokens - 1 steps after it that a generation of new_tokens tokens runs, one token per
  row each, with the KV cache; p50 / p90 / p99 of the per-step latency over every step of every
  repeat, and tokens/s (batch * steps / the median repeat's decode time);
- generation: gptdeploy.generation.generate, greedy, end-of-text not stopping it: time to first
  token and total time for new_tokens tokens, the token choice (argmax) included.

Every runtime does identical work: the prompt and the decode inputs are fixed token ids drawn from
`seed` (decode feeds them rather than the model's choices, so no runtime's rounding changes the
work). Per batch size: `warmup` untimed rounds, `repeat` timed ones, then `repeat` generations;
figures are medians.

The runtimes take turns. Each is set up, one after the other, in a process of its own
(bench_session.Worker), and then they run round by round: round 1 of every runtime, round 2 of
every runtime, ... On a machine whose speed drifts (other work; on a shared virtual machine, a
neighbour on the host's memory bus: the read bandwidth can move twofold within an hour), the drift
then slows every runtime alike instead of whichever ran at the wrong moment, and the ratios hold.

Set-up is timed apart: model load (torch, hf: the checkpoint, and for hf the conversion to
transformers), export to ONNX (once, in a process of its own; later runs reuse the export cache),
session creation, engine build (trt). Memory is each runtime's own process's: its resident memory
before set-up (Python and the libraries), the peak during set-up, and the peak during the
measurements (reset after set-up, on Linux). On CUDA, the GPU memory the process held at its peak
(NVML, so every allocator counts) and, for runtimes that allocate through PyTorch, PyTorch's own.

Timing: time.perf_counter around each call. step() returns the logits on the host, so a timed step
includes all of its GPU work; where PyTorch drives a CUDA device the device is also synchronised
before and after each timed call.

Decode at small batch is bound by memory bandwidth: every weight is read once per step. The report
sets each CPU runtime's decode step against that floor: (bytes of weights read per step + the KV
cache at the mean past length) / the machine's read bandwidth (gptdeploy.machine), measured between
the timed rounds while every runtime is idle (the median of those measurements).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import is_export_folder, read_export

REPORT_FORMAT = "gptdeploy-bench"
REPORT_VERSION = 1
# Bytes per weight. int8 and int4 (the ONNX Runtime variants): the quantized values plus, per block of
# 32, an fp32 scale and a zero point (8 or 4 bits), as exporters.ort_optimize writes them by default.
PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1 + 5 / 32, "int4": 0.5 + 4.5 / 32}
KV_PRECISION = {"int8": "fp32", "int4": "fp32"}  # weight-only quantization keeps an fp32 KV cache
OK, UNAVAILABLE, FAILED = "ok", "unavailable", "failed"
TURN_PAUSE_S = 0.05  # between two runtimes' turns: the last one's spinning worker threads go to sleep
Progress = Callable[[str, int], None]  # (what is running now, units of work just done)


@dataclass(frozen=True)
class BenchSettings:
    source: str  # an export folder, or anything gptdeploy.load takes
    runtimes: tuple[str, ...]
    batches: tuple[int, ...] = (1,)
    prompt_len: int = 128
    new_tokens: int = 128
    warmup: int = 1
    repeat: int = 3
    threads: int = 0  # intra-op threads of torch and ONNX Runtime; 0: the machine's physical cores
    precision: str | None = None  # None: fp32, or an export folder's own precision
    device: str | None = None  # torch and hf: None picks cuda when PyTorch sees a GPU, else cpu
    ort_optimization: str = "all"  # ONNX Runtime graph optimization level (runtimes.ort.OPTIMIZATION_LEVELS)
    random_weights: bool = False
    seed: int = 0  # seed of the random weights and of the token ids fed to every runtime
    isolate: bool = True  # each runtime in its own process (attributable memory); False: in this one
    bandwidth_mib: int = 512  # the array the read bandwidth is measured on: far larger than any cache

    def check(self) -> None:
        from runtimes.ort import OPTIMIZATION_LEVELS
        from runtimes.registry import RUNTIMES

        if not self.runtimes:
            raise GptDeployError("no runtime given")
        unknown = [split_runtime(r)[0] for r in self.runtimes if split_runtime(r)[0] not in RUNTIMES]
        if unknown:
            raise GptDeployError(f"unknown runtime {unknown[0]!r}; choose among {', '.join(RUNTIMES)}")
        for name in self.runtimes:
            check_runtime_variant(name)
        if len(set(self.runtimes)) != len(self.runtimes):
            raise GptDeployError(f"a runtime is named twice in {','.join(self.runtimes)}")
        if not self.batches or min(self.batches) < 1:
            raise GptDeployError("batch sizes must be >= 1")
        if self.prompt_len < 1:
            raise GptDeployError(f"--prompt-len must be >= 1, got {self.prompt_len}")
        if self.new_tokens < 2:
            raise GptDeployError(f"--new-tokens must be >= 2 (one from the prefill, the rest decode), "
                                 f"got {self.new_tokens}")
        if self.warmup < 0 or self.repeat < 1:
            raise GptDeployError("--warmup must be >= 0 and --repeat >= 1")
        if self.threads < 0:
            raise GptDeployError(f"--threads must be >= 0 (0: one per physical core), got {self.threads}")
        if self.precision in KV_PRECISION:  # int8, int4: weights of ONNX Runtime variants, not a model's dtype
            raise GptDeployError(f"--precision {self.precision}: quantized weights are ONNX Runtime variants; measure "
                                 f"them with --variant int8,q4 (or --runtime ort:int8,ort:q4)")
        if self.precision not in (None, *PRECISION_BYTES):
            raise GptDeployError(f"unknown precision {self.precision!r}; choose one of fp32, fp16, bf16")
        if self.ort_optimization not in OPTIMIZATION_LEVELS:
            raise GptDeployError(f"unknown graph optimization level {self.ort_optimization!r}; choose one of "
                                 f"{', '.join(OPTIMIZATION_LEVELS)}")


def split_runtime(name: str) -> tuple[str, str | None]:
    """"ort:q4" -> ("ort", "q4"): a runtime, and the ONNX Runtime variant of the export it runs (or None)."""
    runtime, _, variant = name.partition(":")
    return runtime, variant or None


def check_runtime_variant(name: str) -> None:
    from gptdeploy.export_folder import VARIANTS

    runtime, variant = split_runtime(name)
    if variant is None:
        return
    if variant not in VARIANTS:
        raise GptDeployError(f"{name}: unknown variant {variant!r}; choose among {', '.join(VARIANTS)}")
    if runtime not in ("ort", "ort-cuda"):
        raise GptDeployError(f"{name}: variants are ONNX Runtime graphs, for ort and ort-cuda")


def expand_variants(runtimes: tuple[str, ...], variants: str | None) -> tuple[str, ...]:
    """--variant V1,V2: each ort / ort-cuda runtime becomes RUNTIME:V1, RUNTIME:V2 ("export": the export's
    own graph, the runtime's plain name)."""
    if variants is None:
        return runtimes
    chosen = [v.strip() for v in variants.split(",") if v.strip()]
    if not chosen:
        raise GptDeployError("--variant names no variant")
    expanded = []
    for name in runtimes:
        if name not in ("ort", "ort-cuda"):
            expanded.append(name)
            continue
        expanded += [name if v == "export" else f"{name}:{v}" for v in chosen]
    return tuple(expanded)


# ---------------------------------------------------------------------------------------------------
# The model being measured


@dataclass
class ModelUnderTest:
    config: dict  # GPTConfig fields
    weights: str  # where the weights come from, in words
    export_folder: str | None  # the source itself when it is an export folder
    precision: str  # of the export folder, or the one asked for (fp32 by default)

    @property
    def parameters(self) -> int:
        """All parameters, the tied lm_head counted once (GPT.num_params)."""
        c = self.config
        n, bias = c["n_embd"], c.get("bias", True)
        per_layer = 12 * n * n + (13 * n if bias else 2 * n)  # 4 matrices, their biases, 2 LayerNorms
        return c["vocab_size"] * n + c["block_size"] * n + c["n_layer"] * per_layer + (2 * n if bias else n)

    def weight_bytes_per_step(self, precision: str) -> int:
        """Bytes of weights a decode step reads: all but the position table, of which it reads one row."""
        n = self.config["n_embd"]
        return round((self.parameters - self.config["block_size"] * n + n) * PRECISION_BYTES[precision])

    def kv_bytes(self, batch: int, length: int, precision: str) -> int:
        """Bytes of a KV cache of `length` positions (keys and values, every layer)."""
        c = self.config
        return 2 * c["n_layer"] * batch * length * c["n_embd"] * PRECISION_BYTES[KV_PRECISION.get(precision, precision)]


def model_under_test(settings: BenchSettings) -> ModelUnderTest:
    """The source's architecture, checked before any runtime starts (a bad source is one error)."""
    if is_export_folder(Path(settings.source)):
        folder = read_export(settings.source)
        if settings.precision not in (None, folder.precision):
            raise GptDeployError(f"{settings.source} is a {folder.precision} export; it cannot run in "
                                 f"{settings.precision}")
        origin = folder.manifest.get("source", {}).get("origin", "unknown")
        return ModelUnderTest(folder.config, f"export folder ({origin})", str(folder.path), folder.precision)
    from gptdeploy.loading import load

    loaded = load(settings.source, weights="random" if settings.random_weights else None, seed=settings.seed)
    return ModelUnderTest(loaded.config.to_dict(), loaded.origin, None, settings.precision or "fp32")


# ---------------------------------------------------------------------------------------------------
# From raw times to figures


def summarise(settings: BenchSettings, batch: int, rounds: list[dict], generations: list[dict]) -> dict:
    """The figures of one runtime at one batch size, from its timed rounds and generations
    (bench_session.RuntimeSession.round and .generate)."""
    prefill_s = [r["prefill_s"] for r in rounds]
    decode_runs_s = [sum(r["steps_s"]) for r in rounds]
    step_s = [s for r in rounds for s in r["steps_s"]]
    ttft_s, total_s = [g["ttft_s"] for g in generations], [g["total_s"] for g in generations]
    steps = settings.new_tokens - 1
    p50, p90, p99 = np.percentile(step_s, [50, 90, 99])
    prefill, decode, total = (statistics.median(runs) for runs in (prefill_s, decode_runs_s, total_s))
    return {
        "batch": batch,
        "prefill": {"latency_ms": prefill * 1e3, "tokens_per_s": batch * settings.prompt_len / prefill,
                    "runs_ms": [s * 1e3 for s in prefill_s]},
        "decode": {"steps": steps, "p50_ms": p50 * 1e3, "p90_ms": p90 * 1e3, "p99_ms": p99 * 1e3,
                   "mean_ms": float(np.mean(step_s)) * 1e3,
                   "tokens_per_s": batch * steps / decode, "runs_s": decode_runs_s},
        "generation": {"new_tokens": settings.new_tokens, "ttft_ms": statistics.median(ttft_s) * 1e3,
                       "total_s": total, "tokens_per_s": batch * settings.new_tokens / total, "runs_s": total_s},
    }


# ---------------------------------------------------------------------------------------------------
# The whole benchmark


def _runtime_device(name: str, settings: BenchSettings) -> str | None:
    from runtimes.registry import CHECKPOINT, RUNTIMES

    name = split_runtime(name)[0]
    if RUNTIMES[name].runs == CHECKPOINT:
        if settings.device:
            return settings.device
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if name == "ort":
        return "cpu"
    return settings.device if settings.device and settings.device.startswith("cuda") else "cuda:0"


def _unavailable_reason(name: str, model: ModelUnderTest) -> str | None:
    from runtimes.registry import CHECKPOINT, RUNTIMES

    name, variant = split_runtime(name)
    spec = RUNTIMES[name]
    missing = spec.missing()
    if missing:
        return missing
    if not spec.implemented:
        return "not implemented in this version of gptdeploy"
    if spec.runs == CHECKPOINT and model.export_folder:
        return f"runs a checkpoint, and {model.export_folder} is an export folder (ONNX graphs only)"
    if spec.runs != CHECKPOINT and model.precision not in ("fp32", "fp16"):
        return f"ONNX exports are fp32 or fp16, not {model.precision}"
    if variant and model.precision != "fp32":
        return f"variants are made from fp32 exports; this one is {model.precision}"
    if variant and model.export_folder and variant not in read_export(model.export_folder).variants:
        return f"{model.export_folder} has no {variant} variant (gptdeploy optimize adds it)"
    return None


class _NoProgress:
    def start(self, name: str, total: int) -> Progress:
        return lambda text, advance: None

    def finish(self, name: str, status: str) -> None:
        pass


def run_bench(settings: BenchSettings, progress=None) -> dict:
    """Measures every runtime of settings; returns the report (a JSON-able dict, see the module doc).

    progress: an object with start(name, total) -> Progress and finish(name, status), e.g. RichProgress.
    """
    from gptdeploy.bench_session import Worker, WorkerFailed
    from gptdeploy.machine import describe_machine, library_versions, load_average, measure_read_bandwidth

    settings.check()
    progress = progress or _NoProgress()
    model = model_under_test(settings)
    longest = settings.prompt_len + settings.new_tokens - 1  # the last new token is never fed back
    if longest > model.config["block_size"]:
        raise GptDeployError(f"prompt of {settings.prompt_len} + {settings.new_tokens} new tokens needs "
                             f"{longest} positions, more than the model's context of "
                             f"{model.config['block_size']} (block_size)")
    load_start = load_average()
    machine = describe_machine()
    threads = settings.threads or machine["physical_cores"]
    settings_used = BenchSettings(**{**asdict(settings), "threads": threads, "precision": model.precision})

    rows: dict[str, dict] = {}
    for name in settings.runtimes:
        reason = _unavailable_reason(name, model)
        if reason:
            rows[name] = {"runtime": name, "status": UNAVAILABLE, "reason": reason}

    export: dict = {}
    export_runtimes = [n for n in settings.runtimes if n not in rows and _needs_export(n)]
    if export_runtimes:
        if model.export_folder:
            export = {"folder": model.export_folder}
        else:
            progress.start("export to ONNX", 1)
            worker = None
            try:
                worker = Worker("export", (settings_used, model.precision), settings.isolate)
                export = worker.call("run")
                progress.finish("export to ONNX", OK)
            except WorkerFailed as e:
                progress.finish("export to ONNX", e.status)
                e.reason = f"export to ONNX failed: {e.reason}"
                rows.update({name: e.row(name) for name in export_runtimes})
            finally:
                if worker is not None:
                    worker.close()

    turns = len(settings.batches) * (settings.warmup + 2 * settings.repeat)
    steps: dict[str, Progress] = {}
    workers: dict[str, Worker] = {}

    def failed(name: str, e: WorkerFailed) -> None:
        rows[name] = e.row(name)
        if name in workers:
            workers.pop(name).close()
        progress.finish(name, e.status)

    try:
        for name in settings.runtimes:  # set up one after the other: set-up times are not shared
            if name in rows:
                continue
            steps[name] = progress.start(name, turns + 1)
            steps[name]("set-up", 0)
            folder = export.get("folder") if _needs_export(name) else None
            try:
                workers[name] = Worker("runtime", (settings_used, name, _runtime_device(name, settings_used),
                                                   folder), settings.isolate)
                steps[name]("set up", 1)
            except WorkerFailed as e:
                failed(name, e)

        measured = {name: {batch: ([], []) for batch in settings.batches} for name in workers}
        bandwidth_step = progress.start("memory bandwidth", len(settings.batches) * settings.repeat + 1)
        bandwidths = []

        def measure_bandwidth() -> None:  # between turns, while every runtime is idle
            bandwidths.append(measure_read_bandwidth(settings.bandwidth_mib, threads=machine["physical_cores"]))
            bandwidth_step(f"{bandwidths[-1]['gb_per_s']} GB/s", 1)

        def take_turns(method: str, batch: int, label: str, timed: bool) -> None:
            for name in list(workers):
                time.sleep(TURN_PAUSE_S)
                steps[name](f"batch {batch}: {label}", 0)
                try:
                    result = workers[name].call(method, batch)
                except WorkerFailed as e:
                    failed(name, e)
                    continue
                if timed:
                    measured[name][batch][0 if method == "round" else 1].append(result)
                steps[name](f"batch {batch}", 1)

        for batch in settings.batches:
            for r in range(settings.warmup + settings.repeat):
                timed = r >= settings.warmup
                if timed:
                    measure_bandwidth()
                take_turns("round", batch, f"round {r - settings.warmup + 1}" if timed else "warm-up", timed)
            for r in range(settings.repeat):
                take_turns("generate", batch, f"generate {r + 1}", True)
        measure_bandwidth()
        progress.finish("memory bandwidth", OK)

        for name in list(workers):
            try:
                finished = workers[name].call("finish")
            except WorkerFailed as e:
                failed(name, e)
                continue
            if export.get("load_s") is not None and _needs_export(name):  # the export's times, for its runtimes
                optimized = ({"optimize_s": export["optimize_s"], "variants_reused": export["variants_reused"]}
                             if split_runtime(name)[1] and "optimize_s" in export else {})
                finished["setup"] = {"load_s": export["load_s"], "export_s": export["export_s"],
                                     "export_reused": export["export_reused"], **optimized, **finished["setup"]}
            rows[name] = {"runtime": name, "status": OK, **finished,
                          "batches": [summarise(settings_used, batch, *measured[name][batch])
                                      for batch in settings.batches]}
            progress.finish(name, OK)
    except BaseException:  # Ctrl-C, or a bug: end the workers now, whatever they are doing
        for worker in workers.values():
            worker.close(wait=False)
        raise
    for worker in workers.values():
        worker.close()

    bandwidth = {"gb_per_s": round(statistics.median(b["gb_per_s"] for b in bandwidths), 2),
                 "samples_gb_per_s": [b["gb_per_s"] for b in bandwidths],
                 "kernels": [b["kernel"] for b in bandwidths],
                 **{k: bandwidths[0][k] for k in ("array_mib", "repeats", "threads")}}
    runtimes = [rows[name] for name in settings.runtimes]
    baseline = _add_comparisons(runtimes, model, settings.prompt_len, bandwidth["gb_per_s"])
    return {
        "format": REPORT_FORMAT, "format_version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {**asdict(settings_used), "runtimes": list(settings.runtimes), "batches": list(settings.batches)},
        "model": {"source": settings.source, "weights": model.weights, "config": model.config,
                  "parameters": model.parameters, "precision": model.precision,
                  "weight_bytes_per_decode_step": model.weight_bytes_per_step(model.precision)},
        "machine": {**machine, "load_average_start": load_start, "load_average_end": load_average()},
        "versions": library_versions(),
        "memory_bandwidth": bandwidth,
        "baseline": baseline,
        "runtimes": runtimes,
    }


def _needs_export(name: str) -> bool:
    from runtimes.registry import CHECKPOINT, RUNTIMES

    return RUNTIMES[split_runtime(name)[0]].runs != CHECKPOINT


def _add_comparisons(runtimes: list[dict], model: ModelUnderTest, prompt_len: int, gb_per_s: float) -> str | None:
    """Adds to each measured batch its speedups over the baseline and its distance to the bandwidth floor.

    The baseline is hf when it was measured, else the first runtime that was. Returns its name.
    """
    measured = [r for r in runtimes if r["status"] == OK]
    if not measured:
        return None
    baseline = next((r for r in measured if r["runtime"] == "hf"), measured[0])
    base_batches = {b["batch"]: b for b in baseline["batches"]}
    for runtime in measured:
        for b in runtime["batches"]:
            base = base_batches[b["batch"]]
            b["speedup"] = {
                "prefill": b["prefill"]["tokens_per_s"] / base["prefill"]["tokens_per_s"],
                "decode": b["decode"]["tokens_per_s"] / base["decode"]["tokens_per_s"],
                "generation": base["generation"]["total_s"] / b["generation"]["total_s"],
            }
            steps = b["decode"]["steps"]
            mean_past = prompt_len + (steps - 1) / 2
            weights = model.weight_bytes_per_step(runtime["precision"])
            kv = model.kv_bytes(b["batch"], round(mean_past), runtime["precision"])
            floor_ms = (weights + kv) / (gb_per_s * 1e9) * 1e3
            on_cpu = runtime["device"] == "cpu"  # the bandwidth measured is the host's
            b["bandwidth_floor"] = {
                "weight_bytes": weights, "kv_bytes_mean": kv, "read_gb_per_s": gb_per_s,
                "floor_ms": floor_ms if on_cpu else None,
                "fraction_of_limit": floor_ms / b["decode"]["p50_ms"] if on_cpu else None,
            }
    return baseline["runtime"]


def write_json(report: dict, path: Path) -> None:
    """The report as JSON at path, written to a temporary file beside it and renamed (never half-written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
