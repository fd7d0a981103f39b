"""`gptdeploy.load`: a reference GPT from a preset, the Hub, a Hugging Face folder or a nanoGPT checkpoint.

Checkpoints are read with safetensors or `torch.load(weights_only=True)`: loading never runs code
from a file.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from gptdeploy.errors import GptDeployError, WeightsUnavailable
from gptdeploy.config import GPTConfig
from gptdeploy.environment import available_memory_bytes
from gptdeploy.model import GPT
from gptdeploy.presets import PRESETS
from gptdeploy.progress import QUIET, Progress
from gptdeploy.tokenizer import BPETokenizer, CharTokenizer, Tokenizer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Hugging Face's GPT-2 stores these projections as Conv1D, [in, out]: transposed relative to nn.Linear.
HF_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# transformers' activation_function for our GELU forms; config_from_hf reads them back
HF_ACTIVATIONS = {"tanh": "gelu_new", "exact": "gelu"}
# Metadata keys of the safetensors files gptdeploy writes (scripts/train_shakespeare.py)
CONFIG_KEY, TOKENIZER_KEY = "gptdeploy.config", "gptdeploy.tokenizer"


@dataclass
class LoadedModel:
    model: GPT
    config: GPTConfig
    tokenizer: Tokenizer
    source: str  # what the caller asked for
    origin: str  # where the weights came from, in words
    files: list[Path] = field(default_factory=list)  # the files the weights were read from
    random_seed: int | None = None  # random weights (GPT-2's initialisation from this seed); None: trained ones
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def is_random(self) -> bool:
        return self.random_seed is not None

    def source_record(self) -> dict:
        """What an export's manifest records of where its weights came from (gptdeploy.load takes it back): a
        preset by name, a checkpoint by its absolute path (so that it is found from any working directory)."""
        source = self.source
        if source not in PRESETS and Path(source).expanduser().exists():
            source = str(Path(source).expanduser().absolute())
        return {"source": source, "origin": self.origin, "sha256": self.fingerprint, "random_seed": self.random_seed}

    @property
    def fingerprint(self) -> str:
        """sha256 over the weight files (or over the random-init recipe): identifies these weights."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for path in self.files:
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 24):
                        h.update(chunk)
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def load(
    source: str | Path,
    *,
    weights: str | None = None,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    progress: Progress = QUIET,
) -> LoadedModel:
    """Loads a reference GPT in eval mode.

    source: a preset name (`shakespeare`, `gpt2`, `gpt2-medium`, ..., `tiny`), a Hugging Face GPT-2
        folder (config.json + model.safetensors or pytorch_model.bin), a nanoGPT checkpoint
        (`ckpt.pt`, or a folder holding one), or a `.safetensors` file written by gptdeploy's
        training script (the architecture in its metadata).
    weights: None for the source's own weights; "random" for the preset's architecture with
        GPT-2's initialisation from `seed`.
    progress: where a download from the Hub says what it fetches.
    Raises GptDeployError for a bad source; WeightsUnavailable (a GptDeployError) when a preset's weights
    are neither in the local Hugging Face cache nor downloadable.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise GptDeployError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if weights not in (None, "random"):
        raise GptDeployError(f"weights must be None or 'random', not {weights!r}")

    source_str = str(source)
    path = Path(source).expanduser()
    if weights == "random":
        loaded = _load_random(source_str, seed)
    elif path.exists():
        loaded = _load_path(path, source_str)
    elif source_str in PRESETS and PRESETS[source_str].packaged_file:
        loaded = _load_packaged(source_str)
    elif source_str in PRESETS:
        loaded = _load_hub(source_str, progress)
    else:
        raise GptDeployError(_unknown_source_message(source_str))
    if loaded.tokenizer.vocab_size > loaded.config.vocab_size:
        raise GptDeployError(f"{source_str}: the tokenizer has {loaded.tokenizer.vocab_size} tokens but the model only "
                             f"{loaded.config.vocab_size}: its embedding cannot take the tokenizer's ids")
    loaded.model.to(device=device, dtype=dtype).eval()
    return loaded


def _unknown_source_message(source: str) -> str:
    return (
        f"unknown model {source!r}: not a file or folder, and not a preset "
        f"(known presets: {', '.join(PRESETS)})"
    )


def _load_random(source: str, seed: int) -> LoadedModel:
    if source not in PRESETS:
        raise GptDeployError(f"random weights need a preset name; {_unknown_source_message(source)}")
    config = PRESETS[source].config
    model = _new_model(config, source)
    model.init_weights(seed)
    return LoadedModel(model, config, BPETokenizer(), source, f"random weights (GPT-2 init, seed {seed})",
                       random_seed=seed, _fingerprint=random_fingerprint(source, seed))


def random_fingerprint(preset: str, seed: int) -> str:
    """The fingerprint of a preset's random weights: a sha256 over the recipe, no model needed."""
    recipe = f"random:{preset}:{seed}:{json.dumps(PRESETS[preset].config.to_dict(), sort_keys=True)}"
    return hashlib.sha256(recipe.encode()).hexdigest()


