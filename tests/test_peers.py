"""The other engines `gptdeploy bench` measures beside gptdeploy: CTranslate2 (ct2) and llama.cpp.

Oracles: the reference model's greedy tokens (CTranslate2 float32 and llama.cpp f32 must choose the same
ones), the model's own tensors (read back from the GGUF file), and llama.cpp's own converter where its
sources are at hand (GPTDEPLOY_TEST_LLAMA_CPP_SOURCES: a llama.cpp checkout, the one llama-cpp-python
vendors). llama-cpp-python compiles for half an hour, so CI does not install it: its tests are `heavy`
(run them with -m heavy where it is installed) and skip without it.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_cli import assert_one_line_error, gptdeploy

HAS_CT2 = importlib.util.find_spec("ctranslate2") is not None
HAS_GGUF = importlib.util.find_spec("gguf") is not None
HAS_LLAMA = HAS_GGUF and importlib.util.find_spec("llama_cpp") is not None
needs_ct2 = pytest.mark.skipif(not HAS_CT2, reason="CTranslate2 is not installed (pip install 'gptdeploy[ct2]')")
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="gguf is not installed")
needs_llama = pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed "
                                 "(pip install 'gptdeploy[llama-cpp]'; it compiles llama.cpp)")

PROMPT = [49, 2662, 46, 25]  # "ROMEO:"
NEW = 24


@pytest.fixture(scope="module")
def reference_ids(shakespeare):
    """The reference model's greedy tokens after PROMPT, end-of-text not stopping it."""
    from gptdeploy.app.generation import GenerationConfig, generate
    from gptdeploy.runtimes.torch_runner import TorchRunner

    runner = TorchRunner.open(shakespeare.model)
    result = generate(runner, shakespeare.tokenizer, [PROMPT],
                      GenerationConfig(max_new_tokens=NEW, greedy=True, stop_at_eot=False))
    return [int(t) for t in result.new_ids[0]]


@pytest.fixture(scope="module")
def peer_cache(tmp_path_factory):
    from gptdeploy.app.export_cache import ExportCache

    return ExportCache(tmp_path_factory.mktemp("peer-cache"))


@needs_ct2
def test_ct2_float32_chooses_the_reference_tokens(shakespeare, peer_cache, reference_ids):
    from gptdeploy.runtimes.peers import Ct2Engine

    path, record = peer_cache.peer(shakespeare, "ct2", "float32")
    assert record["weight_type"] == "float32" and record["weights_sha256"] == shakespeare.fingerprint
    engine = Ct2Engine.open(path / "model", threads=1)
    try:
        assert list(engine.greedy(PROMPT, NEW)) == reference_ids
        assert engine.describe()["kv_cache"] == {"keys": "float32", "values": "float32"}
    finally:
        engine.close()
    again, _ = peer_cache.peer(shakespeare, "ct2", "float32")  # reused: peer.json lists files still there
    assert again == path and json.loads((path / "peer.json").read_text())["files"]


@needs_ct2
def test_a_broken_conversion_in_the_cache_is_made_again(shakespeare, tmp_path):
    from gptdeploy.app.export_cache import ExportCache

    cache = ExportCache(tmp_path)
    path, record = cache.peer(shakespeare, "ct2", "int8")
    (path / "model" / "model.bin").write_bytes(b"truncated")
    again, record_again = cache.peer(shakespeare, "ct2", "int8")
    assert again == path and (path / "model" / "model.bin").stat().st_size == record_again["files"]["model/model.bin"]
    assert record_again["files"] == record["files"]


@needs_gguf
def test_gguf_holds_the_models_tensors_in_llama_cpps_layout(shakespeare, tmp_path):
    import gguf

    from gptdeploy.exporters.peers import write_gguf

    record = write_gguf(shakespeare, tmp_path / "m.gguf", "f32")
    weights = {k: v for k, v in shakespeare.model.state_dict().items() if k != "lm_head.weight"}  # tied
    assert record["tensor_types"] == {"f32": {"tensors": len(weights),
                                              "bytes": 4 * sum(v.numel() for v in weights.values())}}
    assert len(weights) == 4 + 12 * shakespeare.config.n_layer
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    state = {k: v.float().numpy() for k, v in shakespeare.model.state_dict().items()}
    np.testing.assert_array_equal(tensors["token_embd.weight"], state["transformer.wte.weight"])
    np.testing.assert_array_equal(tensors["position_embd.weight"], state["transformer.wpe.weight"])
    np.testing.assert_array_equal(tensors["blk.0.attn_qkv.weight"], state["transformer.h.0.attn.c_attn.weight"])
    np.testing.assert_array_equal(tensors["blk.5.ffn_down.bias"], state["transformer.h.5.mlp.c_proj.bias"])
    assert "output.weight" not in tensors  # tied: llama.cpp computes the logits with token_embd
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    assert fields["general.architecture"] == "gpt2" and fields["gpt2.context_length"] == 256
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.tokens"][25] == ":"


@pytest.mark.skipif(not os.environ.get("GPTDEPLOY_TEST_LLAMA_CPP_SOURCES"),
                    reason="set GPTDEPLOY_TEST_LLAMA_CPP_SOURCES to a llama.cpp checkout to compare with its converter")
