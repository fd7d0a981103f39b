"""What a new user meets first: the advertised commands with their defaults, offline; export folders as
SOURCE; random weights that say so; the help text. And the TensorRT review's findings, with stand-ins for
TensorRT where there is no GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import read_export
from gptdeploy.runtimes.registry import RUNTIMES
from tests.test_bad_input import assert_refused, manifest_edit
from tests.test_cli import gptdeploy

OFFLINE = {"HF_HUB_OFFLINE": "1"}


def offline_env(tmp_path) -> dict:
    return {**os.environ, **OFFLINE, "HF_HUB_CACHE": str(tmp_path / "empty-hub-cache")}


# --- the advertised commands --------------------------------------------------------------------------


@pytest.mark.skipif(not RUNTIMES["trt"].missing(), reason="TensorRT can run here")
def test_bench_runtime_trt_as_advertised_says_what_is_missing(tmp_path):
    """`gptdeploy bench --runtime trt,ort-trt`: SOURCE defaults to gpt2; nothing can run: one line each, exit 2."""
    result = gptdeploy("bench", "--runtime", "trt,ort-trt", env=offline_env(tmp_path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert [line.split(":")[1].strip() for line in lines] == ["error", "error"]
    assert lines[0].startswith("gptdeploy: error: runtime 'trt' cannot run here: TensorRT is not installed")
    assert lines[1].startswith("gptdeploy: error: runtime 'ort-trt' cannot run here: this onnxruntime has no "
                               "TensorrtExecutionProvider")
    assert "gptdeploy[ort-trt]" in lines[1]


@pytest.mark.skipif(not RUNTIMES["trt"].missing(), reason="TensorRT can run here")
def test_generate_on_trt_names_everything_missing(tiny_export_path):
    result = gptdeploy("generate", tiny_export_path, "--runtime", "trt", "--prompt", "Hi")
    assert_refused(result, "runtime 'trt' cannot run on this machine: ")
    for lacking in RUNTIMES["trt"].missing():
        assert lacking in result.stderr


def test_export_and_generate_need_real_weights_or_random(tmp_path):
    """Offline, no weights cached: one line that offers --random and the shakespeare preset."""
    for args in (["export", "--out", str(tmp_path / "out")], ["generate", "--prompt", "Hi"]):
        result = gptdeploy(*args, env=offline_env(tmp_path))
        assert_refused(result, "cannot download gpt2 from the Hugging Face Hub")
        assert "--random" in result.stderr and "shakespeare preset" in result.stderr


@pytest.mark.heavy  # a parity and a bench run (some 4 CPU-s)
def test_bench_and_parity_fall_back_to_random_weights(tmp_path, monkeypatch, capfd):
    """A preset whose trained weights cannot be had: comparisons run on seeded random weights and say so."""
    from gptdeploy.app.parity_run import Target, run_parity
    from gptdeploy.presets import PRESETS, Preset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(PRESETS, "tiny-hub", Preset(PRESETS["tiny"].config, "nobody/tiny-hub", "tiny, from a Hub"))
    report = run_parity("tiny-hub", [Target("torch", "bf16")], prompts=["Hello"], steps=1, greedy_tokens=2)
    assert report.notes[0].startswith("tiny-hub's trained weights are not here") and "seeded random" in report.notes[0]
    assert report.to_dict()["notes"] == report.notes

    from gptdeploy.app.bench import model_under_test
    from gptdeploy.app.bench_settings import BenchSettings

    model = model_under_test(BenchSettings("tiny-hub", ("torch",)))
    assert model.checkpoint.random_seed == 0 and "seeded random weights" in model.notes[0]

    from gptdeploy.app.bench import run_bench
    from gptdeploy.app.bench_report import BenchProgress

    settings = BenchSettings("tiny-hub", ("torch",), prompt_len=4, new_tokens=2, warmup=0, repeat=1, isolate=False)
    with BenchProgress() as progress:  # the command's progress, which says the note
        report = run_bench(settings, progress)
    assert report["runtimes"][0]["status"] == "ok"
    assert "note: tiny-hub's trained weights are not here" in capfd.readouterr().err


@pytest.mark.heavy  # a parity and a bench command (some 5 CPU-s)
def test_parity_and_bench_on_an_export_folder_use_its_checkpoint(tiny_export_path, tmp_path):
    result = gptdeploy("parity", tiny_export_path, "--runtimes", "torch,ort", "--steps", "2", "--greedy-tokens", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS ort fp32" in result.stdout and f"torch and hf run tiny, the checkpoint {tiny_export_path}" in \
        result.stdout
    result = gptdeploy("bench", tiny_export_path, "--runtime", "torch,ort", "--prompt-len", "4", "--new-tokens", "2",
                       "--warmup", "0", "--repeat", "1", "--in-process", "--json", tmp_path / "bench.json")
    assert result.returncode == 0, result.stderr
    import json

    rows = json.loads((tmp_path / "bench.json").read_text())["runtimes"]
    assert [r["status"] for r in rows] == ["ok", "ok"]


def test_a_checkpoint_that_changed_or_went_is_refused(hf_folder, hf_export_path, tmp_path):
    """What the heavy test below checks end to end, on the session's export of hf_folder: a copy of the
    export pointed at a copy of its checkpoint is accepted; once that checkpoint's weights change, and once it
    is gone, it is refused with the reason."""
    from safetensors.torch import load_file, save_file

    from gptdeploy.app.sources import checkpoint_of

    moved = shutil.copytree(hf_folder, tmp_path / "hf")
    folder = shutil.copytree(hf_export_path, tmp_path / "hf-onnx")
    assert read_export(folder).source["source"] == str(hf_folder)
    manifest_edit(folder, lambda m: {**m, "source": {**m["source"], "source": str(moved)}})
    assert checkpoint_of(read_export(folder)).source == str(moved)

    weights = next(moved.glob("*.safetensors"))
    state = load_file(weights)
    name = next(n for n in state if n.endswith("ln_f.weight"))
    save_file({**state, name: state[name] + 1}, weights, metadata={"format": "pt"})
    with pytest.raises(GptDeployError, match=r"whose weights have changed since \(their sha256 differs\)"):
        checkpoint_of(read_export(folder))
    shutil.rmtree(moved)
    with pytest.raises(GptDeployError, match="which cannot be loaded now"):
        checkpoint_of(read_export(folder))


@pytest.mark.heavy  # an export of its own (some 10 CPU-s); by default: the test above
def test_an_export_whose_checkpoint_has_changed_or_is_gone_says_so(hf_folder, tmp_path):
    """The checkpoint is there, but its weights are not the ones exported: refused, not compared; then the
    checkpoint is gone: refused, saying what to pass. (One export for both: each costs some ten CPU-seconds.)"""
    import torch
    from safetensors.torch import load_file, save_file

    from gptdeploy.app.exporting import export_model
    from gptdeploy.loading import load

    moved = shutil.copytree(hf_folder, tmp_path / "hf")
    folder = export_model(load(moved), tmp_path / "hf-onnx").path
    weights = next(moved.glob("*.safetensors"))
    state = load_file(weights)
    name = next(n for n in state if n.endswith("ln_f.weight"))
    state[name] = state[name] + torch.ones_like(state[name])
    save_file(state, weights, metadata={"format": "pt"})
    result = gptdeploy("parity", folder, "--runtimes", "torch,ort")
    assert_refused(result, "whose weights have changed since (their sha256 differs)")

    shutil.rmtree(moved)
    result = gptdeploy("parity", folder, "--runtimes", "torch,ort")
    assert_refused(result, "which cannot be loaded now")
    assert "pass the checkpoint or preset it was exported from as SOURCE" in result.stderr


def test_info_on_an_export_folder_shows_its_manifest(tiny_export_path):
    result = gptdeploy("info", tiny_export_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for fragment in ("export of", "tiny (random weights", "precision", "graph with_past", "onnx/model.onnx",
                     "validation", "passed", "gptdeploy verify"):
        assert fragment in text, fragment


def test_generate_on_random_weights_says_so(tiny_export_path):
    """The note is stderr's last line, so that a refused prompt or a failed step stays the one line there."""
    result = gptdeploy("generate", tiny_export_path, "--prompt", "Hi", "--max-new-tokens", "2", "--seed", "1")
    assert result.returncode == 0, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"note: {tiny_export_path} was exported from tiny with random weights")
    result = gptdeploy("generate", "tiny", "--random", "--prompt", "Hi", "--max-new-tokens", "2", "--seed", "1")
    assert result.stderr.strip().splitlines()[-1].startswith("note: tiny has random weights")
    refused = gptdeploy("generate", "tiny", "--random", "--prompt-ids", "15496,50257")
    assert refused.returncode == 2 and "note:" not in refused.stderr


