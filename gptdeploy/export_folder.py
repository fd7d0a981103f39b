"""The export folder: its layout, its IO contract, its manifest, and reading and writing it.

This is public API that other apps build on; change it only deliberately, and say so in
docs/export-folder.md. Reading needs neither torch nor onnx.

    <folder>/
      onnx/model.onnx            decoder with KV-cache inputs (the Optimum / transformers.js / genai "decoder")
      onnx/decoder_model.onnx    the same decoder without past inputs: the stateless scorer, and the
                                 prefill graph for TensorRT (which handles zero-length dimensions poorly)
      (fp16 exports name them model_fp16.onnx / decoder_model_fp16.onnx, after transformers.js' dtype suffixes)
      config.json                Hugging Face GPT-2 keys
      generation_config.json
      gpt2.tiktoken | meta.pkl   the tokenizer (+ tokenizer.json, tokenizer_config.json for GPT-2's BPE)
      gptdeploy.json             the manifest: source and hash, versions, opset, precision, IO signature,
                                 sha256 of every file, validation results
      onnx/model_fused.onnx, model_fp16.onnx, model_int8.onnx, model_q4.onnx
                                 optional ONNX Runtime variants of model.onnx (gptdeploy optimize),
                                 listed in the manifest's "variants"
      trt/prefill.engine, trt/decode.engine
                                 optional TensorRT engines (gptdeploy build-engine), in "engines"

Inputs of onnx/model.onnx: input_ids int64 [batch, sequence_length]; attention_mask int64
[batch, past_sequence_length + sequence_length]; position_ids int64 [batch, sequence_length];
past_key_values.{i}.key / .value [batch, n_head, past_sequence_length, head_dim] in the graph's
precision. Outputs: logits float32 [batch, sequence_length, vocab]; present.{i}.key / .value
[batch, n_head, past_sequence_length + sequence_length, head_dim].

Writing: a new export is assembled in a hidden folder beside its destination and moved into place
whole, manifest last (gptdeploy.files); a change to an existing export (variants, engines) moves its
new files in first and rewrites the manifest last, so the manifest never lists a file that is not there.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

from gptdeploy.errors import GptDeployError
from gptdeploy.files import STAGING_MARK, sha256_file, write_atomic
from gptdeploy.tokenizer import BPETokenizer, CharTokenizer, Tokenizer

MANIFEST = "gptdeploy.json"
FORMAT = "gptdeploy-export"
FORMAT_VERSION = 1
WITH_PAST = "with_past"  # graph roles, the keys of the manifest's "graphs"
NO_PAST = "no_past"
GRAPH_STEMS = {WITH_PAST: "model", NO_PAST: "decoder_model"}
PRECISION_SUFFIXES = {"fp32": "", "fp16": "_fp16"}  # the precisions an export's graphs come in

# Symbolic dimension names in the graphs' inputs and outputs
BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST_SEQUENCE = "past_sequence_length"
TOTAL_SEQUENCE = "past_sequence_length + sequence_length"
INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True)
class Variant:
    """An ONNX Runtime-specific variant of onnx/model.onnx (written by gptdeploy optimize)."""

    name: str
    file: str
    precision: str  # of the weights that matter: fp32, fp16, int8 or int4
    summary: str


# ONNX Runtime variants of the decoder with KV cache, named after transformers.js' dtype suffixes where
# one exists (model_fp16, model_int8, model_q4). They hold com.microsoft operators, so only ONNX Runtime
# runs them; model.onnx stays the portable graph.
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("fp32-fused", "onnx/model_fused.onnx", "fp32", "fused operators, fp32 weights (CPU)"),
        Variant("fp16", "onnx/model_fp16.onnx", "fp16", "fused operators, fp16 weights and KV cache (CUDA)"),
        Variant("int8", "onnx/model_int8.onnx", "int8", "fused operators, 8-bit block-quantized weights (CPU)"),
        Variant("q8", "onnx/model_quantized.onnx", "int8", "portable 8-bit dynamic quantization, standard ONNX "
                                                            "operators (transformers.js' q8)"),
        Variant("q4", "onnx/model_q4.onnx", "int4", "fused operators, 4-bit block-quantized weights (CPU)"),
    ]
}
# How a variant's KV cache is passed (the manifest's variants.<name>.kv_cache):
# KV_CONCAT: as in model.onnx, present = past + this step's keys/values, a new tensor each step.
# KV_SHARED_BUFFER: the past may be a preallocated buffer longer than the cache (its length is the
#   attention mask's minus sequence_length); binding the same buffer as the present makes ONNX Runtime
#   write the step's keys/values into it in place. Fed a past of exactly the cache's length, it
#   behaves as KV_CONCAT.
KV_CONCAT, KV_SHARED_BUFFER = "concat", "shared-buffer"
# An optional int64 scalar input of the variants: the logits of the last N positions only (0: all).
LOGITS_TO_KEEP = "num_logits_to_keep"
# TensorRT engines (gptdeploy build-engine): the prefill engine is built from the no-past graph, the
# decode engine from the graph with past; the manifest's "engines" records each (see gptdeploy.engines).
ENGINE_DIR = "trt"
PREFILL, DECODE = "prefill", "decode"
ENGINE_GRAPHS = {PREFILL: NO_PAST, DECODE: WITH_PAST}


def graph_file(role: str, precision: str = "fp32") -> str:
    """Path of a graph inside the folder, e.g. graph_file(WITH_PAST, "fp16") == "onnx/model_fp16.onnx"."""
    return f"onnx/{GRAPH_STEMS[role]}{PRECISION_SUFFIXES[precision]}.onnx"


def data_files(spec: dict) -> list[str]:
    """The external-data files a graph's manifest entry says it reads (relative to the folder): none when
    its weights are inside it; one or more (onnx/model.onnx_data, which graphs share, and the graph's own
    <graph>_data) otherwise. Manifests before shared weights held one file or null."""
    external = spec.get("external_data")
    if external is None:
        return []
    return [external] if isinstance(external, str) else list(external)


def engine_file(engine: str, precision: str) -> str:
    return f"{ENGINE_DIR}/{engine}{PRECISION_SUFFIXES[precision]}.engine"


def past_names(n_layer: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def io_signature(config: dict, role: str, precision: str) -> dict:
    """The inputs and outputs of a graph, as the manifest lists them: name, dtype and shape of each.

    config: GPTConfig fields (n_layer, n_head, n_embd, vocab_size).
    """
    n_layer, n_head = config["n_layer"], config["n_head"]
    head_dim = config["n_embd"] // n_head
    cache_dtype = "float16" if precision == "fp16" else "float32"
    cache_len = TOTAL_SEQUENCE if role == WITH_PAST else SEQUENCE

    def tensor(name, dtype, shape):
        return {"name": name, "dtype": dtype, "shape": shape}

    inputs = [
        tensor("input_ids", "int64", [BATCH, SEQUENCE]),
        tensor("attention_mask", "int64", [BATCH, cache_len]),
        tensor("position_ids", "int64", [BATCH, SEQUENCE]),
    ]
    if role == WITH_PAST:
        inputs += [tensor(name, cache_dtype, [BATCH, n_head, PAST_SEQUENCE, head_dim]) for name in past_names(n_layer)]
    outputs = [tensor("logits", "float32", [BATCH, SEQUENCE, config["vocab_size"]])]
    outputs += [tensor(name, cache_dtype, [BATCH, n_head, cache_len, head_dim]) for name in present_names(n_layer)]
    return {"inputs": inputs, "outputs": outputs}


@dataclass(frozen=True)
class ExportFolder:
    """An exported model folder, read from its manifest. Immutable: a change to the folder gives a new one."""

    path: Path
    manifest: dict

    @property
    def config(self) -> dict:
        """The GPTConfig fields (n_layer, n_head, n_embd, block_size, vocab_size, ...)."""
        return self.manifest["config"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def source(self) -> dict:
        """What the export was made from: {"source", "origin", "sha256"}."""
        return self.manifest.get("source", {})

    def graph_path(self, role: str) -> Path:
        return self.path / self.manifest["graphs"][role]["file"]

    @property
    def variants(self) -> dict[str, dict]:
        """The ONNX Runtime variants this folder holds: name -> manifest entry (file, precision, ...)."""
        return self.manifest.get("variants", {})

    @property
    def engines(self) -> dict[str, dict]:
        """The TensorRT engines this folder holds: prefill / decode -> manifest entry."""
        return self.manifest.get("engines") or {}

    def variant(self, name: str) -> dict:
        """The manifest entry of variant `name`; one clear error if the folder does not hold it."""
        if name not in VARIANTS:
            raise GptDeployError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
        if name not in self.variants:
            held = ", ".join(self.variants) or "none"
            raise GptDeployError(f"{self.path} has no {name} variant (it holds: {held}); add it with: "
                                 f"gptdeploy optimize {self.path} --variants {name}")
        return self.variants[name]

    def tokenizer(self) -> Tokenizer:
        spec = self.manifest["tokenizer"]
        file = self.path / spec["file"]
        if spec["type"] == "char":
            return CharTokenizer.from_meta(file)
        return BPETokenizer(file)


def is_export_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_export(path: str | Path) -> ExportFolder:
    """Reads an export folder's manifest and checks its form; one clear error if it is missing, corrupt, of a
    newer format, names a file outside the folder, or lists a graph that is not there. The files' contents
    are checked by ExportFolder.verify."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise GptDeployError(f"{path} is not a gptdeploy export folder (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GptDeployError(f"cannot read {manifest_path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or not isinstance(manifest.get("format_version"), int) or manifest["format_version"] > FORMAT_VERSION:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise GptDeployError(f"{manifest_path} is format {found!r} version {version}; this gptdeploy reads "
                             f"{FORMAT!r} up to version {FORMAT_VERSION}")
    problem = _manifest_problem(path, manifest)
    if problem:
        raise GptDeployError(f"{manifest_path} is malformed: {problem}")
    folder = ExportFolder(path, manifest)
    for role in manifest["graphs"]:
        if not folder.graph_path(role).is_file():
            raise GptDeployError(f"{path} is incomplete: {manifest['graphs'][role]['file']} is missing")
    for name, entry in folder.variants.items():
        if not (path / entry["file"]).is_file():
            raise GptDeployError(f"{path} is incomplete: {entry['file']} (variant {name}) is missing")
    return folder


def _manifest_problem(folder: Path, m: dict) -> str | None:
    """What is wrong with a manifest's form, in words; None when nothing is."""
    config = m.get("config")
    if not isinstance(config, dict):
        return "no config"
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        if not _positive_int(config.get(key)):
            return f"config.{key} is {config.get(key)!r}, not a positive integer"
    if config["n_embd"] % config["n_head"]:
        return f"config.n_embd ({config['n_embd']}) is not a multiple of config.n_head ({config['n_head']})"
    if m.get("precision") not in PRECISION_SUFFIXES:
        return f"precision {m.get('precision')!r} is not one of {', '.join(PRECISION_SUFFIXES)}"
    tokenizer = m.get("tokenizer")
    if not isinstance(tokenizer, dict) or tokenizer.get("type") not in ("gpt2-bpe", "char"):
        return "no tokenizer of type gpt2-bpe or char"
    files = m.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return "no files with their sha256"
    graphs = m.get("graphs")
    if not isinstance(graphs, dict) or WITH_PAST not in graphs or not set(graphs) <= set(GRAPH_STEMS):
        return f"graphs must hold {WITH_PAST} (and {NO_PAST})"
    named = [("tokenizer", tokenizer.get("file"))]
    named += [(f"graph {role}", spec.get("file") if isinstance(spec, dict) else None) for role, spec in graphs.items()]
    for role, spec in graphs.items():
        if isinstance(spec, dict) and not isinstance(spec.get("external_data"), (str, list, type(None))):
            return f"graph {role}'s external_data is malformed"
        named += [(f"graph {role}", data) for data in (data_files(spec) if isinstance(spec, dict) else [])]
    variants = m.get("variants", {})
    if not isinstance(variants, dict) or not set(variants) <= set(VARIANTS):
        return f"variants must be among {', '.join(VARIANTS)}"
    for name, entry in variants.items():
        if not isinstance(entry, dict) or entry.get("precision") not in ("fp32", "fp16", "int8", "int4"):
            return f"variant {name} is malformed"
        named += [(f"variant {name}", entry.get("file"))]
        if not isinstance(entry.get("external_data"), (str, list, type(None))):
            return f"variant {name}'s external_data is malformed"
        named += [(f"variant {name}", data) for data in data_files(entry)]
    engines = m.get("engines") or {}
    if not isinstance(engines, dict) or not all(isinstance(e, dict) for e in engines.values()):
        return "engines is malformed"
    named += [(f"{name} engine", entry.get("file")) for name, entry in engines.items()]
    for what, relative in named:
        if not isinstance(relative, str) or not _inside(folder, relative):
            return f"the {what} file {relative!r} is not a path inside the folder"
        if relative not in files:
            return f"the {what} file {relative} is not listed in its files"
    return None


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _inside(folder: Path, relative: str) -> bool:
    """Whether `relative` names a path inside `folder`, symbolic links followed."""
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return False
    try:
        return (folder / path).resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):
        return False


