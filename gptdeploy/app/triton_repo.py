"""A Triton Inference Server model repository from an export folder (`gptdeploy triton`).

    write_repository(folder, "repo", name="shakespeare")

REPO/
  NAME/                    python backend, decoupled: text or token ids in, tokens streamed out
    config.pbtxt
    1/model.py             gptdeploy/app/triton_model.py
    1/gptdeploy/           the part of gptdeploy it runs (the core, runtimes, generation, batching)
    1/export/              the export folder it runs
  NAME_step/               onnxruntime backend: the KV-cache step graph, for clients that run the loop
    config.pbtxt
    1/model.onnx (+ its external data)
  README.md                how to serve it: docker run, KServe

Nothing in it points outside it: a stock Triton container serves it once onnxruntime and tiktoken are
installed in the container's Python (README.md).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import (
    INPUTS,
    MANIFEST,
    WITH_PAST,
    ExportFolder,
    data_files,
    past_names,
    present_names,
)
from gptdeploy.files import replace_folder, staging_folder
from gptdeploy.runtimes.base import OpenOptions

RUNTIMES = ("ort", "ort-cuda", "trt")  # trt here: ONNX Runtime's TensorRT accelerator in Triton
STEP_SUFFIX = "_step"
# what the python model's copy of gptdeploy holds, beside the core (every module directly in gptdeploy/)
APP_MODULES = ("__init__.py", "generation.py", "batching.py")
RUNTIME_MODULES = ("__init__.py", "base.py", "registry.py", "ort.py", "ort_trt.py", "trt.py")


@dataclass(frozen=True)
class RepoSettings:
    name: str = "gptdeploy"
    runtime: str = "ort"
    variant: str | None = None
    instances: int = 1
    max_batch: int = 16  # rows the python model decodes together (continuous batching)
    threads: int = 0  # ONNX Runtime intra-op threads per instance (0: one per core)
    huge_pages: bool = False  # ONNX Runtime on the CPU: the weights moved into huge pages once loaded

    def check(self) -> None:
        if self.runtime not in RUNTIMES:
            raise GptDeployError(f"--runtime {self.runtime!r}: a Triton repository runs {', '.join(RUNTIMES)}")
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name) or self.name[0] == ".":
            raise GptDeployError(f"--name {self.name!r}: use letters, digits, -, _ and .")
        if not 1 <= self.instances <= 64:
            raise GptDeployError(f"--instances must be from 1 to 64, got {self.instances}")
        if not 1 <= self.max_batch <= 256:
            raise GptDeployError(f"--max-batch must be from 1 to 256, got {self.max_batch}")
        if not 0 <= self.threads <= 256:
            raise GptDeployError(f"--threads must be from 0 to 256, got {self.threads}")
        OpenOptions(huge_pages=self.huge_pages).check_huge_pages(self.runtime)

    @property
    def gpu(self) -> bool:
        return self.runtime != "ort"


REPO_MARK = ".gptdeploy-triton"  # in every repository gptdeploy writes: what --force may replace


def write_repository(folder: ExportFolder, out: str | Path, settings: RepoSettings = RepoSettings(),
                     force: bool = False) -> Path:
    """Writes the repository into `out` (staged beside it, then renamed into place)."""
    settings.check()
    if settings.variant is not None:
        folder.variant(settings.variant)  # one clear error if the folder does not hold it
    out = Path(out).absolute()
    if out.exists() and not force:
        raise GptDeployError(f"{out} exists; pass --force to replace it")
    if out.exists() and not (out.is_dir() and ((out / REPO_MARK).is_file() or not any(out.iterdir()))):
        raise GptDeployError(f"{out} is not a model repository that gptdeploy wrote (no {REPO_MARK}); --force "
                             f"replaces only those, or an empty folder: choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with staging_folder(out) as stage:
            _write(folder, stage, settings)
            (stage / REPO_MARK).write_text("a Triton model repository written by gptdeploy triton\n")
            replace_folder(stage, out)
    except OSError as e:
        raise GptDeployError(f"cannot write the repository {out}: {e.strerror or e}") from None
    return out


def _write(folder: ExportFolder, repo: Path, s: RepoSettings) -> None:
    import gptdeploy
    import gptdeploy.app
    import gptdeploy.runtimes

    model = repo / s.name / "1"
    (model / "export").mkdir(parents=True)
    manifest = repository_manifest(folder, s.variant)
    for rel in manifest["files"]:
        _link_or_copy(folder.path / rel, model / "export" / rel)
    (model / "export" / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    package = model / "gptdeploy"
    for source, target, names in (
        (Path(gptdeploy.__file__).parent, package, None),
        (Path(gptdeploy.app.__file__).parent, package / "app", APP_MODULES),
        (Path(gptdeploy.runtimes.__file__).parent, package / "runtimes", RUNTIME_MODULES),
    ):
        target.mkdir(parents=True, exist_ok=True)
        for file in sorted(source.glob("*.py")):
            if names is None or file.name in names:
                shutil.copy2(file, target / file.name)
    shutil.copy2(Path(__file__).with_name("triton_model.py"), model / "model.py")
    (repo / s.name / "config.pbtxt").write_text(python_config(folder, s))

    step = repo / (s.name + STEP_SUFFIX) / "1"
    step.mkdir(parents=True)
    graph = folder.graph_path(WITH_PAST)
    _link_or_copy(graph, step / "model.onnx")
    for rel in data_files(folder.manifest["graphs"][WITH_PAST]):
        _link_or_copy(folder.path / rel, step / Path(rel).name)  # beside the graph, as it references them
    (repo / (s.name + STEP_SUFFIX) / "config.pbtxt").write_text(step_config(folder, s))
    (repo / "README.md").write_text(repository_readme(folder, s))


def repository_manifest(folder: ExportFolder, variant: str | None) -> dict:
    """The manifest of the export's copy in the repository: what the python model runs and nothing more.
    The graphs, their weights and the side files; the variant it serves (if one) with its weights; not the
    other variants, nor the TensorRT engines (the model runs ONNX Runtime). Its files keep their hashes,
    so the copy verifies like the export."""
    m = folder.manifest
    variants = {variant: m["variants"][variant]} if variant else {}
    dropped = {f for name, entry in m.get("variants", {}).items() if name != variant
               for f in (entry["file"], *data_files(entry))}
    dropped |= {entry["file"] for entry in (m.get("engines") or {}).values()}
    needed = {f for spec in [*m["graphs"].values(), *variants.values()] for f in (spec["file"], *data_files(spec))}
    files = {f: h for f, h in m["files"].items() if f not in dropped or f in needed}
    subset = {k: v for k, v in m.items() if k != "engines"}
    subset.update(files=files, sizes={f: n for f, n in m.get("sizes", {}).items() if f in files}, variants=variants)
    if not variants:
        subset.pop("variants")
    return subset


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # the same file, no copy, when the repository is on the export's filesystem
    except OSError:
        shutil.copy2(source, target)


def _instance_group(s: RepoSettings) -> str:
    return f"instance_group [{{ count: {s.instances}, kind: {'KIND_GPU' if s.gpu else 'KIND_CPU'} }}]"


def python_config(folder: ExportFolder, s: RepoSettings) -> str:
    """config.pbtxt of the python model: decoupled, batching done inside it (max_batch_size 0)."""
    params = {"runtime": "ort" if s.runtime == "ort" else "ort-cuda", "max_batch": str(s.max_batch),
              "threads": str(s.threads), "huge_pages": "1" if s.huge_pages else "0", "variant": s.variant or "",
              "max_prompt_bytes": "65536",
              "default_max_tokens": "64"}
    # the prompt; the generation settings (max_tokens, temperature, ...) are request parameters (triton_model.py)
    inputs = [("text_input", "TYPE_STRING", "[ 1 ]"), ("input_ids", "TYPE_INT64", "[ -1 ]")]
    outputs = [("text_output", "TYPE_STRING", "[ 1 ]"), ("token_ids", "TYPE_INT64", "[ -1 ]"),
               ("finish_reason", "TYPE_STRING", "[ 1 ]")]
    lines = [f'name: "{s.name}"', 'backend: "python"', "max_batch_size: 0",
             "model_transaction_policy { decoupled: true }", ""]
    lines += [f'input {{ name: "{n}" data_type: {t} dims: {d} optional: true }}' for n, t, d in inputs]
    lines += [f'output {{ name: "{n}" data_type: {t} dims: {d} }}' for n, t, d in outputs]
    lines += ["", _instance_group(s), ""]
    lines += [f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()]
    return "\n".join(lines) + "\n"


def step_config(folder: ExportFolder, s: RepoSettings) -> str:
    """config.pbtxt of the step graph on Triton's onnxruntime backend: every dim that varies is -1."""
    c = folder.config
    n_head, head_dim = c["n_head"], c["n_embd"] // c["n_head"]
    kv = "TYPE_FP16" if folder.precision == "fp16" else "TYPE_FP32"
    inputs = [(n, "TYPE_INT64", "[ -1, -1 ]") for n in INPUTS]
    inputs += [(n, kv, f"[ -1, {n_head}, -1, {head_dim} ]") for n in past_names(c["n_layer"])]
    outputs = [("logits", "TYPE_FP32", f"[ -1, -1, {c['vocab_size']} ]")]
    outputs += [(n, kv, f"[ -1, {n_head}, -1, {head_dim} ]") for n in present_names(c["n_layer"])]
    lines = [f'name: "{s.name}{STEP_SUFFIX}"', 'platform: "onnxruntime_onnx"', 'backend: "onnxruntime"',
             "max_batch_size: 0", ""]
    lines += [f'input {{ name: "{n}" data_type: {t} dims: {d} }}' for n, t, d in inputs]
    lines += [f'output {{ name: "{n}" data_type: {t} dims: {d} }}' for n, t, d in outputs]
    lines += ["", _instance_group(s)]
    if s.runtime == "trt":
        precision = "FP16" if folder.precision == "fp16" else "FP32"
        lines += ["optimization { execution_accelerators { gpu_execution_accelerator: [ { name: \"tensorrt\" "
                  f"parameters {{ key: \"precision_mode\" value: \"{precision}\" }} }} ] }} }}"]
    return "\n".join(lines) + "\n"