def test_help_shows_flags_as_flags_and_every_runtime():
    export_help = gptdeploy("export", "--help").stdout
    assert "Usage: gptdeploy export [OPTIONS] [SOURCE]" in export_help and "<bool>" not in export_help
    assert "--random " in export_help and "[default: gpt2]" in " ".join(export_help.split())
    generate_help = " ".join(gptdeploy("generate", "--help").stdout.split())
    assert all(name in generate_help for name in RUNTIMES), generate_help


def test_progress_in_a_log_says_each_step_when_it_starts(tiny_export_path, tmp_path):
    """stderr not a terminal (a log, CI): a line when each long step starts, and one when it ends."""
    folder = shutil.copytree(tiny_export_path, tmp_path / "export")
    result = gptdeploy("optimize", folder, "--variants", "fp32-fused")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    start = lines.index("Fusing onnx/model.onnx for ONNX Runtime ...")
    assert lines[start + 1].startswith("✓ Fusing onnx/model.onnx for ONNX Runtime (")
    assert any(line.startswith("Validating onnx/model_fused.onnx") and line.endswith(" ...") for line in lines)


# --- TensorRT, with stand-ins -------------------------------------------------------------------------


class StandInConfig:
    """The two builder-config calls of a timing cache, refusing a cache made on another device."""

    def __init__(self, accepts_old: bool):
        self.accepts_old, self.used = accepts_old, []

    def create_timing_cache(self, blob: bytes):
        return ("cache", blob)

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        if cache[1] and not self.accepts_old:
            return False  # TensorRT: the cache's device properties differ from this device's
        self.used.append(cache)
        return True


