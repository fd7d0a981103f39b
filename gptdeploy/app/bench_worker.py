"""Measuring one runtime for `gptdeploy bench`, and the processes the runtimes are measured in.

A RuntimeSession sets a runtime up (timed, with its memory) and then runs, when asked, one round
(the prompt and the decode steps after it) or one generation at a time, returning raw times. A
Worker holds a session (or the export job) in a spawned process of its own: its memory is its own,
and gptdeploy.app.bench can take turns between the runtimes round by round, so that a machine whose
speed drifts (other work, a neighbour on the host's memory bus) slows every runtime alike.
"""

from __future__ import annotations

import gc
import multiprocessing
import queue as queue_module
import signal
import sys
import time
import traceback
from contextlib import nullcontext

import numpy as np

from gptdeploy.app.bench_settings import FAILED, UNAVAILABLE, BenchSettings, is_peer, peer_type, split_runtime
from gptdeploy.app.export_cache import ExportCache, peer_record
from gptdeploy.app.exporting import ensure_engines, optimize_export
from gptdeploy.app.generation import GenerationConfig, generate
from gptdeploy.app.machine import GpuMemoryMonitor, ResidentMemory
from gptdeploy.app.sources import open_runner
from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import read_export
from gptdeploy.precision import CHECKPOINT
from gptdeploy.runtimes.registry import PEERS, RUNTIMES
from gptdeploy.steps import decode_inputs, prefill_inputs


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


def token_ids(seed: int, batch: int, length: int, vocab: int) -> np.ndarray:
    """Fixed token ids, the same for every runtime: [batch, length], from seed and batch."""
    return np.random.default_rng([seed, batch]).integers(0, vocab, size=(batch, length), dtype=np.int64)


def _open_timed(settings: BenchSettings, name: str, device: str | None, export_folder: str | None,
                own_process: bool):
    """The runner, its tokenizer, and the seconds each part of its set-up took.

    own_process: the worker is a process of its own, so it may set torch's thread count (a process-wide
    setting); in the caller's process torch's threads are left as they are, and the report says how many.
    """
    runtime, variant = split_runtime(name)
    setup: dict[str, float] = {}
    if RUNTIMES[runtime].runs == CHECKPOINT:
        if own_process:
            import torch

            torch.set_num_threads(settings.threads)
        start = time.perf_counter()
        runner, tokenizer = open_runner(name, settings.source, precision=settings.precision, device=device,
                                        weights="random" if settings.random_weights else None,
                                        weights_seed=settings.seed)
        setup["load_s"] = time.perf_counter() - start
        return runner, tokenizer, setup
    if RUNTIMES[runtime].needs_engines:  # build (or find) the engines apart from loading them
        start = time.perf_counter()
        ensure_engines(read_export(export_folder))
        setup["engine_build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    runner, tokenizer = open_runner(runtime, export_folder, device=device, variant=variant, threads=settings.threads,
                                    optimization=settings.ort_optimization,
                                    huge_pages=settings.huge_pages and runtime == "ort")
    setup["session_s"] = time.perf_counter() - start
    return runner, tokenizer, setup


def _thread_count(runner) -> int | None:
    session = getattr(runner, "session", None)
    if session is not None:
        return session.get_session_options().intra_op_num_threads
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None and runner.device == "cpu" else None