def repository_readme(folder: ExportFolder, s: RepoSettings) -> str:
    source = folder.source.get("source", "a gptdeploy export")
    gpus = " --gpus all" if s.gpu else ""
    return f"""# Triton model repository: {s.name}

Written by `gptdeploy triton` from {source} ({folder.precision}). Two models:

- `{s.name}`: Triton's python backend, decoupled. Text (`text_input`) or token ids (`input_ids`) in,
  with the request parameters `max_tokens`, `temperature` (0: greedy), `top_k`, `top_p`, `seed`,
  `stream` (over HTTP, keys of the generate request's JSON); out `text_output`,
  `token_ids`, `finish_reason`. It runs gptdeploy's generation over ONNX Runtime, and decodes the
  requests that arrive together as one batch (continuous batching). `1/gptdeploy/` is the part of
  gptdeploy it runs, `1/export/` the export folder.
- `{s.name}{STEP_SUFFIX}`: the KV-cache step graph (`{s.name}{STEP_SUFFIX}/1/model.onnx`, the export's `onnx/model.onnx`) on Triton's onnxruntime backend, for
  clients that run the generation loop themselves.

## Serve it with Docker

The python model needs onnxruntime{'-gpu' if s.gpu else ''} and tiktoken in the container's Python (numpy is there):

```bash
docker run --rm{gpus} -p 8000:8000 -p 8001:8001 -p 8002:8002 -v "$PWD":/models \\
  nvcr.io/nvidia/tritonserver:25.01-py3 \\
  bash -c "pip install -q onnxruntime{'-gpu' if s.gpu else ''} tiktoken && tritonserver --model-repository /models"
```

Then:

```bash
curl -s localhost:8000/v2/models/{s.name}/generate -d '{{"text_input": "ROMEO:", "max_tokens": 20, "temperature": 0}}'
curl -sN localhost:8000/v2/models/{s.name}/generate_stream -d '{{"text_input": "ROMEO:", "max_tokens": 20, "stream": true}}'
```

## KServe

Copy this folder to a bucket the cluster reads (`gs://BUCKET/{s.name}-repo` here), then:

```yaml
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: {s.name.lower().replace("_", "-").replace(".", "-")}
spec:
  predictor:
    model:
      modelFormat:
        name: triton
      storageUri: gs://BUCKET/{s.name}-repo
      runtimeVersion: 25.01-py3
      command: ["bash", "-c"]
      args: ["pip install -q onnxruntime{'-gpu' if s.gpu else ''} tiktoken && tritonserver --model-repository=/mnt/models --http-port=8080 --grpc-port=9000"]
      resources:
        limits: {{cpu: "2", memory: 4Gi{', nvidia.com/gpu: "1"' if s.gpu else ''}}}
```
"""