def test_a_timing_cache_from_another_device_is_replaced_by_an_empty_one():
    from gptdeploy.exporters.tensorrt import set_timing_cache

    refusing = StandInConfig(accepts_old=False)
    assert set_timing_cache(refusing, b"from an H100") is False and refusing.used == [("cache", b"")]
    accepting = StandInConfig(accepts_old=True)
    assert set_timing_cache(accepting, b"from this GPU") is True and accepting.used == [("cache", b"from this GPU")]


def test_a_tensorrt_package_without_its_bindings_is_not_tensorrt(tmp_path, monkeypatch):
    import importlib
    import sys

    from gptdeploy.environment import has_tensorrt

    package = tmp_path / "tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text('"""type stubs only"""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    assert has_tensorrt() is False
    (package / "tensorrt.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")  # where the real bindings are
    assert has_tensorrt() is True


def standin_trt_runner():
    from gptdeploy.runtimes.base import ModelInfo
    from gptdeploy.runtimes.trt import TrtRunner

    runner = TrtRunner.__new__(TrtRunner)  # no GPU: only the bookkeeping under test
    runner.info = ModelInfo(n_layer=1, n_head=2, head_dim=4, block_size=16, vocab_size=10)
    runner._present_names = ["present.0.key", "present.0.value"]
    runner._logits = torch.empty(2 * 16 * 10)
    runner._kv_elements = 2 * 2 * 16 * 4
    runner._graphs = OrderedDict()
    runner.cuda_graphs, runner.graph_failure = True, None
    runner.folder = None  # only error messages read it
    return runner


class StandInContext:
    def __init__(self, shapes: dict):
        self.shapes = shapes

    def get_tensor_shape(self, name):
        return self.shapes[name]


def test_output_shapes_are_checked_against_the_buffers():
    from types import SimpleNamespace

    runner = standin_trt_runner()
    runner.folder = SimpleNamespace(path=Path("export"))
    good = {"logits": (2, 1, 10), "present.0.key": (2, 2, 6, 4), "present.0.value": (2, 2, 6, 4)}
    runner._check_output_shapes(StandInContext(good), "decode", batch=2, seq=1, past=5)
    with pytest.raises(GptDeployError, match="would write logits as \\[2, 1, 11\\]"):
        runner._check_output_shapes(StandInContext({**good, "logits": (2, 1, 11)}), "decode", batch=2, seq=1, past=5)
    big = {"logits": (2, 20, 10), "present.0.key": (2, 2, 20, 4), "present.0.value": (2, 2, 20, 4)}
    with pytest.raises(GptDeployError, match="exceed the buffers"):
        runner._check_output_shapes(StandInContext(big), "prefill", batch=2, seq=20, past=0)


def test_captured_graphs_are_evicted_least_recently_used_first():
    from gptdeploy.runtimes.trt import MAX_CUDA_GRAPHS

    runner = standin_trt_runner()
    for past in range(MAX_CUDA_GRAPHS + 10):
        runner._remember((1, past, 0, 1), f"graph {past}")
    assert len(runner._graphs) == MAX_CUDA_GRAPHS and next(iter(runner._graphs)) == (1, 10, 0, 1)


def test_a_failed_capture_turns_cuda_graphs_off(monkeypatch):
    import contextlib

    runner = standin_trt_runner()
    runner._graphs[("old",)] = "graph"
    runner.stream, runner._device = None, "cuda:0"

    @contextlib.contextmanager
    def failing_capture(graph, stream=None):
        raise RuntimeError("operation not permitted when stream is capturing")
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", failing_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    runner._execute = lambda ctx: None
    assert runner._capture(ctx=None) is None
    assert runner.cuda_graphs is False and "operation not permitted" in runner.graph_failure and not runner._graphs


def test_only_the_engine_that_cannot_load_is_rebuilt(tiny_export_path, monkeypatch):
    """The runtime says which engine TensorRT could not load; the application rebuilds that one alone."""
    from gptdeploy.app import sources
    from gptdeploy.errors import EngineUnusable
    from gptdeploy.precision import EXPORT, Resolved
    from gptdeploy.runtimes.registry import RuntimeSpec

    calls = []

    def ensure_engines(folder, settings=None, *, force=False, only=("prefill", "decode"), progress=None):
        calls.append((force, tuple(only)))
        return folder

    class Runner:
        opened = 0

        @classmethod
        def open(cls, target, options):
            cls.opened += 1
            if cls.opened == 1:
                raise EngineUnusable("decode", "TensorRT cannot load trt/decode.engine: a stand-in")
            return cls()

    monkeypatch.setattr(sources, "ensure_engines", ensure_engines)
    spec = RuntimeSpec("stand-in", "", EXPORT, (), "x:y", needs_engines=True)
    monkeypatch.setattr(RuntimeSpec, "runner_class", lambda self: Runner)
    runner = sources._open_folder(spec, read_export(tiny_export_path), Resolved("fp32"), sources.OpenOptions(),
                                  sources.ExportCache(), sources.QUIET)
    assert isinstance(runner, Runner) and calls == [(False, ("prefill", "decode")), (True, ("decode",))]


def test_the_tensorrt_provider_names_the_library_it_cannot_load(tmp_path):
    """A provider library that links libnvinfer.so.10, which is not there: the loader's words name it."""
    from gptdeploy.runtimes.ort_trt import provider_problem

    if shutil.which("gcc") is None:
        pytest.skip("no C compiler here to make the stand-in libraries")
    (tmp_path / "nvinfer.c").write_text("int nvinfer_stand_in(void) { return 10; }\n")
    (tmp_path / "provider.c").write_text("int provider_stand_in(void) { return 0; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", tmp_path / "libnvinfer.so.10", tmp_path / "nvinfer.c"], check=True)
    provider = tmp_path / "libonnxruntime_providers_tensorrt.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", provider, tmp_path / "provider.c", "-Wl,--no-as-needed",
                    f"-L{tmp_path}", "-l:libnvinfer.so.10"], check=True)
    (tmp_path / "libnvinfer.so.10").unlink()
    problem = provider_problem(provider)
    assert "libnvinfer.so.10" in problem and "cannot load" in problem
    assert "is not in this onnxruntime" in provider_problem(tmp_path / "missing.so")


def test_an_export_records_its_checkpoint_by_absolute_path(tmp_path, monkeypatch):
    """`gptdeploy export out/ckpt.pt` from one folder, `gptdeploy parity FOLDER` from another: the manifest's
    source is the checkpoint's absolute path, so it is found again."""
    from gptdeploy.loading import load
    from tests.conftest import write_nanogpt_checkpoint

    write_nanogpt_checkpoint(tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    record = load("out/ckpt.pt").source_record()
    assert record["source"] == str(tmp_path / "out" / "ckpt.pt")
    assert load("tiny", weights="random").source_record()["source"] == "tiny"  # presets by name