class RuntimeSession:
    """One runtime, set up (timed) on creation, measured one round or generation at a time."""

    def __init__(self, settings: BenchSettings, name: str, device: str | None, export_folder: str | None,
                 own_process: bool = True):
        self.settings, self.name, self.runner = settings, name, None
        self._memory = ResidentMemory()
        self._memory.reset_peak()
        self._process_rss = self._memory.current_mb()
        cuda_index = int(device.split(":")[1]) if device and ":" in device else 0
        self._gpu = GpuMemoryMonitor(cuda_index) if device and device.startswith("cuda") else None
        with self._working():
            self.runner, self.tokenizer, self.setup = _open_timed(settings, name, device, export_folder, own_process)
        self._setup_peak_rss = self._memory.peak_mb()
        self._setup_peak_gpu = self._gpu.peak_mb() if self._gpu is not None else None
        torch = sys.modules.get("torch")
        self._torch_cuda = torch is not None and self.runner.device.startswith("cuda") and torch.cuda.is_initialized()
        gc.collect()
        self._memory.reset_peak()  # from here on: what serving needs, without the set-up's transients
        if self._gpu is not None:
            self._gpu.reset_peak()
        if self._torch_cuda:
            torch.cuda.reset_peak_memory_stats(self.runner.device)
        self._clock = _Clock(self.runner.device)

    def _working(self):
        """GPU memory is sampled only while this session works (see machine.GpuMemoryMonitor)."""
        return self._gpu if self._gpu is not None else nullcontext()

    def round(self, batch: int) -> dict:
        """The prompt from an empty cache, then the decode steps of a generation: their seconds."""
        s = self.settings
        prompt_len, steps = s.prompt_len, s.new_tokens - 1
        ids = token_ids(s.seed, batch, prompt_len + steps, self.tokenizer.vocab_size)
        inputs = prefill_inputs(ids[:, :prompt_len])
        runner, step_s = self.runner, []
        with self._working():
            (_, cache), prefill_s = self._clock.time(
                lambda: runner.step(*inputs, runner.new_cache(batch), last_only=True))
            for i in range(steps):
                inputs = decode_inputs(inputs, ids[:, prompt_len + i])
                (_, cache), seconds = self._clock.time(lambda: runner.step(*inputs, cache, last_only=True))
                step_s.append(seconds)
        return {"prefill_s": prefill_s, "steps_s": step_s}

    def generate(self, batch: int) -> dict:
        """gptdeploy's generate, greedy, on the round's prompt: time to first token and in all."""
        s = self.settings
        prompt = token_ids(s.seed, batch, s.prompt_len + s.new_tokens - 1, self.tokenizer.vocab_size)[:, :s.prompt_len]
        config = GenerationConfig(max_new_tokens=s.new_tokens, greedy=True, stop_at_eot=False)
        with self._working():
            result = generate(self.runner, self.tokenizer, prompt.tolist(), config)
        if result.steps != s.new_tokens:  # the figures assume every token was generated
            raise RuntimeError(f"generate stopped after {result.steps} of {s.new_tokens} tokens")
        return {"ttft_s": result.prefill_s, "total_s": result.prefill_s + result.decode_s}

    def finish(self) -> dict:
        """What the runtime is, its set-up times and its memory."""
        torch = sys.modules.get("torch")
        memory = {
            "process_rss_mb": self._process_rss,  # before set-up: the interpreter and the libraries imported so far
            "setup_peak_rss_mb": self._setup_peak_rss,
            "run_peak_rss_mb": self._memory.peak_mb(),
            "peak_is_per_phase": self._memory.resettable,  # False: both peaks are the whole process's
            "setup_peak_gpu_mb": self._setup_peak_gpu,
            "run_peak_gpu_mb": self._gpu.peak_mb() if self._gpu is not None else None,
            "torch_peak_gpu_mb": (round(torch.cuda.max_memory_reserved(self.runner.device) / 1e6, 1)
                                  if self._torch_cuda else None),
        }
        return {"runner": self.runner.describe(), "device": self.runner.device, "precision": self.runner.precision,
                "threads": _thread_count(self.runner), "setup": self.setup, "memory": memory}

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None


