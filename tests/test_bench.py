"""gptdeploy bench: the report's fields and arithmetic, unavailable and failing runtimes, JSON, the CLI.

The measurements are tiny (the tiny preset, a few tokens): these tests check what is reported, not how
fast anything is; benchmarks are a command, `gptdeploy bench`.
"""

import json
import os

import numpy as np
import pytest

from gptdeploy.app.bench import ModelUnderTest, model_under_test, run_bench, write_json
from gptdeploy.app.bench_settings import FAILED, OK, UNAVAILABLE, BenchSettings
from gptdeploy.app.machine import ResidentMemory, measure_read_bandwidth
from gptdeploy.model import GPT, GPTConfig
from gptdeploy.precision import CHECKPOINT
from gptdeploy.runtimes.registry import RUNTIMES, RuntimeSpec
from tests import sleepy_runtime
from tests.test_cli import assert_one_line_error, gptdeploy

SMALL = dict(batches=(1, 2), prompt_len=6, new_tokens=4, warmup=1, repeat=2, random_weights=True, bandwidth_mib=64)


@pytest.fixture(scope="module")
def export_cache(tiny, tiny_export_path, tmp_path_factory):
    """A private export cache holding `tiny`'s export already (the export itself is tested elsewhere)."""
    from tests.conftest import cache_holding

    path = tmp_path_factory.mktemp("export-cache")
    cache_holding(path, tiny, tiny_export_path)
    saved = os.environ.get("GPTDEPLOY_CACHE")
    os.environ["GPTDEPLOY_CACHE"] = str(path)
    yield path
    if saved is None:
        del os.environ["GPTDEPLOY_CACHE"]
    else:
        os.environ["GPTDEPLOY_CACHE"] = saved


@pytest.fixture(scope="module")
def report(export_cache):
    """hf, torch and ort on tiny, in this process (the CLI test covers the child processes)."""
    return run_bench(BenchSettings("tiny", ("hf", "torch", "ort"), isolate=False, **SMALL))


def test_report_has_every_field(report):
    assert report["format"] == "gptdeploy-bench" and report["baseline"] == "hf"
    settings = report["settings"]
    assert settings["batches"] == [1, 2] and settings["prompt_len"] == 6 and settings["new_tokens"] == 4
    assert settings["threads"] >= 1 and settings["precision"] == "fp32" and settings["ort_optimization"] == "all"
    machine = report["machine"]
    assert machine["cpu"] and machine["physical_cores"] >= 1 and machine["logical_cpus"] >= 1
    assert isinstance(machine["gpus"], list) and len(machine["load_average_start"]) == 3
    assert {"numpy", "torch", "onnxruntime", "transformers"} <= set(report["versions"])
    bandwidth = report["memory_bandwidth"]
    assert len(bandwidth["samples_gb_per_s"]) == 2 * 2 + 1  # before each timed round of each batch, and at the end
    assert bandwidth["gb_per_s"] == pytest.approx(np.median(bandwidth["samples_gb_per_s"]), abs=0.01)
    model = report["model"]
    assert model["parameters"] == GPT(GPTConfig(**model["config"])).num_params()
    assert [r["runtime"] for r in report["runtimes"]] == ["hf", "torch", "ort"]
    for runtime in report["runtimes"]:
        assert runtime["status"] == OK, runtime
        assert runtime["device"] == "cpu" and runtime["precision"] == "fp32" and runtime["threads"] >= 1
        assert runtime["memory"]["run_peak_rss_mb"] > 0 and runtime["memory"]["setup_peak_rss_mb"] > 0
        assert [b["batch"] for b in runtime["batches"]] == [1, 2]
        for b in runtime["batches"]:
            assert len(b["prefill"]["runs_ms"]) == 2 and b["decode"]["steps"] == 3
            assert 0 < b["decode"]["p50_ms"] <= b["decode"]["p90_ms"] <= b["decode"]["p99_ms"]
            assert 0 < b["generation"]["ttft_ms"] / 1e3 < b["generation"]["total_s"]
            assert b["generation"]["new_tokens"] == 4
            assert set(b["speedup"]) == {"prefill", "decode", "decode_end_to_end", "generation"}
            assert b["generation"]["decode_ms_per_token"] > 0
            floor = b["bandwidth_floor"]
            assert 0 < floor["floor_ms"] and floor["read_gb_per_s"] == bandwidth["gb_per_s"]
    hf, torch_, ort = report["runtimes"]
    assert set(hf["setup"]) == {"load_s"} and set(torch_["setup"]) == {"load_s"}
    assert {"load_s", "export_s", "export_reused", "session_s"} == set(ort["setup"]) and ort["setup"]["export_reused"]
    assert all(v == 1.0 for b in hf["batches"] for v in b["speedup"].values())


