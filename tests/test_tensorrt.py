"""TensorRT: engine settings, shape profiles, cache keys and stale engines, manifest entries, and the
error lines of the TensorRT commands and runtimes on a machine without a GPU or TensorRT.

The tests marked `gpu` build and run real engines; they skip, with the reason, where TensorRT or a
CUDA GPU is missing (scripts/gpu_checks.sh runs them on a GPU machine).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest

from gptdeploy.engines import EngineSettings, Range, engine_spec, make_settings, profile_shapes, recorded_settings
from gptdeploy.environment import missing
from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import DECODE, MANIFEST, PREFILL, read_export, update_manifest
from gptdeploy.files import write_atomic
from tests.test_cli import assert_one_line_error, gptdeploy

TRT_MISSING = "; ".join(missing("tensorrt", "gpu", "torch-cuda")) or None
needs_tensorrt = pytest.mark.skipif(TRT_MISSING is not None, reason=str(TRT_MISSING))


@pytest.fixture
def export_copy(tiny_export_path, tmp_path):
    """A private copy of the tiny export that a test may change."""
    return shutil.copytree(tiny_export_path, tmp_path / "tiny")


# --- settings and shape profiles ------------------------------------------------------------


def test_default_settings_cover_the_context():
    s = make_settings(1024)
    assert s.batch == Range(1, 1, 8)
    assert s.sequence == Range(1, 128, 1024)  # a prompt can fill the whole context
    assert s.past == Range(1, 256, 1023)  # room for the one new token of a decode step
    assert s.workspace_gib == 4.0


def test_an_unset_value_fits_inside_the_given_ones():
    assert make_settings(128, batch=(4, None, None)).batch == Range(4, 4, 8)
    assert make_settings(128, batch=(None, None, 2)).batch == Range(1, 1, 2)
    assert make_settings(128, batch=(None, 16, None)).batch == Range(1, 16, 16)
    assert make_settings(128, past=(None, None, 10)).past == Range(1, 10, 10)


@pytest.mark.parametrize(
    "options, fragment",
    [
        (dict(batch=(4, 2, None)), "batch profile: need 1 <= min <= opt <= max, got min 4, opt 2"),
        (dict(batch=(None, 5, 4)), "got min 1, opt 5, max 4"),
        (dict(sequence=(0, None, None)), "sequence profile: need 1 <= min"),
        (dict(sequence=(None, None, 129)), "sequence max 129 exceeds the model's context (block_size 128)"),
        (dict(past=(None, None, 128)), "past max 128 leaves no room for the new token: at most block_size - 1 = 127"),
        (dict(workspace_gib=0), "workspace must be more than 0 GiB"),
    ],
)
def test_contradictory_settings_are_errors(options, fragment):
    with pytest.raises(GptDeployError) as e:
        make_settings(128, **options)
    assert fragment in str(e.value)


def test_settings_round_trip_through_json():
    s = make_settings(256, batch=(2, 3, 4), workspace_gib=1.5)
    assert EngineSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_prefill_profile_is_the_prompt_without_past(tiny_export_path):
    folder = read_export(tiny_export_path)
    s = make_settings(128, batch=(1, 2, 4), sequence=(3, 16, 64))
    shapes = profile_shapes(folder.manifest["graphs"]["no_past"], PREFILL, s)
    assert set(shapes) == {"input_ids", "attention_mask", "position_ids"}
    for name in shapes:  # (min, opt, max), each [batch, sequence]
        assert shapes[name] == ((1, 3), (2, 16), (4, 64))


def test_decode_profile_is_one_token_after_the_past(tiny_export_path):
    folder = read_export(tiny_export_path)
    cfg = folder.config
    heads, head_dim = cfg["n_head"], cfg["n_embd"] // cfg["n_head"]
    s = make_settings(128, batch=(1, 1, 8), past=(1, 32, 127))
    shapes = profile_shapes(folder.manifest["graphs"]["with_past"], DECODE, s)
    assert shapes["input_ids"] == shapes["position_ids"] == ((1, 1), (1, 1), (8, 1))
    # the mask covers past + new at each point, so the profile's three points are self-consistent
    assert shapes["attention_mask"] == ((1, 2), (1, 33), (8, 128))
    for i in range(cfg["n_layer"]):
        for kv in ("key", "value"):
            assert shapes[f"past_key_values.{i}.{kv}"] == (
                (1, heads, 1, head_dim), (1, heads, 32, head_dim), (8, heads, 127, head_dim))


def test_ort_trt_leaves_precision_to_the_graph(tiny_export_path, tmp_path):
    """No trt_fp16_enable: it makes ONNX Runtime build a weakly typed network, which TensorRT 11 removed; an
    fp16 export's own types decide, as in the trt runtime. The profile is the one bench and parity use."""
    from gptdeploy.runtimes.ort_trt import provider_options

    folder = read_export(tiny_export_path)
    shapes = profile_shapes(folder.manifest["graphs"]["with_past"], DECODE, make_settings(128))
    options = provider_options(shapes, device_id=0, cache_dir=tmp_path, workspace_gib=1)
    assert not [k for k in options if "fp16" in k or "int8" in k or "bf16" in k]
    assert options["trt_engine_cache_enable"] and options["trt_profile_max_shapes"].startswith("input_ids:")