KV_VALUE_BYTES = {"f32": 4, "float32": 4, "f16": 2, "float16": 2, "bfloat16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}


class PeerSession:
    """Another engine (ct2, llama.cpp) on the same weights, timed through its own generation loop.

    Set-up: the checkpoint loaded, converted into the export cache (or found there), the engine opened.
    A round is one greedy generation of the engine's own loop on the round's prompt: the prefill is the
    time to the first token, each decode step the time from one token to the next (the engine's choice
    of the token included, as in a generation; gptdeploy's own rounds feed fixed ids and leave the choice
    out). A generation is that loop again, timed to its first token and to its last.
    """

    def __init__(self, settings: BenchSettings, name: str, device: str | None, export_folder: str | None,
                 own_process: bool = True):
        from gptdeploy.loading import load

        self.settings, self.name, self.engine = settings, name, None
        engine, weight_type = split_runtime(name)[0], peer_type(name)
        self._memory = ResidentMemory()
        self._memory.reset_peak()
        self._process_rss = self._memory.current_mb()
        if own_process and "torch" in PEERS[engine].requires:
            import torch

            torch.set_num_threads(settings.threads)
        start = time.perf_counter()
        loaded = load(settings.source, weights="random" if settings.random_weights else None, seed=settings.seed)
        self.setup = {"load_s": time.perf_counter() - start}
        cache = ExportCache()
        reused = peer_record(cache.peer_path(loaded, engine, weight_type), loaded) is not None
        start = time.perf_counter()
        folder, self.conversion = cache.peer(loaded, engine, weight_type)
        self.setup |= {"convert_s": time.perf_counter() - start, "convert_reused": reused}
        self.vocab_size, self.config = loaded.tokenizer.vocab_size, loaded.config
        del loaded
        gc.collect()
        start = time.perf_counter()
        target = folder / "model" / ("model.gguf" if engine == "llama.cpp" else "")
        self.engine = PEERS[engine].engine_class().open(target, settings.threads)
        self.setup["session_s"] = time.perf_counter() - start
        self._setup_peak_rss = self._memory.peak_mb()
        gc.collect()
        self._memory.reset_peak()

    def _loop(self, batch: int) -> list[float]:
        """The engine's greedy loop on the round's prompt: the seconds from its start to each new token."""
        s = self.settings
        if batch != 1:
            raise GptDeployError(f"{self.name} is measured at batch 1 only")
        prompt = token_ids(s.seed, batch, s.prompt_len + s.new_tokens - 1, self.vocab_size)[0, :s.prompt_len]
        times, start = [], time.perf_counter()
        for _ in self.engine.greedy(prompt.tolist(), s.new_tokens):
            times.append(time.perf_counter() - start)
        if len(times) != s.new_tokens:  # the figures assume every token was generated
            raise RuntimeError(f"{self.name} stopped after {len(times)} of {s.new_tokens} tokens")
        return times

    def round(self, batch: int) -> dict:
        times = self._loop(batch)
        return {"prefill_s": times[0], "steps_s": list(np.diff(times))}

    def generate(self, batch: int) -> dict:
        times = self._loop(batch)
        return {"ttft_s": times[0], "total_s": times[-1]}

    def finish(self) -> dict:
        described = self.engine.describe()
        kv = described["kv_cache"]["keys"]
        share = 1 - self.config.block_size * self.config.n_embd / self.config.num_params  # all but positions
        memory = {"process_rss_mb": self._process_rss, "setup_peak_rss_mb": self._setup_peak_rss,
                  "run_peak_rss_mb": self._memory.peak_mb(), "peak_is_per_phase": self._memory.resettable,
                  "setup_peak_gpu_mb": None, "run_peak_gpu_mb": None, "torch_peak_gpu_mb": None}
        weights = ", ".join(f"{t} ×{v['tensors']}" for t, v in self.conversion.get("tensor_types", {}).items())
        runner = (f"{described['engine']}, {peer_type(self.name)} weights" + (f" ({weights}; logits from "
                  f"{self.conversion['output']})" if weights else f", compute {described.get('compute_type')}")
                  + f", KV cache {kv}")
        return {"runner": runner, "engine": described, "device": "cpu", "precision": peer_type(self.name),
                "threads": self.settings.threads, "setup": self.setup, "memory": memory,
                "conversion": self.conversion, "peer": True,
                "weight_bytes_per_step": round(self.conversion["bytes"] * share),
                "kv_bytes_per_value": KV_VALUE_BYTES.get(kv, 4)}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


class ExportJob:
    """The source exported to ONNX (or found in the export cache), with the ONNX Runtime variants the
    runtimes name (made once, validated against the model), and the time each part took."""

    def __init__(self, settings: BenchSettings, precision: str):
        self.settings, self.precision = settings, precision

    def run(self) -> dict:
        from gptdeploy.loading import load

        settings, cache = self.settings, ExportCache()
        start = time.perf_counter()
        loaded = load(settings.source, weights="random" if settings.random_weights else None, seed=settings.seed)
        load_s = time.perf_counter() - start
        reused = cache.get(loaded, self.precision) is not None
        start = time.perf_counter()
        folder = cache.export(loaded, self.precision)
        export_s = time.perf_counter() - start
        result = {"folder": str(folder.path), "load_s": load_s, "export_s": export_s, "export_reused": reused}
        variants = [v for v in dict.fromkeys(split_runtime(n)[1] for n in settings.runtimes if not is_peer(n)) if v]
        if variants:
            optimized = optimize_export(folder, variants, reference=loaded.model)
            result |= {"optimize_s": optimized.seconds, "variants_reused": not optimized.written}
        return result

    def close(self) -> None:
        pass


KINDS = {"runtime": RuntimeSession, "peer": PeerSession, "export": ExportJob}


class WorkerFailed(Exception):
    """A worker that could not do its work: UNAVAILABLE (a GptDeployError) or FAILED (anything else)."""

    def __init__(self, status: str, reason: str, details: str | None = None):
        super().__init__(reason)
        self.status, self.reason, self.details = status, reason, details

    @classmethod
    def from_exception(cls, e: Exception) -> WorkerFailed:
        if isinstance(e, GptDeployError):  # what the runtime cannot do (a model it cannot run, a missing GPU)
            return cls(UNAVAILABLE, str(e))
        return cls(FAILED, f"{type(e).__name__}: {e}", traceback.format_exc())

    def row(self, name: str) -> dict:
        return {"runtime": name, "status": self.status, "reason": self.reason, "details": self.details}


def _worker_main(kind: str, args: tuple, commands, messages) -> None:
    """A spawned process: builds KINDS[kind](*args), then runs the methods the parent sends, one at a time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the workers
    worker = None
    try:
        worker = KINDS[kind](*args)
        messages.put(("ready", None))
        while (command := commands.get())[0] != "stop":
            messages.put(("result", getattr(worker, command[0])(*command[1:])))
    except Exception as e:  # a runtime's crash is one row of the report, not the end of the bench
        failure = WorkerFailed.from_exception(e)
        messages.put((failure.status, failure.reason, failure.details))
    finally:
        if worker is not None:
            worker.close()


class Worker:
    """A RuntimeSession or ExportJob in a spawned process of its own (isolate) or in this one.

    call(method, *args) runs one of its methods and returns the result; any failure, the process
    dying included, raises WorkerFailed. close() ends the process.
    """

    def __init__(self, kind: str, args: tuple, isolate: bool = True):
        self._local = self._process = None
        if not isolate:
            try:
                self._local = (KINDS[kind](*args, own_process=False) if kind in ("runtime", "peer")
                               else KINDS[kind](*args))
            except Exception as e:
                raise WorkerFailed.from_exception(e) from None
            return
        context = multiprocessing.get_context("spawn")
        self._commands, self._messages = context.Queue(), context.Queue()
        self._process = context.Process(target=_worker_main, args=(kind, args, self._commands, self._messages),
                                        daemon=True)
        self._process.start()
        try:
            self._answer()  # "ready", once set up
        except BaseException:
            self.close()
            raise

    def call(self, method: str, *args):
        if self._local is not None:
            try:
                return getattr(self._local, method)(*args)
            except Exception as e:
                raise WorkerFailed.from_exception(e) from None
        self._commands.put((method, *args))
        return self._answer()

    def _answer(self):
        while True:
            try:
                message = self._messages.get(timeout=0.2)
            except queue_module.Empty:
                if self._process.is_alive():
                    continue
                try:  # it may have sent its last message just before exiting
                    message = self._messages.get(timeout=1.0)
                except queue_module.Empty:
                    code = self._process.exitcode
                    hint = " (killed: out of memory?)" if code == -9 else ""
                    raise WorkerFailed(FAILED, f"the benchmark process died with exit code {code}{hint}") from None
            if message[0] in ("ready", "result"):
                return message[1]
            raise WorkerFailed(*message)

    def close(self, wait: bool = True) -> None:
        """Ends the worker: asks it to stop (and waits up to 30 s for that) or, wait=False, kills it."""
        if self._local is not None:
            self._local.close()
            self._local = None
        if self._process is not None:
            if self._process.is_alive() and wait:
                self._commands.put(("stop",))
                self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join()
            self._process = None