# --- verification ----------------------------------------------------------------------------------


class VerificationMemo:
    """Files already found to match a manifest, remembered across runs so that verifying again costs a stat.

    A file is known by its real path, size, modification and change times (the change time cannot be set
    back by a user, so a rewrite that restores the modification time is still seen), inode and device,
    with the sha256 it had. Kept as JSON at `path` (the export cache's verified.json); a memo that cannot
    be read or written is simply not used.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self._entries: dict[str, list] | None = None

    def _load(self) -> dict[str, list]:
        if self._entries is None:
            self._entries = {}
            if self.path is not None:
                try:
                    loaded = json.loads(self.path.read_text())
                    self._entries = loaded if isinstance(loaded, dict) else {}
                except (OSError, ValueError):
                    pass
        return self._entries

    @staticmethod
    def _stamp(path: Path) -> tuple[str, list]:
        st = path.stat()
        return str(path.resolve()), [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]

    def known(self, path: Path, sha256: str) -> bool:
        key, stamp = self._stamp(path)
        return self._load().get(key) == [*stamp, sha256]

    def remember(self, path: Path, sha256: str) -> None:
        key, stamp = self._stamp(path)
        self._load()[key] = [*stamp, sha256]

    def save(self) -> None:
        if self.path is None or self._entries is None:
            return
        entries = {k: v for k, v in self._entries.items() if Path(k).exists()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(entries))
        except OSError:
            pass


NO_MEMO = VerificationMemo(None)


def verify(folder: ExportFolder, files: list[str] | None = None, memo: VerificationMemo = NO_MEMO) -> None:
    """Checks `files` (default: every file the manifest lists) against the manifest: listed, present, the
    recorded size and sha256; and the manifest's config against config.json. One GptDeployError naming the
    first file that differs."""
    listed = folder.manifest["files"]
    sizes = folder.manifest.get("sizes", {})
    for relative in dict.fromkeys(listed if files is None else files):
        if relative not in listed:
            raise GptDeployError(f"{folder.path}: {relative} is not listed in {MANIFEST}; the folder was changed "
                                 f"after it was written")
        path = folder.path / relative
        if not path.is_file():
            raise GptDeployError(f"{folder.path} is incomplete: {relative} is missing")
        expected = listed[relative]
        if memo.known(path, expected):
            continue
        size = path.stat().st_size
        if relative in sizes and size != sizes[relative]:
            raise GptDeployError(f"{folder.path}: {relative} has {size} bytes, the manifest says {sizes[relative]}: "
                                 f"it was changed after the export was written (gptdeploy verify "
                                 f"{folder.path} lists every difference); export again")
        if sha256_file(path) != expected:
            raise GptDeployError(f"{folder.path}: {relative} does not match its sha256 in {MANIFEST}: it was "
                                 f"changed after the export was written (gptdeploy verify {folder.path} lists "
                                 f"every difference); export again")
        memo.remember(path, expected)
    if files is None or "config.json" in files:
        _check_config_json(folder)
    memo.save()


def differences(folder: ExportFolder) -> list[str]:
    """Every way the folder differs from its manifest, one line each (empty: it matches): missing,
    changed or unlisted files, and a config.json that disagrees with the manifest."""
    found = []
    sizes = folder.manifest.get("sizes", {})
    for relative, expected in folder.manifest["files"].items():
        path = folder.path / relative
        if not path.is_file():
            found.append(f"{relative}: missing")
        elif relative in sizes and path.stat().st_size != sizes[relative]:
            found.append(f"{relative}: {path.stat().st_size} bytes, the manifest says {sizes[relative]}")
        elif sha256_file(path) != expected:
            found.append(f"{relative}: its sha256 is not the manifest's")
    found += [f"{relative}: not listed in the manifest" for relative in unlisted_files(folder.path, folder.manifest)]
    if not any(line.startswith("config.json:") for line in found):
        try:
            _check_config_json(folder)
        except GptDeployError as e:
            found.append(str(e).removeprefix(f"{folder.path}: "))
    return found


def _check_config_json(folder: ExportFolder) -> None:
    """config.json (hashed in the manifest) and the manifest's own config must describe the same model."""
    path = folder.path / "config.json"
    if "config.json" not in folder.manifest["files"]:
        return
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GptDeployError(f"cannot read {path}: {e}") from None
    config = folder.config
    pairs = {"n_layer": "n_layer", "n_head": "n_head", "n_embd": "n_embd", "block_size": "n_positions",
             "vocab_size": "vocab_size"}
    for ours, theirs in pairs.items():
        if not isinstance(hf, dict) or hf.get(theirs) != config[ours]:
            found = hf.get(theirs) if isinstance(hf, dict) else None
            raise GptDeployError(f"{folder.path}: the manifest's {ours} ({config[ours]}) is not config.json's "
                                 f"{theirs} ({found}): {MANIFEST} was changed after the export was written")