def test_an_unknown_symbolic_dimension_is_an_error():
    graph = {"inputs": [{"name": "input_ids", "shape": ["batch_size", "beam_width"]}]}
    with pytest.raises(GptDeployError, match="input input_ids has a dimension 'beam_width'"):
        profile_shapes(graph, PREFILL, make_settings(128))


# --- cache keys and stale engines -----------------------------------------------------------


def spec_for(folder_path, engine=PREFILL, settings=None, tensorrt="10.8.0.43", cc="9.0", gpu="NVIDIA H100"):
    folder = read_export(folder_path)
    return engine_spec(folder, engine, settings or make_settings(folder.config["block_size"]), tensorrt, cc, gpu)


def test_cache_key_is_stable(tiny_export_path):
    assert spec_for(tiny_export_path).key == spec_for(tiny_export_path).key
    assert spec_for(tiny_export_path, PREFILL).key != spec_for(tiny_export_path, DECODE).key


@pytest.mark.parametrize(
    "change",
    [
        dict(settings=make_settings(128, batch=(1, 1, 4))),
        dict(settings=make_settings(128, sequence=(1, 32, 128))),
        dict(settings=make_settings(128, workspace_gib=2.0)),
        dict(tensorrt="11.4.0.106"),
        dict(cc="8.9"),
        dict(gpu="NVIDIA H200"),  # the same compute capability as an H100; an engine is built for one device
    ],
)
def test_cache_key_changes_with_each_input(tiny_export_path, change):
    assert spec_for(tiny_export_path, **change).key != spec_for(tiny_export_path).key


def test_cache_key_changes_with_the_graph_bytes_and_the_precision(export_copy):
    before = spec_for(export_copy)
    graph = export_copy / before.graph_file
    graph.write_bytes(graph.read_bytes() + b"\0")
    assert spec_for(export_copy).key != before.key
    assert dataclasses.replace(before, precision="fp16").key != before.key


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record_fake_build(folder_path, spec, payload=b"engine bytes"):
    """Records `spec` as built, with `payload` standing in for TensorRT's serialized engine."""
    (folder_path / spec.file).parent.mkdir(exist_ok=True)
    written = {spec.file: write_atomic(folder_path / spec.file, [payload])}
    entry = spec.manifest_entry(size=len(payload), build_seconds=1.0)
    return update_manifest(read_export(folder_path), {"engines": {spec.engine: entry}}, written).manifest


