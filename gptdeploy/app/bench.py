"""`gptdeploy bench`: runtimes side by side on the same model, the same inputs and the same machine.

    report = run_bench(BenchSettings("gpt2", ("hf", "torch", "ort"), batches=(1, 8), random_weights=True))
    print_report(report)

What is measured, per runtime and batch size (gptdeploy.runtimes.base.Runner.step, logits of the last position
only, as generation asks for them):
- prefill: the prompt (prompt_len tokens per row) through the model from an empty cache; latency and
  tokens/s (batch * prompt_len / latency);
- decode: the new_tokens - 1 steps after it that a generation of new_tokens tokens runs, one token per
  row each, with the KV cache; p50 / p90 / p99 of the per-step latency over every step of every
  repeat, and tokens/s (batch * steps / the median repeat's decode time);
- generation: gptdeploy.app.generation.generate, greedy, end-of-text not stopping it: time to first
  token and total time for new_tokens tokens, the token choice (argmax) included.

Every runtime does identical work: the prompt and the decode inputs are fixed token ids drawn from
`seed` (decode feeds them rather than the model's choices, so no runtime's rounding changes the
work). Per batch size: `warmup` untimed rounds, `repeat` timed ones, then `repeat` generations;
figures are medians.

The runtimes take turns. Each is set up, one after the other, in a process of its own
(gptdeploy.app.bench_worker.Worker), and then they run round by round: round 1 of every runtime, round 2 of
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
cache at the mean past length) / the machine's read bandwidth (gptdeploy.app.machine), measured between
the timed rounds while every runtime is idle (the median of those measurements).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gptdeploy.app.bench_settings import OK, UNAVAILABLE, BenchSettings, is_peer, split_runtime
from gptdeploy.app.bench_worker import Worker, WorkerFailed
from gptdeploy.app.machine import describe_machine, library_versions, load_average, measure_read_bandwidth
from gptdeploy.config import GPTConfig
from gptdeploy.environment import available_memory_bytes
from gptdeploy.app.export_cache import ExportCache
from gptdeploy.app.sources import BENCH_ADVICE, Checkpoint, checkpoint_of
from gptdeploy.errors import GptDeployError, WeightsUnavailable
from gptdeploy.export_folder import is_export_folder, now, read_export, verify
from gptdeploy.files import write_atomic
from gptdeploy.precision import CHECKPOINT, PRECISIONS
from gptdeploy.runtimes.registry import PEERS, RUNTIMES, unavailable_reason

REPORT_FORMAT = "gptdeploy-bench"
REPORT_VERSION = 1
TURN_PAUSE_S = 0.05  # between two runtimes' turns: the last one's spinning worker threads go to sleep


# ---------------------------------------------------------------------------------------------------
# The model being measured


@dataclass
class ModelUnderTest:
    config: dict  # GPTConfig fields
    weights: str  # where the weights come from, in words
    export_folder: str | None  # the source itself when it is an export folder
    precision: str  # of the export folder, or the one asked for (fp32 by default)
    checkpoint: Checkpoint | None = None  # what torch and hf load (None: they cannot run, see checkpoint_problem)
    checkpoint_problem: str | None = None
    notes: tuple[str, ...] = ()  # said first in the report: random weights in place of unavailable ones

    @property
    def parameters(self) -> int:
        """All parameters, the tied lm_head counted once (GPT.num_params)."""
        return GPTConfig.from_dict(self.config).num_params

    def weight_bytes_per_step(self, precision: str) -> int:
        """Bytes of weights a decode step reads: all but the position table, of which it reads one row."""
        n = self.config["n_embd"]
        return round((self.parameters - self.config["block_size"] * n + n) * PRECISIONS[precision].bytes_per_weight)

    def kv_bytes(self, batch: int, length: int, precision: str) -> int:
        """Bytes of a KV cache of `length` positions (keys and values, every layer)."""
        c = self.config
        kv = PRECISIONS[PRECISIONS[precision].kv]
        return round(2 * c["n_layer"] * batch * length * c["n_embd"] * kv.bytes_per_weight)


def model_under_test(settings: BenchSettings) -> ModelUnderTest:
    """The source's architecture and what each kind of runtime runs, checked before any runtime starts (a bad
    source is one error).

    An export folder: the ONNX runtimes run it; torch and hf the checkpoint it was exported from, while that
    is there with the same weights. A preset whose trained weights cannot be had (no network, not cached):
    seeded random weights, said in the report's notes; timings do not depend on the weights' values.
    """
    from gptdeploy.loading import load

    if is_export_folder(Path(settings.source)):
        folder = read_export(settings.source)
        verify(folder, memo=ExportCache().memo())
        if settings.precision not in (None, folder.precision):
            raise GptDeployError(f"{settings.source} is a {folder.precision} export; it cannot run in "
                                 f"{settings.precision}")
        checkpoint, problem = None, None
        if any(_runs_checkpoint(n) for n in settings.runtimes):
            try:
                checkpoint = checkpoint_of(folder, advice=BENCH_ADVICE)
            except GptDeployError as e:
                problem = str(e)
        origin = folder.source.get("origin", "unknown")
        return ModelUnderTest(folder.config, f"export folder ({origin})", str(folder.path), folder.precision,
                              checkpoint, problem)
    notes = []
    try:
        loaded = load(settings.source, weights="random" if settings.random_weights else None, seed=settings.seed)
    except WeightsUnavailable as e:
        loaded = load(settings.source, weights="random", seed=settings.seed)
        notes.append(f"{settings.source}'s trained weights are not here ({e}); measuring seeded random weights "
                     f"(seed {settings.seed}) instead: timings do not depend on the weights' values")
    return ModelUnderTest(loaded.config.to_dict(), loaded.origin, None, settings.precision or "fp32",
                          Checkpoint(settings.source, loaded.random_seed), None, tuple(notes))


# ---------------------------------------------------------------------------------------------------
# From raw times to figures


def summarise(settings: BenchSettings, batch: int, rounds: list[dict], generations: list[dict]) -> dict:
    """The figures of one runtime at one batch size, from its timed rounds and generations
    (bench_worker.RuntimeSession.round and .generate)."""
    prefill_s = [r["prefill_s"] for r in rounds]
    decode_runs_s = [sum(r["steps_s"]) for r in rounds]
    step_s = [s for r in rounds for s in r["steps_s"]]
    ttft_s, total_s = [g["ttft_s"] for g in generations], [g["total_s"] for g in generations]
    # decode as a user sees it: the generation after its first token, per token, the loop's own work included
    e2e_ms = [(g["total_s"] - g["ttft_s"]) / (settings.new_tokens - 1) * 1e3 for g in generations]
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
                       "decode_ms_per_token": statistics.median(e2e_ms),
                       "total_s": total, "tokens_per_s": batch * settings.new_tokens / total, "runs_s": total_s},
    }


# ---------------------------------------------------------------------------------------------------
# The whole benchmark


class NoProgress:
    """run_bench's progress interface: start(name, total) -> update(text, advance); finish(name, status)."""

    def start(self, name: str, total: int):
        return lambda text, advance: None

    def note(self, text: str) -> None:
        pass

    def finish(self, name: str, status: str) -> None:
        pass


