"""Shared fixtures: small checkpoints in the formats users really have, built locally."""

from __future__ import annotations

import gc
import hashlib
import os
import pickle
import shutil

import pytest
import torch

from gptdeploy.model import GPT, GPTConfig

# ONNX Runtime's worker threads sleep between operators in the suite, in its process and in every command it
# starts (which inherit the environment). Spinning, ONNX Runtime's default, keeps a core busy for a while after
# each operator; over the suite's many short runs that was some 12% of its CPU time (the whole suite, run
# after run: 369 CPU-s with it, 323 without). What it changes is timing only; set
# GPTDEPLOY_ORT_SPINNING=1 to run the suite with ONNX Runtime's default.
os.environ.setdefault("GPTDEPLOY_ORT_SPINNING", "0")

TINY_HF = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """At the end of each test file, what is still alive (imports, session fixtures) leaves the garbage
    collector's view (gc.freeze, after a collection): the suite's process holds some 800,000 objects by
    its end, every full collection scanned them all (0.2-0.5 s each), and torch.onnx's export asks for one
    per graph (ONNXProgram.release): 27-31 CPU-s of the suite went to the collector, 3-8 with this.
    Objects frozen are still freed when their last reference goes; only a cycle among them would stay."""
    yield
    if nextitem is None or nextitem.module is not item.module:
        gc.collect()
        gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def private_export_cache(tmp_path_factory):
    """Tests never write into the user's export cache: $GPTDEPLOY_CACHE is a folder of this session's."""
    saved = os.environ.get("GPTDEPLOY_CACHE")
    os.environ["GPTDEPLOY_CACHE"] = str(tmp_path_factory.mktemp("gptdeploy-cache"))
    yield
    if saved is None:
        del os.environ["GPTDEPLOY_CACHE"]
    else:
        os.environ["GPTDEPLOY_CACHE"] = saved


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """A Hugging Face GPT2LMHeadModel with random weights, saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(**TINY_HF, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF initialises biases and LayerNorms to constants; make them matter
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    model.save_pretrained(folder)
    return folder


def write_nanogpt_checkpoint(folder, *, vocab_size=50304, meta: dict | None = None, dataset="openwebtext",
                             bias=True, seed=0, compiled=True):
    """A checkpoint as nanoGPT's train.py writes it, optionally after torch.compile (`_orig_mod.` keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, bias=bias, vocab_size=vocab_size, dropout=0.1)
    model = GPT(GPTConfig(**{k: v for k, v in args.items()}, gelu="exact"))
    model.init_weights(seed)
    prefix = "_orig_mod." if compiled else ""
    state = {prefix + k: v for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters())
    with torch.enable_grad():  # a real optimizer state, as after training
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).loss.backward()
        optimizer.step()
    torch.save(
        {
            "model": state,
            "optimizer": optimizer.state_dict(),
            "model_args": args,
            "iter_num": 100,
            "best_val_loss": torch.tensor(2.5),
            "config": {"dataset": dataset, "batch_size": 12, "learning_rate": 6e-4},
        },
        folder / "ckpt.pt",
    )
    if meta is not None:
        meta_dir = folder / "data" / dataset
        meta_dir.mkdir(parents=True)
        with open(meta_dir / "meta.pkl", "wb") as f:
            pickle.dump(meta, f)
    return folder / "ckpt.pt", model


