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
work). Each batch size runs `warmup` untimed rounds, then `repeat` timed ones; figures are medians.

Set-up is timed apart: model load (torch, hf: the checkpoint, and for hf the conversion to
transformers), export to ONNX (once; later runs reuse the export cache), session creation, engine
build (trt). Memory: each runtime is measured in its own process, so its peak resident memory is
its own: the peak during set-up, and the peak during the measurements (reset before them, on
Linux), beside the process's resident memory before set-up (Python and the libraries). On CUDA, the
peak GPU memory in use (NVML) and, for runtimes that allocate through PyTorch, PyTorch's own peak.

Timing: time.perf_counter around each call. step() returns the logits on the host, so a timed step
includes all of its GPU work; where PyTorch drives a CUDA device the device is also synchronised
before and after each timed call.

Decode at small batch is bound by memory bandwidth: every weight is read once per step. The report
sets each CPU runtime's decode step against that floor: (bytes of weights read per step + the KV
cache at the mean past length) / the machine's read bandwidth (gptdeploy.machine), measured in the
runtime's process just before and after its measurements (the faster counts): on a shared machine
the bandwidth moves, so each runtime is set against the bandwidth it had. The report's overall
figure is measured before and after all the runtimes.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import queue as queue_module
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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
        if self.precision not in (None, *PRECISION_BYTES):
            raise GptDeployError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISION_BYTES)}")
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
# Measuring one runtime (in its own process)


class _Clock:
    """perf_counter, with the CUDA device synchronised around each call where PyTorch drives it."""

    def __init__(self, device: str):
        self._sync = lambda: None
        torch = sys.modules.get("torch")
        if device.startswith("cuda") and torch is not None and torch.cuda.is_initialized():
            self._sync = lambda: torch.cuda.synchronize(device)

    def time(self, call):
        self._sync()
        start = time.perf_counter()
        result = call()
        self._sync()
        return result, time.perf_counter() - start


def _token_ids(seed: int, batch: int, length: int, vocab: int) -> np.ndarray:
    """Fixed token ids, the same for every runtime: [batch, length], from seed and batch."""
    return np.random.default_rng([seed, batch]).integers(0, vocab, size=(batch, length), dtype=np.int64)


def _measure_batch(runner, tokenizer, settings: BenchSettings, batch: int, progress: Progress) -> dict:
    from gptdeploy.generation import GenerationConfig, generate

    clock = _Clock(runner.device)
    prompt_len, steps = settings.prompt_len, settings.new_tokens - 1
    ids = _token_ids(settings.seed, batch, prompt_len + steps, tokenizer.vocab_size)
    prompt, fed = ids[:, :prompt_len], ids[:, prompt_len:]
    prompt_positions = np.tile(np.arange(prompt_len), (batch, 1))
    prefill_s, decode_runs_s, step_s = [], [], []

    for round_index in range(settings.warmup + settings.repeat):
        timed = round_index >= settings.warmup
        progress(f"batch {batch}: {'round' if timed else 'warm-up'} {round_index + 1}", 0)
        mask = np.ones((batch, prompt_len), dtype=np.int64)
        (_, cache), seconds = clock.time(
            lambda: runner.step(prompt, mask, prompt_positions, runner.new_cache(batch), last_only=True))
        round_steps = []
        for i in range(steps):
            mask = np.ones((batch, prompt_len + i + 1), dtype=np.int64)
            positions = np.full((batch, 1), prompt_len + i, dtype=np.int64)
            (_, cache), step_seconds = clock.time(
                lambda: runner.step(fed[:, i:i + 1], mask, positions, cache, last_only=True))
            round_steps.append(step_seconds)
        del cache
        if timed:
            prefill_s.append(seconds)
            decode_runs_s.append(sum(round_steps))
            step_s += round_steps
        progress(f"batch {batch}", 1)

    config = GenerationConfig(max_new_tokens=settings.new_tokens, greedy=True, stop_at_eot=False)
    ttft_s, total_s = [], []
    for r in range(settings.repeat):
        progress(f"batch {batch}: generate {r + 1}", 0)
        result = generate(runner, tokenizer, prompt.tolist(), config)
        if result.steps != settings.new_tokens:  # the bench's numbers assume every token was generated
            raise RuntimeError(f"generate stopped after {result.steps} of {settings.new_tokens} tokens")
        ttft_s.append(result.prefill_s)
        total_s.append(result.prefill_s + result.decode_s)
        progress(f"batch {batch}", 1)

    p50, p90, p99 = np.percentile(step_s, [50, 90, 99])
    prefill, decode, total = (statistics.median(runs) for runs in (prefill_s, decode_runs_s, total_s))
    return {
        "batch": batch,
        "prefill": {"latency_ms": prefill * 1e3, "tokens_per_s": batch * prompt_len / prefill,
                    "runs_ms": [s * 1e3 for s in prefill_s]},
        "decode": {"steps": steps, "p50_ms": p50 * 1e3, "p90_ms": p90 * 1e3, "p99_ms": p99 * 1e3,
                   "mean_ms": float(np.mean(step_s)) * 1e3,
                   "tokens_per_s": batch * steps / decode, "runs_s": decode_runs_s},
        "generation": {"new_tokens": settings.new_tokens, "ttft_ms": statistics.median(ttft_s) * 1e3,
                       "total_s": total, "tokens_per_s": batch * settings.new_tokens / total, "runs_s": total_s},
    }