def test_stale_engine_detection(export_copy):
    spec = spec_for(export_copy)
    assert spec.stale_reason(None, export_copy) == "none built yet"
    manifest = record_fake_build(export_copy, spec)
    entry = manifest["engines"][PREFILL]
    assert spec.stale_reason(entry, export_copy) is None  # the cached engine is used

    reasons = {
        "tensorrt": spec_for(export_copy, tensorrt="11.4.0.106").stale_reason(entry, export_copy),
        "gpu": spec_for(export_copy, cc="8.9").stale_reason(entry, export_copy),
        "device": spec_for(export_copy, gpu="NVIDIA H200").stale_reason(entry, export_copy),
        "shapes": spec_for(export_copy, settings=make_settings(128, batch=(1, 1, 2))).stale_reason(entry, export_copy),
        "workspace": spec_for(export_copy, settings=make_settings(128, workspace_gib=1)).stale_reason(entry, export_copy),
        "precision": dataclasses.replace(spec, precision="fp16").stale_reason(entry, export_copy),
    }
    assert reasons == {
        "tensorrt": "built for tensorrt 10.8.0.43, this is 11.4.0.106",
        "gpu": "built for compute capability 9.0, this is 8.9",
        "device": "built for gpu NVIDIA H100, this is NVIDIA H200",
        "shapes": "built for other input shapes",
        "workspace": "built with other settings",
        "precision": "built for precision fp32, this is fp16",
    }

    (export_copy / spec.file).write_bytes(b"engine bytes, truncated or replaced")
    assert spec.stale_reason(entry, export_copy) == f"{spec.file} changed since it was built"
    (export_copy / spec.file).unlink()
    assert spec.stale_reason(entry, export_copy) == f"{spec.file} is missing"

    entry = record_fake_build(export_copy, spec)["engines"][PREFILL]
    graph = export_copy / spec.graph_file
    graph.write_bytes(graph.read_bytes() + b"\0")
    assert spec_for(export_copy).stale_reason(entry, export_copy) == "the ONNX graph changed since it was built"


# --- the manifest ---------------------------------------------------------------------------


def test_engines_are_recorded_in_the_manifest(export_copy):
    settings = make_settings(128, batch=(1, 2, 4))
    specs = [spec_for(export_copy, engine, settings) for engine in (PREFILL, DECODE)]
    for spec in specs:
        record_fake_build(export_copy, spec, payload=spec.engine.encode() * 100)
    folder = read_export(export_copy)  # still a valid export folder
    engines = folder.manifest["engines"]
    assert set(engines) == {PREFILL, DECODE}
    for spec in specs:
        entry = engines[spec.engine]
        assert entry["file"] == spec.file and entry["key"] == spec.key and entry["bytes"] == len(spec.engine) * 100
        assert entry["onnx"] == spec.graph_file and entry["graph_sha256"] == [sha256(export_copy / spec.graph_file)]
        assert entry["tensorrt"] == "10.8.0.43" and entry["compute_capability"] == "9.0"
        assert entry["gpu"] == "NVIDIA H100"
        assert entry["profile"]["input_ids"]["max"][0] == 4
    assert engines[PREFILL]["graph"] == "no_past" and engines[DECODE]["graph"] == "with_past"
    assert recorded_settings(folder) == settings

    # "files" lists every file but the manifest, each with its true sha256, and nothing else
    on_disk = {p.relative_to(export_copy).as_posix(): sha256(p) for p in export_copy.rglob("*")
               if p.is_file() and p.name != MANIFEST}
    assert folder.manifest["files"] == on_disk
    assert not list(export_copy.rglob(".*"))


def test_an_interrupted_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "trt" / "prefill.engine"

    def chunks():
        yield b"half of a new engine"
        raise KeyboardInterrupt

    target.parent.mkdir()
    write_atomic(target, [b"the old engine"])
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, chunks())
    assert target.read_bytes() == b"the old engine"
    assert [p.name for p in target.parent.iterdir()] == ["prefill.engine"]


