"""Parity: the metric math against hand-computed cases, every runtime x precision this machine has
against the torch fp32 reference, a graph with one weight changed that parity must catch, the
command as a user meets it, and the comparator without torch."""

import hashlib
import json
import math
import re
import shutil

import numpy as np
import pytest

from gptdeploy.errors import GptDeployError
from gptdeploy.app.parity_run import Target
from gptdeploy.compare import (
    METRICS, TOLERANCES, agreeing_prefix, cache_metrics, logits_metrics, looser_precision, parse_tolerances, passes,
    passing_tolerance,
)
from gptdeploy.steps import decode_inputs, prefill_inputs
from gptdeploy.runtimes.registry import RUNTIMES
from tests.test_cli import assert_one_line_error, gptdeploy
from tests.test_runtimes import run_without_torch

PROMPTS = ["Hello world", "The", "A longer prompt, so that the batch is ragged"]
QUICK = dict(prompts=PROMPTS, steps=4, greedy_tokens=16, weights="random")


# --- the metric math, on cases small enough to compute by hand ---


def test_logits_metrics_by_hand():
    ref = np.array([[1.0, 2.0, 3.0, 4.0],
                    [0.0, 0.0, 1.0, -2.0]])
    test = np.array([[1.0, 2.0, 4.5, 4.0],  # 3.0 -> 4.5: the top-1 token changes from id 3 to id 2
                     [0.0, 0.0, 1.0, -1.5]])  # -2.0 -> -1.5
    m = logits_metrics(test, ref)
    assert m["max_abs"] == 1.5
    assert m["mean_abs"] == pytest.approx((1.5 + 0.5) / 8)
    # per row: max |diff| / max |ref|: 1.5 / 4 and 0.5 / 2
    assert m["max_rel"] == pytest.approx(0.375)
    # row 0: (1 + 4 + 13.5 + 16) / sqrt(30 * 41.25); row 1: (1 + 3) / sqrt(5 * 3.25)
    assert m["cosine"] == pytest.approx(min(34.5 / math.sqrt(30 * 41.25), 4 / math.sqrt(5 * 3.25)))
    assert m["cosine"] == pytest.approx(0.980723, abs=1e-6)
    assert m["top1"] == 0.5
    # the reference put id 3 (4.0) one unit above id 2 (3.0), which test chose; its row's max |logit| is 4
    assert m["flip_lead_abs"] == 1.0 and m["flip_lead"] == 0.25
    assert m["top5"] == 1.0  # 4 ids: the "top-5" of each row is every id
    assert m["nan"] == m["inf"] == 0


def test_top5_overlap_and_the_vocab_limit():
    ref = np.array([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 0.0]])
    test = np.array([[9.0, 8.0, 7.0, 6.0, 5.0, 0.0, 0.0, 50.0]])
    # the whole vocabulary: id 7 (50.0) is test's top-1 and pushes id 4 out of its top 5: 4 of 5 shared
    whole = logits_metrics(test, ref)
    assert whole["top1"] == 0.0 and whole["top5"] == pytest.approx(4 / 5)
    # id 7 lies beyond a 7-token vocabulary (nanoGPT's padding): never a token, so not compared
    limited = logits_metrics(test, ref, vocab_limit=7)
    assert limited["top1"] == 1.0 and limited["top5"] == 1.0
    assert limited["max_abs"] == 50.0  # the numeric metrics still see every id
    # a top-5 that shares 3 tokens
    assert logits_metrics(np.array([[0.0, 0.0, 7.0, 6.0, 5.0, 4.0, 3.0]]), ref[:, :7])["top5"] == pytest.approx(3 / 5)


def test_nan_and_inf_are_counted_and_fail_every_check():
    ref = np.zeros((2, 3))
    test = np.array([[0.0, np.nan, 0.0], [np.inf, 0.0, 0.0]])
    m = logits_metrics(test, ref)
    assert m["nan"] == 1 and m["inf"] == 1
    assert math.isnan(m["max_abs"]) and math.isnan(m["cosine"])
    assert not passes("max_abs", m["max_abs"], 1e9) and not passes("cosine", m["cosine"], -1.0)
    assert passing_tolerance("max_abs", m["max_abs"]) is None