def _thread_count(runner) -> int | None:
    session = getattr(runner, "session", None)
    if session is not None:
        return session.get_session_options().intra_op_num_threads
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None and runner.device == "cpu" else None


def _cuda_index(device: str | None) -> int:
    return int(device.split(":")[1]) if device and ":" in device else 0


def measure_runtime(settings: BenchSettings, name: str, device: str | None, export_folder: str | None,
                    progress: Progress) -> dict:
    """Opens runtime `name` (set-up timed) and measures every batch size. Raises on failure."""
    from gptdeploy.machine import GpuMemoryMonitor, ResidentMemory, measure_read_bandwidth

    memory = ResidentMemory()
    memory.reset_peak()
    process_rss = memory.current_mb()
    gpu = GpuMemoryMonitor(_cuda_index(device)) if device and device.startswith("cuda") else None
    runner = None
    try:
        if gpu is not None:
            gpu.start()
        progress("set-up", 0)
        runner, tokenizer, setup = _open_timed(settings, name, device, export_folder)
        setup_peak_rss = memory.peak_mb()
        setup_peak_gpu = gpu.peak_mb() if gpu is not None else None
        torch = sys.modules.get("torch")
        torch_cuda = torch is not None and runner.device.startswith("cuda") and torch.cuda.is_initialized()
        # The read bandwidth just before and after the measurements: on a shared machine it moves, and
        # the bandwidth floor of this runtime's decode steps is the one it had (measured outside the peaks).
        bandwidth = [measure_read_bandwidth(settings.bandwidth_mib, threads=settings.threads)["gb_per_s"]]
        gc.collect()
        memory.reset_peak()
        if gpu is not None:
            gpu.reset_peak()
        if torch_cuda:
            torch.cuda.reset_peak_memory_stats(runner.device)

        batches = [_measure_batch(runner, tokenizer, settings, batch, progress) for batch in settings.batches]
        memory_report = {
            "process_rss_mb": process_rss,  # before set-up: the interpreter and the libraries imported so far
            "setup_peak_rss_mb": setup_peak_rss,
            "run_peak_rss_mb": memory.peak_mb(),
            "peak_is_per_phase": memory.resettable,  # False: both peaks are the whole process's
            "setup_peak_gpu_mb": setup_peak_gpu,
            "run_peak_gpu_mb": gpu.peak_mb() if gpu is not None else None,
            "torch_peak_gpu_mb": round(torch.cuda.max_memory_reserved(runner.device) / 1e6, 1) if torch_cuda else None,
        }
        bandwidth.append(measure_read_bandwidth(settings.bandwidth_mib, threads=settings.threads)["gb_per_s"])
        return {
            "runtime": name, "status": OK, "runner": runner.describe(), "device": runner.device,
            "precision": runner.precision, "threads": _thread_count(runner), "setup": setup,
            "memory": memory_report, "read_bandwidth_gb_per_s": bandwidth, "batches": batches,
        }
    finally:
        if gpu is not None:
            gpu.stop()
        if runner is not None:
            runner.close()