@needs_gguf
def test_gguf_equals_llama_cpps_own_converter(shakespeare, tmp_path):
    import gguf

    from gptdeploy.exporters.peers import write_gguf, write_hf_folder

    sources = Path(os.environ["GPTDEPLOY_TEST_LLAMA_CPP_SOURCES"])
    write_hf_folder(shakespeare, tmp_path / "hf")
    subprocess.run([sys.executable, str(sources / "convert_hf_to_gguf.py"), str(tmp_path / "hf"), "--outfile",
                    str(tmp_path / "theirs.gguf"), "--outtype", "f32"], check=True, capture_output=True)
    write_gguf(shakespeare, tmp_path / "ours.gguf", "f32")
    ours, theirs = (gguf.GGUFReader(str(tmp_path / n)) for n in ("ours.gguf", "theirs.gguf"))
    theirs_by_name = {t.name: t for t in theirs.tensors}
    assert sorted(t.name for t in ours.tensors) == sorted(theirs_by_name)  # in another order: names say which
    for a in ours.tensors:
        b = theirs_by_name[a.name]
        assert a.tensor_type == b.tensor_type
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    skip = {"general.name", "general.size_label"}  # the converter names the model after its folder
    fields = [{f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.") and f.name not in skip}
              for r in (ours, theirs)]
    assert fields[0] == fields[1]


@pytest.mark.heavy
@needs_llama
@pytest.mark.parametrize("weight_type", ["f32", "q8_0"])
def test_llama_cpp_chooses_the_reference_tokens(shakespeare, peer_cache, reference_ids, weight_type):
    from gptdeploy.runtimes.peers import LlamaCppEngine

    path, record = peer_cache.peer(shakespeare, "llama.cpp", weight_type)
    assert weight_type in record["tensor_types"]
    engine = LlamaCppEngine.open(path / "model" / "model.gguf", threads=1)
    try:
        first = list(engine.greedy(PROMPT, NEW))
        assert list(engine.greedy(PROMPT, NEW)) == first  # the state is reset between generations
        assert engine.describe()["kv_cache"] == {"keys": "f16", "values": "f16"}
    finally:
        engine.close()
    # f32 weights with llama.cpp's f16 KV cache, q8_0 weights: the trained model's greedy choices hold
    assert first == reference_ids


PEER_SMALL = dict(batches=(1,), prompt_len=8, new_tokens=5, warmup=0, repeat=1, bandwidth_mib=64, isolate=False)


def bench_rows(peer_cache, monkeypatch, names) -> dict:
    """A small in-process bench of `names` on shakespeare: its rows by runtime, each checked to have run,
    with decode end to end = (total - first token) / (new tokens - 1)."""
    from gptdeploy.app.bench import run_bench
    from gptdeploy.app.bench_settings import OK, BenchSettings

    monkeypatch.setenv("GPTDEPLOY_CACHE", str(peer_cache.root))
    report = run_bench(BenchSettings("shakespeare", names, **PEER_SMALL))
    rows = {r["runtime"]: r for r in report["runtimes"]}
    assert all(rows[n]["status"] == OK for n in names), [rows[n].get("reason") for n in names]
    for name in names:
        b = rows[name]["batches"][0]
        g = b["generation"]
        assert g["decode_ms_per_token"] == pytest.approx((g["runs_s"][0] - g["ttft_ms"] / 1e3) / 4 * 1e3)
        assert b["speedup"]["decode_end_to_end"] > 0 and len(rows[name]["batches"]) == 1
    return rows


@needs_ct2
def test_bench_measures_the_other_engines_beside_gptdeploy(peer_cache, monkeypatch):
    from gptdeploy.app.bench import run_bench
    from gptdeploy.app.bench_settings import UNAVAILABLE, BenchSettings

    rows = bench_rows(peer_cache, monkeypatch, ("torch", "ct2", "ct2:int8"))
    ct2 = rows["ct2:int8"]
    assert ct2["conversion"]["quantization"] == "int8" and ct2["engine"]["compute_type"] == "int8_float32"
    assert ct2["setup"]["convert_s"] >= 0 and "KV cache float32" in ct2["runner"]
    assert ct2["batches"][0]["bandwidth_floor"]["weight_bytes"] < rows["ct2"]["batches"][0]["bandwidth_floor"]["weight_bytes"] / 3
    # another engine runs one sequence: at batch 2 it is a row saying so
    report = run_bench(BenchSettings("shakespeare", ("torch", "ct2"), **{**PEER_SMALL, "batches": (1, 2)}))
    row = {r["runtime"]: r for r in report["runtimes"]}["ct2"]
    assert row["status"] == UNAVAILABLE and "batch 1 only" in row["reason"]


@pytest.mark.heavy
@needs_llama
def test_bench_measures_llama_cpp_beside_gptdeploy(peer_cache, monkeypatch):
    q4 = bench_rows(peer_cache, monkeypatch, ("torch", "llama.cpp:q4_0"))["llama.cpp:q4_0"]
    assert q4["conversion"]["tensor_types"]["q4_0"]["tensors"] == 24 and "KV cache f16" in q4["runner"]


@pytest.mark.parametrize("args, fragment", [
    (["bench", "shakespeare", "--runtime", "ct2:q4_0"], "ct2 runs float32, int8"),
    (["bench", "shakespeare", "--runtime", "llama.cpp:int8"], "llama.cpp runs f32, f16, q8_0, q4_0"),
    (["generate", "shakespeare", "--runtime", "ct2"], "measured beside gptdeploy's runtimes by gptdeploy bench only"),
])
def test_other_engines_outside_bench_are_one_line(args, fragment):
    assert_one_line_error(gptdeploy(*args), fragment)