def test_cosine_of_zero_rows():
    m = logits_metrics(np.array([[0.0, 0.0], [0.0, 0.0]]), np.array([[0.0, 0.0], [1.0, 0.0]]))
    assert m["cosine"] == 0.0  # row 0: both zero, cosine 1; row 1: zero against (1, 0), cosine 0


def test_cache_metrics_look_at_real_positions_only():
    ref_k = np.zeros((2, 1, 3, 2))  # [batch, n_head, length, head_dim]
    test_k = ref_k.copy()
    test_k[0, 0, 0] = 100.0  # row 0, position 0: padding, ignored
    test_k[1, 0, 2] = [0.25, -0.5]  # row 1, position 2: real
    test_v = ref_k.copy()
    test_v[0, 0, 1, 1] = np.nan  # real
    real = np.array([[False, True, True], [True, True, True]])
    m = cache_metrics([(test_k, test_v)], [(ref_k, ref_k)], real)
    assert math.isnan(m["kv_max_abs"]) and (m["nan"], m["inf"]) == (1, 0)
    test_v[0, 0, 1, 1] = 0.0
    assert cache_metrics([(test_k, test_v)], [(ref_k, ref_k)], real)["kv_max_abs"] == 0.5


def test_agreeing_prefix():
    assert agreeing_prefix([1, 2, 3, 4], [1, 2, 3, 4]) == 4
    assert agreeing_prefix([1, 2, 9, 4], [1, 2, 3, 4]) == 2
    assert agreeing_prefix([7, 2], [1, 2]) == 0
    assert agreeing_prefix([1, 2], [1, 2, 3]) == 2


@pytest.mark.parametrize("metric, value, expected", [
    ("max_abs", 3.21e-3, 3.3e-3),
    ("max_abs", 3.2e-3, 3.2e-3),
    ("max_abs", 0.0, 0.0),
    ("kv_max_abs", 0.0995, 0.1),
    ("nonfinite", 3, 3),
    ("top1", 0.9876, 0.987),  # 1 - 0.9876 = 0.0124 -> 0.013
    ("top1", 1.0, 1.0),
    ("cosine", 0.9999873, 0.999987),  # rounded on 1 - cosine: 1.27e-5 -> 1.3e-5
    ("cosine", 0.99999439, 0.9999943),  # 1 - cosine = 5.61e-6 rounds to 5.6e-6: one step looser
    ("top5", 0.95, 0.95),  # 1 - 0.95 is 0.05000000000000004 in floats: still 0.95
    ("greedy", 0.5, 0.5),
    ("greedy", 0.0, 0.0),
])
def test_passing_tolerance_is_rounded_outward_and_passes(metric, value, expected):
    tolerance = passing_tolerance(metric, value)
    assert tolerance == expected and str(tolerance) == str(float(expected))  # what the report prints
    assert passes(metric, value, tolerance)


def test_passes_by_direction():
    assert passes("max_abs", 1e-4, 1e-4) and not passes("max_abs", 1.1e-4, 1e-4)
    assert passes("top1", 0.99, 0.99) and not passes("top1", 0.98, 0.99)
    assert passes("max_abs", 1e9, None)  # None: reported, not checked


def test_parse_tolerances():
    assert parse_tolerances(["max_abs=1e-3", "top1=0.99"]) == {"max_abs": 1e-3, "top1": 0.99}
    with pytest.raises(GptDeployError, match="METRIC one of max_abs, mean_abs"):
        parse_tolerances(["maxabs=1"])
    with pytest.raises(GptDeployError, match="'x' is not a number"):
        parse_tolerances(["top1=x"])
    with pytest.raises(GptDeployError, match="METRIC=VALUE"):
        parse_tolerances(["top1"])


def test_every_precision_has_a_tolerance_for_every_metric():
    for precision, tolerances in TOLERANCES.items():
        assert set(tolerances) == set(METRICS), precision
        assert tolerances["nonfinite"] == 0 and tolerances["top1"] >= 0.8 and tolerances["flip_lead"], precision