@pytest.fixture
def sleepy(monkeypatch):
    """tests/sleepy_runtime.py registered as the runtime "sleepy": one module plus one registry entry."""
    spec = RuntimeSpec("sleepy", "sleeps a known time per step", CHECKPOINT, (), "tests.sleepy_runtime:SleepyRunner")
    monkeypatch.setitem(RUNTIMES, "sleepy", spec)
    return sleepy_runtime


def test_figures_match_a_runtime_of_known_speed(sleepy):
    """Every figure against the step times the runtime was built with, not against bench's own formulas."""
    prefill_s, decode_s = sleepy.PREFILL_S, sleepy.DECODE_S
    report = run_bench(BenchSettings("tiny", ("sleepy",), isolate=False, **{**SMALL, "batches": (1, 3)}))
    (row,) = report["runtimes"]
    assert row["status"] == OK and report["baseline"] == "sleepy"
    for b in row["batches"]:
        batch, steps = b["batch"], 3  # new_tokens 4: the first from the prefill
        assert prefill_s <= b["prefill"]["latency_ms"] / 1e3 < prefill_s + 0.02
        assert b["prefill"]["tokens_per_s"] == pytest.approx(batch * 6 / prefill_s, rel=0.35)
        assert decode_s <= b["decode"]["p50_ms"] / 1e3 < decode_s + 0.01
        assert b["decode"]["tokens_per_s"] == pytest.approx(batch / decode_s, rel=0.35)
        assert prefill_s <= b["generation"]["ttft_ms"] / 1e3 < prefill_s + 0.03
        assert b["generation"]["total_s"] == pytest.approx(prefill_s + steps * decode_s, rel=0.35)
        assert b["generation"]["total_s"] >= prefill_s + steps * decode_s
        # end to end: (total - first token) / later tokens, the loop's own work included
        assert decode_s <= b["generation"]["decode_ms_per_token"] / 1e3 < decode_s + 0.01


def test_bytes_per_step_count_the_weights_a_decode_step_reads():
    """gpt2: every parameter but the position table (one row of it is read), 4 bytes each in fp32."""
    gpt2 = ModelUnderTest(GPTConfig().to_dict(), "random", None, "fp32")
    assert gpt2.parameters == 124_439_808
    assert gpt2.weight_bytes_per_step("fp32") == (124_439_808 - 1024 * 768 + 768) * 4
    assert gpt2.weight_bytes_per_step("fp16") * 2 == gpt2.weight_bytes_per_step("fp32")
    assert gpt2.kv_bytes(8, 100, "fp32") == 2 * 12 * 8 * 100 * 768 * 4
    no_bias = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, bias=False)
    assert ModelUnderTest(no_bias.to_dict(), "", None, "fp32").parameters == GPT(no_bias).num_params()


@pytest.mark.heavy  # three bench runs (some 5 CPU-s beyond the lively export)
def test_runtimes_that_cannot_run_are_reported_with_the_reason(lively_export_path, tmp_path):
    """An export folder whose checkpoint cannot be had again (lively's weights were made by a test): torch
    and hf are unavailable, ort runs, baseline falls to it."""
    report = run_bench(BenchSettings(str(lively_export_path), ("hf", "torch", "ort"), isolate=False,
                                     **{**SMALL, "batches": (1,)}))
    hf, torch_, ort = report["runtimes"]
    for row in (hf, torch_):
        assert row["status"] == UNAVAILABLE and "cannot be loaded now" in row["reason"], row
    assert ort["status"] == OK and report["baseline"] == "ort" and set(ort["setup"]) == {"session_s"}
    for name in ("ort-cuda", "trt"):  # on a machine without them, a reason that says how to install them
        if missing := RUNTIMES[name].missing():
            row = run_bench(BenchSettings(str(lively_export_path), (name, "ort"), isolate=False,
                                          **SMALL))["runtimes"][0]
            assert row == {"runtime": name, "status": UNAVAILABLE, "reason": "; ".join(missing)}
            assert "install" in row["reason"]


def test_a_runtime_that_fails_on_the_model_is_a_row_not_a_crash(tmp_path):
    from tests.conftest import write_nanogpt_checkpoint

    path, _ = write_nanogpt_checkpoint(tmp_path / "nobias", bias=False)  # transformers' GPT-2 has biases
    report = run_bench(BenchSettings(str(path), ("hf", "torch"), isolate=False,
                                     **{**SMALL, "batches": (1,), "random_weights": False}))
    hf, torch_ = report["runtimes"]
    assert hf["status"] == UNAVAILABLE and "bias=False" in hf["reason"]
    assert torch_["status"] == OK and report["baseline"] == "torch"