def run_bench(settings: BenchSettings, progress=None) -> dict:
    """Measures every runtime of settings; returns the report (a JSON-able dict, see the module doc).

    progress: an object with start(name, total) -> update(text, advance) and finish(name, status), e.g.
    gptdeploy.app.bench_report.BenchProgress. When no runtime named can run here, GptDeployError with one line
    per runtime saying what it lacks, before anything loads.
    """
    settings.check()
    lacking = {name: reason for name in settings.runtimes if (reason := _missing(name))}
    if len(lacking) == len(settings.runtimes):
        raise GptDeployError("\n".join(f"runtime {name!r} cannot run here: {reason}" for name, reason in lacking.items()))
    return _BenchRun(settings, progress or NoProgress()).run()


class _BenchRun:
    """One run of `gptdeploy bench`: set-up, then the runtimes taking turns, then the report."""

    def __init__(self, settings: BenchSettings, progress):
        self.settings, self.progress = settings, progress
        self.model = model_under_test(settings)
        longest = settings.prompt_len + settings.new_tokens - 1  # the last new token is never fed back
        if longest > self.model.config["block_size"]:
            raise GptDeployError(f"prompt of {settings.prompt_len} + {settings.new_tokens} new tokens needs "
                                 f"{longest} positions, more than the model's context of "
                                 f"{self.model.config['block_size']} (block_size)")
        self._check_memory()
        self.load_start = load_average()
        self.machine = describe_machine()
        threads = settings.threads or self.machine["physical_cores"]
        random_weights = settings.random_weights or bool(self.model.notes)  # random in place of unavailable ones
        self.used = BenchSettings(**{**asdict(settings), "threads": threads, "precision": self.model.precision,
                                     "random_weights": random_weights})
        self.rows: dict[str, dict] = {}  # runtime -> its row, once it is unavailable, failed or measured
        self.workers: dict[str, Worker] = {}
        self.updates: dict = {}  # runtime -> its progress update function
        self.bandwidths: list[dict] = []
        self.export: dict = {}

    def _check_memory(self) -> None:
        """Refuses, before anything runs, a batch whose KV cache and logits cannot fit in the free memory."""
        s, model = self.settings, self.model
        batch, positions = max(s.batches), s.prompt_len + s.new_tokens
        need = (model.weight_bytes_per_step("fp32") + model.kv_bytes(batch, positions, "fp32")
                + batch * s.prompt_len * model.config["vocab_size"] * 4)  # the reference's logits of a prefill
        available = available_memory_bytes()
        if available is not None and need > 0.9 * available:
            raise GptDeployError(f"batch {batch} of {positions} positions needs about {need / 1e9:.1f} GB (weights, "
                                 f"KV cache, the prefill's logits); this machine has {available / 1e9:.1f} GB free")

    def run(self) -> dict:
        for name in self.settings.runtimes:
            if reason := _unavailable_reason(name, self.model, self.settings.batches):
                self.rows[name] = {"runtime": name, "status": UNAVAILABLE, "reason": reason}
        if len(self.rows) == len(self.settings.runtimes):  # nothing to measure here: say why, one line each
            raise GptDeployError("\n".join(f"runtime {name!r} cannot run on {self.settings.source}: {row['reason']}"
                                           for name, row in self.rows.items()))
        for note in self.model.notes:
            self.progress.note(note)
        self._export()
        try:
            self._set_up()
            measured = self._measure()
            self._finish(measured)
        except BaseException:  # Ctrl-C, or a bug: end the workers now, whatever they are doing
            for worker in self.workers.values():
                worker.close(wait=False)
            raise
        for worker in self.workers.values():
            worker.close()
        return self._report()

    def _export(self) -> None:
        """The export (and variants) the ONNX runtimes run, made once in a process of its own."""
        names = [n for n in self.settings.runtimes if n not in self.rows and _needs_export(n)]
        if not names:
            return
        if self.model.export_folder:
            self.export = {"folder": self.model.export_folder}
            return
        self.progress.start("export to ONNX", 1)
        worker = None
        try:
            worker = Worker("export", (self.used, self.model.precision), self.settings.isolate)
            self.export = worker.call("run")
            self.progress.finish("export to ONNX", OK)
        except WorkerFailed as e:
            self.progress.finish("export to ONNX", e.status)
            e.reason = f"export to ONNX failed: {e.reason}"
            self.rows.update({name: e.row(name) for name in names})
        finally:
            if worker is not None:
                worker.close()

    def _set_up(self) -> None:
        """Each runtime's worker, one after the other: set-up times are not shared."""
        s = self.settings
        turns = len(s.batches) * (s.warmup + 2 * s.repeat)
        for name in s.runtimes:
            if name in self.rows:
                continue
            self.updates[name] = self.progress.start(name, turns + 1)
            self.updates[name]("set-up", 0)
            folder = self.export.get("folder") if _needs_export(name) else None
            try:
                kind = "peer" if is_peer(name) else "runtime"
                self.workers[name] = Worker(kind, (self._settings_for(name), name,
                                                   _runtime_device(name, self.used), folder), s.isolate)
                self.updates[name]("set up", 1)
            except WorkerFailed as e:
                self._failed(name, e)

    def _settings_for(self, name: str) -> BenchSettings:
        """The settings a runtime's worker loads with: torch and hf load the checkpoint of an export folder."""
        checkpoint = self.model.checkpoint
        if _needs_export(name) or checkpoint is None or not self.model.export_folder:
            return self.used
        return BenchSettings(**{**asdict(self.used), "source": checkpoint.source,
                                "random_weights": checkpoint.random_seed is not None,
                                "seed": checkpoint.random_seed or 0})

    def _failed(self, name: str, e: WorkerFailed) -> None:
        self.rows[name] = e.row(name)
        if name in self.workers:
            self.workers.pop(name).close()
        self.progress.finish(name, e.status)

    def _measure(self) -> dict:
        """Rounds and generations, the runtimes taking turns; the read bandwidth before each timed round."""
        s = self.settings
        measured = {name: {batch: ([], []) for batch in s.batches} for name in self.workers}
        self._bandwidth_step = self.progress.start("memory bandwidth", len(s.batches) * s.repeat + 1)
        for batch in s.batches:
            for r in range(s.warmup + s.repeat):
                timed = r >= s.warmup
                if timed:
                    self._measure_bandwidth()
                label = f"round {r - s.warmup + 1}" if timed else "warm-up"
                self._take_turns("round", batch, label, measured if timed else None)
            for r in range(s.repeat):
                self._take_turns("generate", batch, f"generate {r + 1}", measured)
        self._measure_bandwidth()
        self.progress.finish("memory bandwidth", OK)
        return measured

    def _measure_bandwidth(self) -> None:  # between turns, while every runtime is idle
        self.bandwidths.append(measure_read_bandwidth(self.settings.bandwidth_mib,
                                                      threads=self.machine["physical_cores"]))
        self._bandwidth_step(f"{self.bandwidths[-1]['gb_per_s']} GB/s", 1)

    def _take_turns(self, method: str, batch: int, label: str, measured: dict | None) -> None:
        for name in list(self.workers):
            time.sleep(TURN_PAUSE_S)
            self.updates[name](f"batch {batch}: {label}", 0)
            try:
                result = self.workers[name].call(method, batch)
            except WorkerFailed as e:
                self._failed(name, e)
                continue
            if measured is not None:
                measured[name][batch][0 if method == "round" else 1].append(result)
            self.updates[name](f"batch {batch}", 1)

    def _finish(self, measured: dict) -> None:
        """Each runtime's set-up times and memory, and its figures per batch size."""
        for name in list(self.workers):
            try:
                finished = self.workers[name].call("finish")
            except WorkerFailed as e:
                self._failed(name, e)
                continue
            export = self.export
            if export.get("load_s") is not None and _needs_export(name):  # the export's times, for its runtimes
                optimized = ({"optimize_s": export["optimize_s"], "variants_reused": export["variants_reused"]}
                             if split_runtime(name)[1] and "optimize_s" in export else {})
                finished["setup"] = {"load_s": export["load_s"], "export_s": export["export_s"],
                                     "export_reused": export["export_reused"], **optimized, **finished["setup"]}
            self.rows[name] = {"runtime": name, "status": OK, **finished,
                               "batches": [summarise(self.used, batch, *measured[name][batch])
                                           for batch in self.settings.batches]}
            self.progress.finish(name, OK)

    def _report(self) -> dict:
        settings, model, samples = self.settings, self.model, self.bandwidths
        bandwidth = {"gb_per_s": round(statistics.median(b["gb_per_s"] for b in samples), 2),
                     "samples_gb_per_s": [b["gb_per_s"] for b in samples],
                     "kernels": [b["kernel"] for b in samples],
                     **{k: samples[0][k] for k in ("array_mib", "repeats", "threads")}}
        runtimes = [self.rows[name] for name in settings.runtimes]
        baseline = _add_comparisons(runtimes, model, settings.prompt_len, bandwidth["gb_per_s"])
        return {
            "format": REPORT_FORMAT, "format_version": REPORT_VERSION, "created": now(),
            "settings": {**asdict(self.used), "runtimes": list(settings.runtimes), "batches": list(settings.batches)},
            "notes": list(model.notes),
            "model": {"source": settings.source, "weights": model.weights, "config": model.config,
                      "parameters": model.parameters, "precision": model.precision,
                      "weight_bytes_per_decode_step": model.weight_bytes_per_step(model.precision)},
            "machine": {**self.machine, "load_average_start": self.load_start, "load_average_end": load_average()},
            "versions": library_versions(),
            "memory_bandwidth": bandwidth,
            "baseline": baseline,
            "runtimes": runtimes,
        }