def test_the_looser_precision_sets_the_tolerances():
    assert looser_precision("fp32", "fp16") == looser_precision("fp16", "fp32") == "fp16"
    assert looser_precision("int8", "bf16") == "int8" and looser_precision("fp16", "q4") == "q4"


def test_prefill_inputs_left_pad():
    inputs = prefill_inputs([[5, 6, 7], [8]])
    assert inputs.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert inputs.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert inputs.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert inputs.real.tolist() == [[True, True, True], [False, False, True]]
    step = decode_inputs(inputs, np.array([9, 10]))
    assert step.input_ids.tolist() == [[9], [10]] and step.position_ids.tolist() == [[3], [1]]
    assert step.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]] and step.real.tolist() == [[True], [True]]


# --- every runtime x precision on this machine against torch fp32 ---

# The precisions each runtime runs (fp32-fused, int8, q4: the export's ONNX Runtime variants, which
# run on the CPU only); a runtime the registry gains later gets an fp32 row by itself.
PRECISIONS = {"torch": ["fp16", "bf16"], "hf": ["fp32"], "ort": ["fp32", "fp16", "fp32-fused", "int8", "q8", "q4"],
              "ort-cuda": ["fp32", "fp16"], "trt": ["fp32", "fp16"], "ort-trt": ["fp32", "fp16"]}
VARIANT_PRECISIONS = {"fp32-fused", "int8", "q8", "q4"}
CUDA_RUNTIMES = {"ort-cuda", "trt", "ort-trt"}


def _torch_cuda_missing():
    import torch

    return None if torch.cuda.is_available() else f"this PyTorch ({torch.__version__}) sees no CUDA GPU"


def _rows():
    rows = []
    for name, spec in RUNTIMES.items():
        for precision in PRECISIONS.get(name, ["fp32"]):
            marks = [pytest.mark.gpu] if name in CUDA_RUNTIMES else []
            if missing := spec.missing():
                marks.append(pytest.mark.skip(reason=f"runtime {name!r}: {'; '.join(missing)}"))
            rows.append(pytest.param(Target(name, precision), marks=marks, id=f"{name}-{precision}"))
    for precision in ["fp32", "fp16", "bf16"]:  # the reference model itself on the GPU
        rows.append(pytest.param(Target("torch", precision, "cuda"), id=f"torch-cuda-{precision}",
                                 marks=[pytest.mark.gpu, pytest.mark.skipif(
                                     bool(_torch_cuda_missing()), reason=str(_torch_cuda_missing()))]))
    return rows


@pytest.fixture(scope="session")
def tiny_variants_path(tiny_export_path, tmp_path_factory):
    """A copy of the tiny export with its ONNX Runtime variants (gptdeploy optimize)."""
    from gptdeploy.app.exporting import optimize_export

    folder = tmp_path_factory.mktemp("export") / "tiny-variants"
    shutil.copytree(tiny_export_path, folder)
    return optimize_export(folder, sorted(VARIANT_PRECISIONS)).folder.path


@pytest.fixture(scope="module")
def reference_record(tiny):
    """torch fp32 on `tiny`, recorded once for every row (gptdeploy parity records it once per run too)."""
    from gptdeploy.app.parity import record_reference
    from gptdeploy.runtimes.torch_runner import TorchRunner

    return record_reference(TorchRunner(tiny.model), tiny.tokenizer, PROMPTS, steps=QUICK["steps"],
                            greedy_tokens=QUICK["greedy_tokens"])