# --- commands and runtimes without a GPU or TensorRT ----------------------------------------


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a CUDA GPU are present here")
def test_build_engine_says_what_is_missing(tiny_export_path):
    result = gptdeploy("build-engine", str(tiny_export_path))
    assert_one_line_error(result, "TensorRT cannot run here")
    assert "pip install 'gptdeploy[trt]'" in result.stderr or "no CUDA GPU" in result.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--min-batch", "4", "--max-batch", "2"], "batch profile: need 1 <= min <= opt <= max"),
        (["--max-seq", "4096"], "sequence max 4096 exceeds the model's context (block_size 128)"),
        (["--precision", "fp16"], "is an fp32 export; fp16 engines are built from an fp16 export"),
        (["--workspace", "0"], "workspace must be more than 0 GiB"),
    ],
)
def test_build_engine_bad_options_are_one_line(tiny_export_path, args, fragment):
    assert_one_line_error(gptdeploy("build-engine", str(tiny_export_path), *args), fragment)


def test_build_engine_needs_an_export_folder(tmp_path):
    assert_one_line_error(gptdeploy("build-engine", str(tmp_path)), "is not a gptdeploy export folder")


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a CUDA GPU are present here")
@pytest.mark.parametrize("runtime, fragment", [("trt", "gptdeploy[trt]"), ("ort-trt", "TensorrtExecutionProvider")])
def test_tensorrt_runtimes_say_what_is_missing(tiny_export_path, runtime, fragment):
    result = gptdeploy("generate", str(tiny_export_path), "--runtime", runtime, "--prompt", "Hello")
    assert_one_line_error(result, f"runtime '{runtime}' cannot run on this machine")
    assert fragment in result.stderr


# --- on a GPU with TensorRT -----------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_export(lively_export_path, tmp_path_factory):
    if TRT_MISSING:
        pytest.skip(TRT_MISSING)
    return shutil.copytree(lively_export_path, tmp_path_factory.mktemp("trt") / "lively")