def _missing(name: str) -> str | None:
    """What this machine lacks to run runtime or engine `name`, in one line; None when it can."""
    engine = split_runtime(name)[0]
    if engine in PEERS:
        return "; ".join(problems) if (problems := PEERS[engine].missing()) else None
    return unavailable_reason(engine)


def _runs_checkpoint(name: str) -> bool:
    """torch and hf run the checkpoint; so do the other engines, converting it first."""
    return is_peer(name) or RUNTIMES[split_runtime(name)[0]].runs == CHECKPOINT


def _runtime_device(name: str, settings: BenchSettings) -> str | None:
    if is_peer(name):
        return PEERS[split_runtime(name)[0]].device
    spec = RUNTIMES[split_runtime(name)[0]]
    if spec.runs == CHECKPOINT:
        if settings.device:
            return settings.device
        from gptdeploy.environment import torch_sees_cuda

        return "cuda:0" if torch_sees_cuda() else "cpu"
    if not spec.gpu:
        return "cpu"
    return settings.device if settings.device and settings.device.startswith("cuda") else "cuda:0"


def _unavailable_reason(name: str, model: ModelUnderTest, batches: tuple[int, ...] = (1,)) -> str | None:
    runtime, variant = split_runtime(name)
    if missing := _missing(name):
        return missing
    if runtime in PEERS:
        if model.export_folder and model.checkpoint is None:
            return f"converts the checkpoint: {model.checkpoint_problem}"
        if model.precision != "fp32":
            return f"converts fp32 weights; this run is {model.precision} (its weight type is the one named)"
        if set(batches) != {1}:
            return "measured at batch 1 only (--batch 1): its own generation loop runs one sequence"
        return None
    spec = RUNTIMES[runtime]
    if spec.runs == CHECKPOINT and model.export_folder and model.checkpoint is None:
        return f"runs a checkpoint: {model.checkpoint_problem}"
    if spec.runs != CHECKPOINT and model.precision not in ("fp32", "fp16"):
        return f"ONNX exports are fp32 or fp16, not {model.precision}"
    if variant and model.precision != "fp32":
        return f"variants are made from fp32 exports; this one is {model.precision}"
    if variant and model.export_folder and variant not in read_export(model.export_folder).variants:
        return f"{model.export_folder} has no {variant} variant (gptdeploy optimize adds it)"
    return None


def _needs_export(name: str) -> bool:
    return not _runs_checkpoint(name)


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
                "decode_end_to_end": (base["generation"]["decode_ms_per_token"]
                                      / b["generation"]["decode_ms_per_token"]),
                "generation": base["generation"]["total_s"] / b["generation"]["total_s"],
            }
            steps = b["decode"]["steps"]
            mean_past = prompt_len + (steps - 1) / 2
            if runtime.get("peer"):  # another engine: the bytes of its own files and KV cache
                weights = runtime["weight_bytes_per_step"]
                kv = round(model.kv_bytes(b["batch"], round(mean_past), "fp32") / 4 * runtime["kv_bytes_per_value"])
            else:
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
    write_atomic(Path(path), json.dumps(report, indent=2) + "\n")