def _load_path(path: Path, source: str) -> LoadedModel:
    if path.is_dir():
        if (path / "config.json").exists() and any((path / f).exists() for f in HF_WEIGHT_FILES):
            return _load_hf_folder(path, source, origin=f"Hugging Face folder {path}")
        if (path / "ckpt.pt").exists():
            return _load_nanogpt(path / "ckpt.pt", source)
        raise GptDeployError(
            f"{path} holds no model: expected config.json with model.safetensors or pytorch_model.bin "
            "(Hugging Face), or ckpt.pt (nanoGPT)"
        )
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return _load_nanogpt(path, source)
    if path.suffix == ".safetensors":
        return _load_gptdeploy_safetensors(path, source, origin=f"safetensors file {path}")
    raise GptDeployError(
        f"unknown checkpoint format: {path} (expected a nanoGPT .pt file, a gptdeploy .safetensors file "
        "or a model folder)"
    )


def _load_packaged(name: str) -> LoadedModel:
    """A preset whose weights ship inside the package: no network, no cache."""
    path = Path(str(resources.files("gptdeploy") / "data" / PRESETS[name].packaged_file))
    if not path.is_file():
        raise GptDeployError(f"the weights of preset {name!r} are missing from the installation ({path}); reinstall gptdeploy")
    loaded = _load_gptdeploy_safetensors(path, name, origin=f"packaged with gptdeploy ({path.name}, offline)")
    if loaded.config != PRESETS[name].config:
        raise GptDeployError(f"{path} does not hold the architecture of preset {name!r}; reinstall gptdeploy")
    return loaded