@pytest.mark.parametrize("target", _rows())
def test_runtime_matches_the_reference(target, request, reference_record):
    """Each row against torch fp32 with the tolerances of its precision."""
    from gptdeploy.app.parity import compare
    from gptdeploy.app.sources import open_runner

    fixture = {"fp32": "tiny_export_path", "fp16": "tiny_export_fp16_path"}.get(
        target.precision, "tiny_variants_path" if target.precision in VARIANT_PRECISIONS else None)
    runs_export = RUNTIMES[target.runtime].runs != "checkpoint"
    where = request.getfixturevalue(fixture) if fixture and runs_export else "tiny"
    runner, _ = open_runner(target.runtime, where, precision=target.precision, device=target.device,
                            weights="random")
    with runner:
        result = compare(runner, reference_record)
    assert result.runtime == target.runtime
    assert target.precision in (result.precision, result.variant)
    assert result.passed, "; ".join(c.describe() for c in result.failures)
    assert len(result.steps) == 5 and result.greedy["tokens"] == 16


# --- parity must be able to fail ---


def _change_one_weight(folder, to_folder):
    """A copy of the export folder whose with-past graph has one weight changed (a bias, +0.01)."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(folder, to_folder)
    graph_path = to_folder / "onnx" / "model.onnx"
    model = onnx.load(graph_path)
    (initializer,) = [i for i in model.graph.initializer if i.name.endswith("h.0.mlp.c_fc.bias")]
    weights = numpy_helper.to_array(initializer).copy()
    weights[7] += 0.01
    initializer.CopyFrom(numpy_helper.from_array(weights, initializer.name))
    onnx.save(model, graph_path)
    manifest_path = to_folder / "gptdeploy.json"  # keep the manifest's hashes true to the files
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["onnx/model.onnx"] = hashlib.sha256(graph_path.read_bytes()).hexdigest()
    manifest["sizes"]["onnx/model.onnx"] = graph_path.stat().st_size
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return to_folder


def test_a_changed_weight_fails_and_the_report_says_what_would_pass(tiny_export_path, tmp_path):
    broken = _change_one_weight(tiny_export_path, tmp_path / "broken")
    args = ["parity", "tiny", "--random", "--runtimes", "ort", "--export", str(broken), "--steps", "3",
            "--greedy-tokens", "8", "--json", str(tmp_path / "report.json")]
    result = gptdeploy(*args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL" in result.stdout and "Traceback" not in result.stderr
    suggested = dict(re.findall(r"passes with --tol (\w+)=(\S+)\)", result.stdout))
    assert "max_abs" in suggested and "kv_max_abs" in suggested, result.stdout  # the weight is in layer 0
    assert float(suggested["max_abs"]) > TOLERANCES["fp32"]["max_abs"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is False
    failed = {c["metric"]: c for c in report["runtimes"][0]["checks"] if not c["passed"]}
    assert set(failed) == set(suggested)
    assert failed["max_abs"]["failing_steps"][0] == "prefill" and "passes with" in failed["max_abs"]["message"]

    # the tolerances parity suggested do pass
    tols = [arg for metric, value in suggested.items() for arg in ("--tol", f"{metric}={value}")]
    again = gptdeploy(*args[:-2], *tols)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "PASS" in again.stdout


# --- the command ---


def test_parity_command_json_report(tmp_path, tiny_export_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello world\n\nThe\nA longer prompt, so that the batch is ragged\n")
    out = tmp_path / "report.json"
    result = gptdeploy("parity", "tiny", "--random", "--runtimes", "torch,ort", "--export", str(tiny_export_path),
                       "--prompts", str(prompts), "--steps", "2", "--greedy-tokens", "6", "--json", str(out),
                       "--tol", "top5=0.5")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ort fp32" in result.stdout and "PASS" in result.stdout
    assert "torch fp32 is the reference; not compared with itself" in result.stdout
    report = json.loads(out.read_text())
    assert report["format"] == "gptdeploy-parity" and report["passed"] is True
    assert report["reference"]["runtime"] == "torch" and report["reference"]["precision"] == "fp32"
    assert report["inputs"]["prompts"] == PROMPTS and report["inputs"]["cases"] == ["batch", "prompt 0", "prompt 1",
                                                                                     "prompt 2"]
    (ort,) = report["runtimes"]
    assert ort["runtime"] == "ort" and ort["tolerances"]["top5"] == 0.5
    assert [s["step"] for s in ort["steps"]] == ["prefill", "decode 1", "decode 2"]
    assert {c["metric"] for c in ort["checks"]} == set(METRICS)
    # the prefill's real positions: the batch's and each prompt's alone
    lengths = [2, 1, 11]
    assert ort["steps"][0]["positions"] == 2 * sum(lengths) and ort["steps"][1]["positions"] == 2 * len(lengths)
    assert ort["greedy"]["agreeing"] == [6, 6, 6] and len(report["inputs"]["reference_greedy_ids"][0]) == 6


@pytest.mark.parametrize("args, fragment", [
    (["--runtimes", "tensorflow"], "unknown runtime 'tensorflow'"),
    (["--runtimes", "torch"], "nothing to compare: torch fp32 is the reference"),
    (["--runtimes", ","], "--runtimes names no runtime"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--reference", ":fp16"], "--reference takes RUNTIME[:PRECISION]"),
    (["--tol", "max_abs"], "--tol takes METRIC=VALUE"),
    (["--tol", "speed=1"], "METRIC one of max_abs"),
    (["--tol", "top1=high"], "'high' is not a number"),
    (["--steps", "0"], "--steps and --greedy-tokens must be >= 1"),
    (["--prompts", "/nonexistent/prompts.txt"], "cannot read the prompts file"),
    (["--json", "/nonexistent/dir/report.json"], "does not exist"),
    (["--export", "/nonexistent"], "not a gptdeploy export folder"),
    (["--greedy-tokens", "128"], "new tokens = "),
])
def test_bad_input_is_one_line(args, fragment):
    assert_one_line_error(gptdeploy("parity", "tiny", "--random", *args), fragment)


def test_empty_prompts_file_is_one_line(tmp_path):
    (tmp_path / "p.txt").write_text("\n  \n")
    assert_one_line_error(gptdeploy("parity", "tiny", "--random", "--prompts", str(tmp_path / "p.txt")),
                          "holds no prompt")


def test_an_export_folder_needs_its_checkpoint_or_an_onnx_reference(lively_export_path):
    """lively's weights were made by a test, so its export's checkpoint cannot be loaded again."""
    assert_one_line_error(gptdeploy("parity", str(lively_export_path), "--runtimes", "ort"),
                          "which cannot be loaded now")


@pytest.mark.skipif(not RUNTIMES["ort-cuda"].missing(), reason="this machine can run ort-cuda")
def test_unavailable_runtime_says_how_to_install():
    assert_one_line_error(gptdeploy("parity", "tiny", "--random", "--runtimes", "ort,ort-cuda"), "pip install")


def test_parity_needs_no_torch_between_onnx_runtimes(tiny_export_path, tiny_export_fp16_path):
    """ort fp16 against an ort fp32 reference: the comparator and the ONNX runners, torch blocked."""
    code = """
        from gptdeploy.app.cli import main
        sys.argv = ["gptdeploy", "parity", sys.argv[1], "--reference", "ort", "--runtimes", "ort",
                    "--export", sys.argv[2], "--steps", "2", "--greedy-tokens", "4"]
        try:
            main()
        finally:
            assert sys.modules.get("torch") is None, "torch was imported"
    """
    result = run_without_torch(code, str(tiny_export_path), str(tiny_export_fp16_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ort fp16" in result.stdout and "against the reference ort (CPUExecutionProvider, fp32" in result.stdout


# --- gpt2 size ---


@pytest.mark.heavy
def test_gpt2_size_ort_fp32_and_fp16(tmp_path):
    """The whole path at GPT-2 124M scale: both exports into an empty cache, then parity with the defaults."""
    import os

    env = {**os.environ, "GPTDEPLOY_CACHE": str(tmp_path / "cache")}
    result = gptdeploy("parity", "gpt2", "--random", "--runtimes", "ort", "--precision", "fp32,fp16",
                       "--json", str(tmp_path / "report.json"), env=env)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(r["runtime"], r["precision"]) for r in report["runtimes"]] == [("ort", "fp32"), ("ort", "fp16")]
    assert all(r["passed"] for r in report["runtimes"])


def test_help_names_every_metric():
    result = gptdeploy("parity", "--help")
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    assert all(name in help_text for name in METRICS), help_text