@pytest.fixture
def char_meta():
    chars = sorted(set("\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))
    return {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}


def lively_tiny(seed=0):
    """The tiny preset's architecture with weights that make generation a real test.

    GPT-2's initialisation on a model this small makes greedy decoding repeat one token, and its top
    logits lie close together. Scaled-up weights (position embeddings most) and perturbed biases give
    a model that moves through many tokens, with its top logits far apart.
    """
    from gptdeploy.loading import LoadedModel
    from gptdeploy.presets import PRESETS
    from gptdeploy.tokenizer import BPETokenizer

    config = PRESETS["tiny"].config
    model = GPT(config)
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(20.0 if "wpe" in name else 3.0)
            else:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return LoadedModel(model.eval(), config, BPETokenizer(), "lively-tiny", f"lively tiny weights (seed {seed})",
                       _fingerprint=hashlib.sha256(f"lively-tiny-{seed}".encode()).hexdigest())


@pytest.fixture(scope="session")
def lively():
    return lively_tiny()


def _export(loaded, folder, precision="fp32"):
    from gptdeploy.app.exporting import export_model

    return export_model(loaded, folder, precision=precision)


# Exports are the suite's most expensive step (some 10 CPU-seconds each, mostly torch.export's tracing):
# each is made once per session, here, and tests that change one work on a copy.


@pytest.fixture(scope="session")
def lively_export_path(lively, tmp_path_factory):
    """`lively` exported to ONNX (fp32)."""
    return _export(lively, tmp_path_factory.mktemp("export") / "lively").path


@pytest.fixture(scope="session")
def lively_optimized_path(lively, lively_export_path, tmp_path_factory):
    """A copy of the lively export with every ONNX Runtime variant (gptdeploy optimize); read-only for tests:
    the outside clients (examples/) run it."""
    from gptdeploy.app.exporting import optimize_export
    from gptdeploy.export_folder import VARIANTS

    folder = tmp_path_factory.mktemp("optimized") / "lively"
    shutil.copytree(lively_export_path, folder)
    optimize_export(folder, list(VARIANTS), reference=lively.model)
    return folder


@pytest.fixture(scope="session")
def lively_shared(lively, tmp_path_factory):
    """`lively` exported with its weights in one shared file (external_data=True, as from 100 MB of weights),
    then given the fp32-fused variant (which shares it) and q4 (which does not): (folder, the shared file's
    os.stat before the variants were added)."""
    from gptdeploy.app.exporting import export_model, optimize_export

    folder = export_model(lively, tmp_path_factory.mktemp("shared") / "lively", external_data=True).path
    before = (folder / "onnx" / "model.onnx_data").stat()
    optimize_export(folder, ["fp32-fused", "q4"], reference=lively.model)
    return folder, before


@pytest.fixture(scope="session")
def greedy_ids():
    """greedy_ids(folder, prompts, new_tokens, variant=None): what `gptdeploy generate FOLDER --greedy --json`
    gives for the prompts as one batch, per row {"prompt_ids", "generated_ids"}; each asked once a session."""
    import json

    from tests.test_cli import gptdeploy

    answers = {}

    def outputs(folder, prompts, new_tokens, variant=None):
        key = (str(folder), tuple(prompts), new_tokens, variant)
        if key not in answers:
            result = gptdeploy("generate", folder, *[a for p in prompts for a in ("--prompt", p)], "--greedy",
                               "--max-new-tokens", new_tokens, "--json", *(["--variant", variant] if variant else []))
            assert result.returncode == 0, result.stderr
            answers[key] = [{k: o[k] for k in ("prompt_ids", "generated_ids")}
                            for o in json.loads(result.stdout)["outputs"]]
        return answers[key]

    return outputs


@pytest.fixture(scope="session")
def tiny():
    """The tiny preset with random weights (seed 0)."""
    from gptdeploy.loading import load

    return load("tiny", weights="random", seed=0)


@pytest.fixture(scope="session")
def tiny_export(tiny, tmp_path_factory):
    """`tiny` exported to ONNX (fp32): the ExportResult."""
    return _export(tiny, tmp_path_factory.mktemp("export") / "tiny-onnx")


@pytest.fixture(scope="session")
def tiny_export_path(tiny_export):
    return tiny_export.path


@pytest.fixture(scope="session")
def tiny_export_fp16(tiny, tmp_path_factory):
    """`tiny` exported to ONNX in fp16: the ExportResult."""
    return _export(tiny, tmp_path_factory.mktemp("export") / "tiny-onnx-fp16", precision="fp16")


@pytest.fixture(scope="session")
def tiny_export_fp16_path(tiny_export_fp16):
    return tiny_export_fp16.path


@pytest.fixture(scope="session")
def hf_export(hf_folder, tmp_path_factory):
    """The transformers-made `hf_folder` exported to ONNX (fp32): the ExportResult."""
    from gptdeploy.loading import load

    return _export(load(hf_folder), tmp_path_factory.mktemp("export") / "hf-onnx")


@pytest.fixture(scope="session")
def hf_export_path(hf_export):
    return hf_export.path


@pytest.fixture(scope="session")
def shakespeare():
    """The trained preset shipped in the package."""
    from gptdeploy.loading import load

    return load("shakespeare")


@pytest.fixture(scope="session")
def shakespeare_export_path(shakespeare, tmp_path_factory):
    return _export(shakespeare, tmp_path_factory.mktemp("export") / "shakespeare").path


@pytest.fixture(scope="session")
def shakespeare_optimized_path(shakespeare, shakespeare_export_path, tmp_path_factory):
    """A copy of the shakespeare export with every variant, as `gptdeploy export shakespeare --optimize`
    makes it; read-only for tests."""
    from gptdeploy.app.exporting import optimize_export
    from gptdeploy.export_folder import VARIANTS

    folder = tmp_path_factory.mktemp("optimized") / "shakespeare"
    shutil.copytree(shakespeare_export_path, folder)
    optimize_export(folder, list(VARIANTS), reference=shakespeare.model)
    return folder


def cache_holding(root, loaded, export_path):
    """An export cache at `root` that already holds `loaded`'s fp32 export (a copy of the one at
    `export_path`), as after an earlier run."""
    from gptdeploy.app.export_cache import ExportCache

    cache = ExportCache(root)
    shutil.copytree(export_path, cache.path(loaded, "fp32"))
    return cache


@pytest.fixture
def seeded_cache(tiny, tiny_export_path, tmp_path, monkeypatch):
    """An export cache (GPTDEPLOY_CACHE) that already holds `tiny`'s fp32 export, as after an earlier run."""
    cache = cache_holding(tmp_path / "cache", tiny, tiny_export_path)
    monkeypatch.setenv("GPTDEPLOY_CACHE", str(cache.root))
    return cache


@pytest.fixture(scope="session")
def shakespeare_folder(shakespeare_export_path):
    """The shakespeare export as an ExportFolder; read-only (repositories hard-link its files)."""
    from gptdeploy.export_folder import read_export

    return read_export(shakespeare_export_path)


@pytest.fixture(scope="session")
def triton_repository(shakespeare_folder, tmp_path_factory):
    """`gptdeploy triton`'s repository of the shakespeare export (model "shakespeare", max batch 8); read-only."""
    from gptdeploy.app.triton_repo import RepoSettings, write_repository

    return write_repository(shakespeare_folder, tmp_path_factory.mktemp("triton") / "repo",
                            RepoSettings("shakespeare", max_batch=8))


@pytest.fixture(scope="session")
def tiny_bench_cli(tiny, tiny_export_path, tmp_path_factory):
    """`gptdeploy bench tiny --random` on torch, ort and ort-cuda, batches 1 and 2, each runtime in a process
    of its own (the default), with --json and (where matplotlib is, the report extra) --report, the export
    cache holding the tiny export already, as after an earlier run: (the command's CompletedProcess, the JSON
    report, the page's path). One run for tests/test_bench.py and tests/test_html_report.py."""
    import importlib.util
    import json

    from tests.test_cli import gptdeploy

    folder = tmp_path_factory.mktemp("bench-cli")
    cache = cache_holding(folder / "cache", tiny, tiny_export_path)
    result = gptdeploy("bench", "tiny", "--random", "--runtime", "torch,ort,ort-cuda", "--batch", "1,2",
                       "--prompt-len", "4", "--new-tokens", "3", "--repeat", "1", "--json", folder / "bench.json",
                       *(["--report", folder / "bench.html"] if importlib.util.find_spec("matplotlib") else []),
                       env={**os.environ, "GPTDEPLOY_CACHE": str(cache.root)})
    assert result.returncode == 0, result.stderr
    return result, json.loads((folder / "bench.json").read_text()), folder / "bench.html"