def reference_steps(runner, prompts, steps=4):
    """Logits of a ragged, left-padded batch: the prefill, then `steps` greedy decode steps."""
    width = max(len(p) for p in prompts)
    ids = np.array([[0] * (width - len(p)) + p for p in prompts], dtype=np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    out = runner.step(ids, mask, positions, runner.new_cache(len(prompts)))
    logits, cache = [out.logits], out.cache
    for _ in range(steps):
        token = logits[-1][:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        out = runner.step(token, mask, positions, cache)
        logits.append(out.logits)
        cache = out.cache
    return logits, runner.cache_to_numpy(cache)


PROMPTS = [[464, 2068, 7586, 21831, 18045], [15496, 995]]


@pytest.mark.gpu
@needs_tensorrt
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_trt_runner_matches_the_reference(gpu_export, lively, cuda_graphs):
    from gptdeploy.runtimes.torch_runner import TorchRunner
    from gptdeploy.runtimes.trt import TrtRunner

    from gptdeploy.app.exporting import ensure_engines

    expected, expected_cache = reference_steps(TorchRunner(lively.model), PROMPTS)
    with TrtRunner(ensure_engines(read_export(gpu_export)), cuda_graphs=cuda_graphs) as runner:
        got, got_cache = reference_steps(runner, PROMPTS)
        if cuda_graphs:  # the second run replays the captured graphs
            assert all(np.array_equal(a, b) for a, b in zip(reference_steps(runner, PROMPTS)[0], got))
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, atol=1e-3, rtol=0)  # fp32 engines, built without TF32
        assert (g[:, -1].argmax(-1) == e[:, -1].argmax(-1)).all()
    for (ek, ev), (gk, gv) in zip(expected_cache, got_cache):
        np.testing.assert_allclose(gk, ek, atol=1e-3, rtol=0)
        np.testing.assert_allclose(gv, ev, atol=1e-3, rtol=0)


@pytest.mark.gpu
@needs_tensorrt
def test_fp16_engines_come_from_the_fp16_export(lively, tmp_path):
    from gptdeploy.app.exporting import export_model
    from gptdeploy.runtimes.torch_runner import TorchRunner
    from gptdeploy.runtimes.trt import TrtRunner

    from gptdeploy.app.exporting import ensure_engines

    folder = export_model(lively, tmp_path / "lively-fp16", precision="fp16").path
    expected, _ = reference_steps(TorchRunner(lively.model), PROMPTS)
    with TrtRunner(ensure_engines(read_export(folder))) as runner:
        got, cache = reference_steps(runner, PROMPTS)
    assert read_export(folder).manifest["engines"][DECODE]["file"] == "trt/decode_fp16.engine"
    assert cache[0][0].dtype == np.float16  # the KV cache is fp16, as in the graph
    for e, g in zip(expected, got):
        assert np.isfinite(g).all()
        assert (g[:, -1].argmax(-1) == e[:, -1].argmax(-1)).all()


@pytest.mark.gpu
@needs_tensorrt
def test_engines_are_built_once_then_reused(gpu_export, capfd):
    from gptdeploy.app.exporting import ensure_engines
    from gptdeploy.progress import Progress

    folder = ensure_engines(read_export(gpu_export))
    paths = {name: gpu_export / entry["file"] for name, entry in folder.engines.items()}
    mtimes = {name: p.stat().st_mtime_ns for name, p in paths.items()}
    capfd.readouterr()
    assert ensure_engines(read_export(gpu_export), progress=Progress()).engines == folder.engines
    assert "using the cached prefill engine" in capfd.readouterr().err
    assert {name: p.stat().st_mtime_ns for name, p in paths.items()} == mtimes
    manifest = read_export(gpu_export).manifest
    for name, path in paths.items():
        assert manifest["files"][path.relative_to(gpu_export).as_posix()] == sha256(path)


@pytest.mark.gpu
@needs_tensorrt
def test_a_corrupt_engine_is_rebuilt_alone(gpu_export, lively):
    from gptdeploy.app.exporting import ensure_engines
    from gptdeploy.app.sources import open_runner

    folder = ensure_engines(read_export(gpu_export))
    engine = gpu_export / folder.engines[DECODE]["file"]
    prefill = gpu_export / folder.engines[PREFILL]["file"]
    size, prefill_mtime = engine.stat().st_size, prefill.stat().st_mtime_ns
    engine.write_bytes(b"\0" * size)  # same size: only deserialization can tell
    runner, _ = open_runner("trt", gpu_export)
    with runner:
        logits, _ = reference_steps(runner, PROMPTS, steps=1)
    assert engine.read_bytes() != b"\0" * size and prefill.stat().st_mtime_ns == prefill_mtime
    assert np.isfinite(logits[-1]).all()


@pytest.mark.gpu
def test_ort_trt_runner_matches_the_reference(gpu_export, lively):
    from gptdeploy.runtimes.ort_trt import OrtTrtRunner
    from gptdeploy.runtimes.registry import RUNTIMES
    from gptdeploy.runtimes.torch_runner import TorchRunner

    if lacking := RUNTIMES["ort-trt"].missing():
        pytest.skip("; ".join(lacking))
    expected, _ = reference_steps(TorchRunner(lively.model), PROMPTS)
    with OrtTrtRunner(gpu_export) as runner:
        got, _ = reference_steps(runner, PROMPTS)
    for e, g in zip(expected, got):
        # TF32 stays on in ONNX Runtime's TensorRT builds: looser than `trt`, top-1 still exact
        np.testing.assert_allclose(g, e, atol=1e-2, rtol=0)
        assert (g[:, -1].argmax(-1) == e[:, -1].argmax(-1)).all()