def files_used(folder: ExportFolder, *, variant: str | None = None, graphs: tuple[str, ...] = (WITH_PAST,),
               engines: bool = False) -> list[str]:
    """The files a runtime reads: the tokenizer, config.json, and the variant's graph or the export's own
    `graphs` (with their external data), or its TensorRT engines."""
    manifest = folder.manifest
    files = [manifest["tokenizer"]["file"], "config.json"]
    if variant is not None:
        entry = folder.variant(variant)
        files += [entry["file"], *data_files(entry)]
    elif engines:
        files += [entry["file"] for entry in folder.engines.values()]
    else:
        for role in graphs:
            spec = manifest["graphs"][role]
            files += [spec["file"], *data_files(spec)]
    return list(dict.fromkeys(f for f in files if f))  # a shared weights file once


def unlisted_files(path: Path, manifest: dict) -> list[str]:
    """Files in an export folder that its manifest does not list (gptdeploy's own caches inside it aside)."""
    listed = set(manifest.get("files", {})) | {MANIFEST}
    found = []
    for file in sorted(p for p in path.rglob("*") if p.is_file() or p.is_symlink()):
        relative = file.relative_to(path).as_posix()
        if relative not in listed and not relative.startswith(f"{ENGINE_DIR}/ort/"):  # ONNX Runtime's engine cache
            found.append(relative)
    return found