def _open_timed(settings: BenchSettings, name: str, device: str | None, export_folder: str | None):
    """The runner, its tokenizer, and the seconds each part of its set-up took."""
    from runtimes.ort import SessionConfig
    from runtimes.registry import CHECKPOINT, RUNTIMES, open_runner

    setup: dict[str, float] = {}
    if RUNTIMES[split_runtime(name)[0]].runs == CHECKPOINT:
        import torch

        torch.set_num_threads(settings.threads)
        start = time.perf_counter()
        runner, tokenizer = open_runner(name, settings.source, precision=settings.precision, device=device,
                                        weights="random" if settings.random_weights else None,
                                        weights_seed=settings.seed, progress=False)
        setup["load_s"] = time.perf_counter() - start
        return runner, tokenizer, setup
    if name == "trt":  # build (or find) the engines apart from loading them
        from exporters.tensorrt import ensure_engines

        start = time.perf_counter()
        ensure_engines(read_export(export_folder))
        setup["engine_build_s"] = time.perf_counter() - start
    session_config = SessionConfig(intra_op_threads=settings.threads, optimization_level=settings.ort_optimization)
    runtime, variant = split_runtime(name)
    start = time.perf_counter()
    runner, tokenizer = open_runner(runtime, export_folder, device=device, session_config=session_config,
                                    variant=variant)
    setup["session_s"] = time.perf_counter() - start
    return runner, tokenizer, setup


def export_for_bench(settings: BenchSettings, precision: str) -> dict:
    """The source exported to ONNX (or found in the export cache), with the ONNX Runtime variants the
    runtimes name (made once, validated against the model), and the time each part took."""
    from gptdeploy.export_cache import cached_export, cached_export_path
    from gptdeploy.loading import load

    start = time.perf_counter()
    loaded = load(settings.source, weights="random" if settings.random_weights else None, seed=settings.seed)
    load_s = time.perf_counter() - start
    path = cached_export_path(loaded, precision)
    before = read_export(path).manifest.get("created") if is_export_folder(path) else None
    start = time.perf_counter()
    folder = cached_export(loaded, precision, progress=False)
    export_s = time.perf_counter() - start
    reused = before is not None and read_export(folder).manifest.get("created") == before
    result = {"folder": str(folder), "load_s": load_s, "export_s": export_s, "export_reused": reused}
    variants = [v for v in dict.fromkeys(split_runtime(n)[1] for n in settings.runtimes) if v]
    if variants:
        from exporters.ort_optimize import optimize_export

        optimized = optimize_export(folder, variants, reference=loaded.model, progress=False)
        result |= {"optimize_s": optimized.seconds, "variants_reused": not optimized.written}
    return result


# ---------------------------------------------------------------------------------------------------
# Running the pieces in child processes


def _child_main(target: str, args: tuple, messages) -> None:
    """A spawned process: runs measure_runtime or export_for_bench, sends progress and the result."""
    def progress(text: str, advance: int) -> None:
        messages.put(("progress", text, advance))

    try:
        if target == "measure":
            result = measure_runtime(*args, progress=progress)
        else:
            result = export_for_bench(*args)
        messages.put(("result", result))
    except GptDeployError as e:  # what this runtime cannot do (a model it cannot run, a missing GPU)
        messages.put((UNAVAILABLE, str(e), None))
    except Exception as e:  # a runtime's crash is one row of the report, not the end of the bench
        messages.put((FAILED, f"{type(e).__name__}: {e}", traceback.format_exc()))


def _run_child(target: str, args: tuple, progress: Progress) -> dict:
    """Runs _child_main in a fresh (spawned) process; returns its result or raises _ChildFailed."""
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    process = context.Process(target=_child_main, args=(target, args, messages), daemon=True)
    process.start()
    try:
        while True:
            try:
                message = messages.get(timeout=0.2)
            except queue_module.Empty:
                if process.is_alive():
                    continue
                try:  # it may have sent its last message just before exiting
                    message = messages.get(timeout=1.0)
                except queue_module.Empty:
                    code = process.exitcode
                    hint = " (killed: out of memory?)" if code == -9 else ""
                    raise _ChildFailed(FAILED, f"the benchmark process died with exit code {code}{hint}") from None
            if message[0] == "progress":
                progress(message[1], message[2])
            elif message[0] == "result":
                return message[1]
            else:
                raise _ChildFailed(*message)
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.terminate()
            process.join()