def test_a_worker_process_that_dies_is_a_failure_with_its_exit_code():
    import signal

    from gptdeploy.app.bench_worker import Worker, WorkerFailed

    settings = BenchSettings("tiny", ("torch",), threads=1, **{**SMALL, "batches": (1,)})
    worker = Worker("runtime", (settings, "torch", "cpu", None))
    try:
        assert set(worker.call("round", 1)) == {"prefill_s", "steps_s"}
        os.kill(worker._process.pid, signal.SIGKILL)
        with pytest.raises(WorkerFailed, match="died with exit code -9"):
            worker.call("round", 1)
    finally:
        worker.close()


def test_json_is_written_whole_and_reads_back(report, tmp_path):
    path = tmp_path / "bench.json"
    write_json(report, path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary file left behind


def test_resident_memory_sees_an_allocation_and_resets_its_peak():
    memory = ResidentMemory()
    if not memory.resettable:
        pytest.skip("the peak resident memory cannot be reset on this system (Linux only)")
    memory.reset_peak()
    before = memory.current_mb()
    block = np.ones(200 * 10**6 // 8)  # 200 MB, written, so resident
    assert memory.peak_mb() >= before + 190
    del block
    memory.reset_peak()
    assert memory.peak_mb() < before + 100


def test_gpu_memory_monitor_without_nvml_reports_nothing():
    from gptdeploy.app.machine import GpuMemoryMonitor

    monitor = GpuMemoryMonitor()
    if monitor.available:
        pytest.skip("NVML is available here (test_gpu_memory_monitor_counts_this_process covers it)")
    with monitor:
        pass
    assert monitor.peak_mb() is None and monitor.held == 0


@pytest.mark.gpu
def test_gpu_memory_monitor_counts_this_process():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to PyTorch")
    from gptdeploy.app.machine import GpuMemoryMonitor

    monitor = GpuMemoryMonitor(0)
    assert monitor.available, "a CUDA GPU but no NVML (libnvidia-ml.so.1)"
    torch.zeros(1, device="cuda")  # the CUDA context, outside the measurement
    with monitor:
        block = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
        block.fill_(1)
        torch.cuda.synchronize()
    assert monitor.held >= 256 * 2**20 and monitor.peak_mb() >= 268
    monitor.reset_peak()
    with monitor:
        del block
        torch.cuda.empty_cache()
    assert monitor.held < 256 * 2**20 and monitor.peak_mb() >= 268  # the peak of the block, held at its start


def test_read_bandwidth_is_measured():
    result = measure_read_bandwidth(size_mib=32, repeats=2, threads=2)
    assert result["gb_per_s"] == max(result["kernels_gb_per_s"].values()) > 0.1
    assert set(result["kernels_gb_per_s"]) == {"max", "gemv"} and result["threads"] == 2


def test_settings_are_checked_before_anything_runs(tiny_export_path):
    from gptdeploy.errors import GptDeployError

    with pytest.raises(GptDeployError, match="context of 128"):
        run_bench(BenchSettings("tiny", ("torch",), prompt_len=120, new_tokens=20, random_weights=True))
    with pytest.raises(GptDeployError, match="is a fp32 export"):
        model_under_test(BenchSettings(str(tiny_export_path), ("ort",), precision="fp16"))


def test_cli_bench_in_child_processes(tiny_bench_cli):
    result, report, _ = tiny_bench_cli
    torch_, ort, ort_cuda = report["runtimes"]
    assert torch_["status"] == ort["status"] == OK and report["baseline"] == "torch"
    assert ort["setup"]["export_reused"] is True
    for name in ("torch", "ort", "ort-cuda", "Speed", "Set-up and memory", "memory read bandwidth"):
        assert name in result.stdout
    if ort_cuda["status"] == UNAVAILABLE:
        assert f"ort-cuda: unavailable: {ort_cuda['reason']}" in result.stdout
    assert FAILED not in [r["status"] for r in report["runtimes"]]


@pytest.mark.parametrize("args, fragment", [
    (["--batch", "1,x"], "--batch takes comma-separated integers"),
    (["--batch", "0"], "batch sizes must be >= 1"),
    (["--runtime", "torch,onnx"], "unknown runtime 'onnx'"),
    (["--runtime", "torch,torch"], "named twice"),
    (["--new-tokens", "1"], "--new-tokens must be >= 2"),
    (["--repeat", "0"], "--repeat >= 1"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--optimization", "max"], "unknown graph optimization level 'max'"),
    (["--prompt-len", "120", "--new-tokens", "20"], "more than the model's context of 128"),
    (["--json", "/nonexistent/dir/out.json"], "does not exist"),
])
def test_cli_bad_input_is_one_line(args, fragment):
    assert_one_line_error(gptdeploy("bench", "tiny", "--random", "--runtime", "torch", *args), fragment)


def test_cli_unknown_model_is_one_line():
    assert_one_line_error(gptdeploy("bench", "gpt5", "--runtime", "torch"), "unknown model")