def check_destination(out_dir: Path, force: bool) -> None:
    """Refuses, before any work, a destination that exists (without force) or that is not ours to replace:
    with --force, only an empty folder or a gptdeploy export whose manifest lists everything in it."""
    if not out_dir.exists():
        return
    if not force:
        raise GptDeployError(f"{out_dir} already exists; pass --force to replace it")
    if not out_dir.is_dir():
        raise GptDeployError(f"{out_dir} exists and is not a folder; refusing to replace it")
    if not any(out_dir.iterdir()):
        return
    if not (out_dir / MANIFEST).is_file():
        raise GptDeployError(f"{out_dir} is not an export folder (no {MANIFEST}); refusing to replace it, even with "
                             f"--force")
    try:
        folder = read_export(out_dir)
    except GptDeployError as e:
        raise GptDeployError(f"{out_dir} does not read as a gptdeploy export ({e}); refusing to replace it, even "
                             f"with --force") from None
    missing = [f for f in folder.manifest["files"] if not (out_dir / f).is_file()]
    extra = unlisted_files(out_dir, folder.manifest)
    if missing or extra:
        names = extra or missing
        what = "holds files its manifest does not list" if extra else "lacks files its manifest lists"
        raise GptDeployError(f"{out_dir} {what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}; "
                             f"refusing to replace it, even with --force (move them away, or choose another --out)")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_manifest(folder: Path, manifest: dict) -> dict:
    """Writes gptdeploy.json into a complete folder, with the sha256 and size of every other file; returns it."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name != MANIFEST and f.name != STAGING_MARK)
    manifest = {**manifest, "files": {f.relative_to(folder).as_posix(): sha256_file(f) for f in files},
                "sizes": {f.relative_to(folder).as_posix(): f.stat().st_size for f in files}}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def update_manifest(folder: ExportFolder, changes: dict, new_files: dict[str, str]) -> ExportFolder:
    """Merges `changes` (top-level keys; dict values are merged one level deep) and the sha256 of
    `new_files` (relative path -> sha256) into the manifest as it is on disk now, and rewrites it
    atomically. Returns the folder as it now is."""
    manifest = read_export(folder.path).manifest  # another process may have added something meanwhile
    for key, value in changes.items():
        manifest[key] = {**manifest.get(key, {}), **value} if isinstance(value, dict) else value
    manifest["files"] = dict(sorted({**manifest.get("files", {}), **new_files}.items()))
    manifest["sizes"] = dict(sorted({**manifest.get("sizes", {}),
                                     **{f: (folder.path / f).stat().st_size for f in new_files}}.items()))
    mode = (folder.path / MANIFEST).stat().st_mode & 0o777
    write_atomic(folder.path / MANIFEST, json.dumps(manifest, indent=2) + "\n", mode=mode)
    return ExportFolder(folder.path, manifest)