class _ChildFailed(Exception):
    """A runtime that could not be measured: UNAVAILABLE (a GptDeployError) or FAILED (anything else)."""

    def __init__(self, status: str, reason: str, details: str | None = None):
        super().__init__(reason)
        self.status, self.reason, self.details = status, reason, details

    def row(self, name: str) -> dict:
        return {"runtime": name, "status": self.status, "reason": self.reason, "details": self.details}


def _run(settings: BenchSettings, target: str, args: tuple, progress: Progress) -> dict:
    """target in a child process (settings.isolate) or in this one; failures raise _ChildFailed."""
    if settings.isolate:
        return _run_child(target, args, progress)
    try:
        if target == "measure":
            return measure_runtime(*args, progress=progress)
        return export_for_bench(*args)
    except GptDeployError as e:
        raise _ChildFailed(UNAVAILABLE, str(e)) from None
    except Exception as e:
        raise _ChildFailed(FAILED, f"{type(e).__name__}: {e}", traceback.format_exc()) from None


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
    # Measured before and after the runtimes; the faster counts (other work on the machine only slows it)
    bandwidth_step = progress.start("memory bandwidth", 2)
    bandwidths = [measure_read_bandwidth(settings.bandwidth_mib, threads=machine["physical_cores"])]
    bandwidth_step("measured before the runtimes", 1)

    rows: dict[str, dict] = {}
    for name in settings.runtimes:
        reason = _unavailable_reason(name, model)
        if reason:
            rows[name] = {"runtime": name, "status": UNAVAILABLE, "reason": reason}

    export: dict | None = None
    export_runtimes = [n for n in settings.runtimes if n not in rows and _needs_export(n)]
    if export_runtimes:
        if model.export_folder:
            export = {"folder": model.export_folder}
        else:
            step = progress.start("export to ONNX", 1)
            try:
                export = _run(settings_used, "export", (settings_used, model.precision), step)
                progress.finish("export to ONNX", OK)
            except _ChildFailed as e:
                progress.finish("export to ONNX", e.status)
                e.reason = f"export to ONNX failed: {e.reason}"
                rows.update({name: e.row(name) for name in export_runtimes})

    rounds = len(settings.batches) * (settings.warmup + 2 * settings.repeat)
    for name in settings.runtimes:
        if name in rows:
            continue
        device = _runtime_device(name, settings_used)
        folder = export["folder"] if _needs_export(name) else None
        step = progress.start(name, rounds)
        try:
            rows[name] = _run(settings_used, "measure", (settings_used, name, device, folder), step)
            if _needs_export(name) and "load_s" in export:
                optimized = {"optimize_s": export["optimize_s"], "variants_reused": export["variants_reused"]} \
                    if split_runtime(name)[1] and "optimize_s" in export else {}
                rows[name]["setup"] = {"load_s": export["load_s"], "export_s": export["export_s"],
                                       "export_reused": export["export_reused"], **optimized, **rows[name]["setup"]}
            progress.finish(name, OK)
        except _ChildFailed as e:
            rows[name] = e.row(name)
            progress.finish(name, e.status)

    bandwidths.append(measure_read_bandwidth(settings.bandwidth_mib, threads=machine["physical_cores"]))
    progress.finish("memory bandwidth", OK)
    bandwidth = {**max(bandwidths, key=lambda b: b["gb_per_s"]),
                 "measurements_gb_per_s": [b["gb_per_s"] for b in bandwidths]}
    runtimes = [rows[name] for name in settings.runtimes]
    baseline = _add_comparisons(runtimes, model, settings.prompt_len)
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


def _add_comparisons(runtimes: list[dict], model: ModelUnderTest, prompt_len: int) -> str | None:
    """Adds to each measured batch its speedups over the baseline and its distance to the bandwidth floor.

    The baseline is hf when it was measured, else the first runtime that was. Returns its name. The
    floor of a runtime's decode step is computed with the read bandwidth measured around its own
    measurements (the faster of before and after).
    """
    measured = [r for r in runtimes if r["status"] == OK]
    if not measured:
        return None
    baseline = next((r for r in measured if r["runtime"] == "hf"), measured[0])
    base_batches = {b["batch"]: b for b in baseline["batches"]}
    for runtime in measured:
        gb_per_s = max(runtime["read_bandwidth_gb_per_s"])
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