def _load_gptdeploy_safetensors(path: Path, source: str, origin: str) -> LoadedModel:
    """safetensors with the GPTConfig as JSON in its metadata; lm_head is tied, so it may be absent."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise GptDeployError(f"cannot read {path}: {e}") from None
    if CONFIG_KEY not in metadata:
        raise GptDeployError(
            f"{path} has no {CONFIG_KEY} metadata, so its architecture is unknown; for a Hugging Face "
            "model.safetensors, pass the folder that holds it with its config.json"
        )
    tokenizer_name = metadata.get(TOKENIZER_KEY, BPETokenizer.name)
    if tokenizer_name != BPETokenizer.name:
        raise GptDeployError(f"{path}: tokenizer {tokenizer_name!r} is not supported (only {BPETokenizer.name})")
    try:
        config = GPTConfig.from_dict(json.loads(metadata[CONFIG_KEY]))
    except (TypeError, ValueError) as e:
        raise GptDeployError(f"{path}: invalid {CONFIG_KEY} metadata: {e}") from None
    state = _read_tensors(path)
    if "transformer.wte.weight" in state:
        state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    model = _build(config, state, path)
    return LoadedModel(model, config, BPETokenizer(), source, origin, [path])


def _load_hub(name: str, progress: Progress) -> LoadedModel:
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo = PRESETS[name].hub_repo
    if repo is None:
        raise GptDeployError(f"preset {name!r} has no pretrained weights; load it with weights='random' (--random)")
    try:
        config_path, weights_path = _hub_files(repo, ["config.json", "model.safetensors"], progress)
    except LocalEntryNotFoundError:
        raise WeightsUnavailable(
            f"cannot download {name} from the Hugging Face Hub ({repo}) and it is not in the local cache; "
            f"connect once to cache it, pass a local folder or checkpoint, use random weights (--random), or try "
            f"the shakespeare preset, which ships with gptdeploy and works offline"
        ) from None
    except Exception as e:  # network errors, gated repos, bad tokens: one line, not a traceback
        raise WeightsUnavailable(f"cannot download {name} from the Hugging Face Hub ({repo}): "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return _load_hf_folder(Path(weights_path).parent, name, origin=f"Hugging Face Hub {repo}",
                           config_path=Path(config_path), weights_path=Path(weights_path))


HUB_PROBE_TIMEOUT_S = 5.0


def _hub_files(repo: str, filenames: list[str], progress: Progress) -> list[str]:
    """Paths of `filenames` in the local Hugging Face cache, downloading them when not cached.

    Before downloading, one request with a short timeout asks whether the Hub answers at all: without a
    network, huggingface_hub's own retries take half a minute to give up.
    """
    import os

    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import get_session
    from huggingface_hub.utils import logging as hub_logging

    try:
        return [hf_hub_download(repo, f, local_files_only=True) for f in filenames]
    except LocalEntryNotFoundError:
        pass
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise LocalEntryNotFoundError("HF_HUB_OFFLINE is set")
    progress.note(f"Downloading {', '.join(filenames)} of {repo} from the Hugging Face Hub ({constants.ENDPOINT}) "
                  f"into its cache")
    try:
        get_session().head(f"{constants.ENDPOINT}/api/models/{repo}", timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - unreachable, whatever the transport says: the same one line
        raise LocalEntryNotFoundError(f"{constants.ENDPOINT} does not answer") from None
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # its retry warnings would bury our one-line error
    try:
        return [hf_hub_download(repo, f) for f in filenames]
    finally:
        hub_logging.set_verbosity(verbosity)


def config_from_hf(hf: dict) -> GPTConfig:
    """Our config from a Hugging Face GPT-2 config.json; GptDeployError for one that makes no working model."""
    if not isinstance(hf, dict):
        raise GptDeployError(f"config.json holds a {type(hf).__name__}, not a mapping of GPT2Config's keys")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size") if k not in hf]
    if missing:
        raise GptDeployError(f"config.json lacks {', '.join(missing)}")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise GptDeployError(f"model_type {hf.get('model_type')!r} is not GPT-2")
    n_embd = hf["n_embd"]
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise GptDeployError(f"n_inner {hf['n_inner']} is not 4 * n_embd; the GPT architecture needs it")
    for unsupported in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(unsupported):
            raise GptDeployError(f"config option {unsupported} is not supported")
    if hf.get("scale_attn_weights") is False:
        raise GptDeployError("config option scale_attn_weights=false is not supported")
    act = hf.get("activation_function", "gelu_new")
    gelus = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "exact"}
    if act not in gelus:
        raise GptDeployError(f"activation_function {act!r} is not supported (choose one of {', '.join(gelus)})")
    try:
        return GPTConfig(
            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd, block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"], bias=True, dropout=0.0, gelu=gelus[act],
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        )
    except ValueError as e:
        raise GptDeployError(f"config.json: {e}") from None


def _load_hf_folder(folder: Path, source: str, origin: str, config_path: Path | None = None,
                    weights_path: Path | None = None) -> LoadedModel:
    config_path = config_path or folder / "config.json"
    if weights_path is None:
        weights_path = next(folder / f for f in HF_WEIGHT_FILES if (folder / f).exists())
    try:
        hf_config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise GptDeployError(f"cannot read {config_path}: {e}") from None
    try:
        config = config_from_hf(hf_config)
    except GptDeployError as e:
        raise GptDeployError(f"{config_path}: {str(e).removeprefix('config.json: ')}") from None
    state = _read_tensors(weights_path)
    converted = {}
    for key, tensor in state.items():
        name = key.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            continue
        if name == "lm_head.weight":
            converted[name] = tensor
            continue
        if name.endswith(HF_CONV1D_SUFFIXES):
            tensor = tensor.t()
        converted["transformer." + name] = tensor
    converted.setdefault("lm_head.weight", converted.get("transformer.wte.weight"))
    model = _build(config, converted, weights_path)
    return LoadedModel(model, config, BPETokenizer(), source, origin, [config_path, weights_path])


def _load_nanogpt(path: Path, source: str) -> LoadedModel:
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
        raise GptDeployError(f"{path} is not a nanoGPT checkpoint (no model_args/model keys)")
    args, weights = ckpt["model_args"], ckpt["model"]
    if not isinstance(args, dict) or not isinstance(weights, dict):
        raise GptDeployError(f"{path} is not a nanoGPT checkpoint: model_args and model must be mappings, not "
                             f"{type(args).__name__} and {type(weights).__name__}")
    try:
        config = GPTConfig(
            n_layer=args["n_layer"], n_head=args["n_head"], n_embd=args["n_embd"], block_size=args["block_size"],
            vocab_size=args["vocab_size"], bias=args.get("bias", True), dropout=0.0, gelu="exact",
        )
    except KeyError as e:
        raise GptDeployError(f"{path}: model_args lacks {e}") from None
    except ValueError as e:
        raise GptDeployError(f"{path}: model_args: {e}") from None
    state = {str(k).removeprefix("_orig_mod."): v for k, v in weights.items()}  # torch.compile's prefix
    model = _build(config, state, path)

    dataset = (ckpt.get("config") or {}).get("dataset")
    tokenizer: Tokenizer = BPETokenizer()
    files = [path]
    meta = _find_meta(path, dataset)
    if meta is not None:
        tokenizer = CharTokenizer.from_meta(meta)
        files.append(meta)
    return LoadedModel(model, config, tokenizer, source, f"nanoGPT checkpoint {path}", files)


def _find_meta(ckpt_path: Path, dataset: str | None) -> Path | None:
    """nanoGPT's sample.py reads data/<dataset>/meta.pkl; look beside the checkpoint first."""
    candidates = [ckpt_path.parent / "meta.pkl"]
    if dataset:
        for base in (ckpt_path.parent, ckpt_path.parent.parent, Path.cwd()):
            candidates.append(base / "data" / dataset / "meta.pkl")
    return next((c for c in candidates if c.exists()), None)


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
            raise GptDeployError(f"cannot read {path}: not a PyTorch checkpoint (corrupt, or another format)") from None
        reason = next((line.strip() for line in str(e).splitlines() if "unsupported global" in line.lower()),
                      "unsupported object")
        raise GptDeployError(
            f"{path} holds objects that only code execution could load; refusing to unpickle them ({reason})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError) as e:
        first = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptDeployError(f"cannot read {path}: {first} (empty, truncated or not a PyTorch checkpoint)") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise GptDeployError(f"cannot read {path}: {e}") from None
    state = _torch_load(path)
    if not isinstance(state, dict):
        raise GptDeployError(f"{path} does not hold a state dict")
    return state


def _new_model(config: GPTConfig, what) -> GPT:
    """GPT(config), after checking that its fp32 weights fit in the memory this machine has free."""
    need = config.num_params * 4
    available = available_memory_bytes()
    if available is not None and need > 0.9 * available:
        raise GptDeployError(f"{what}: {config.n_layer} layers of width {config.n_embd}, {config.block_size} "
                             f"positions and {config.vocab_size} tokens make {config.num_params:,} parameters, "
                             f"{need / 1e9:.1f} GB in fp32; this machine has {available / 1e9:.1f} GB free")
    return GPT(config)


def _build(config: GPTConfig, state: dict[str, torch.Tensor], path: Path) -> GPT:
    """A model with `state` loaded, after checking every name, shape and value."""
    model = _new_model(config, path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
        raise GptDeployError(f"{path}: weights do not match the architecture: {'; '.join(parts)}")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise GptDeployError(f"{path}: {name} is a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise GptDeployError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            bad = "not floating point" if not tensor.is_floating_point() else "NaN or Inf values"
            raise GptDeployError(f"{path}: tensor {name} holds {bad}; the checkpoint is broken")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model
