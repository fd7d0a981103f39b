"""The `hf` runtime: Hugging Face transformers' GPT2LMHeadModel, with its own KV cache, on our weights.

It is the plain baseline that benchmarks compare every other runtime against: the model a user gets
from transformers, run the way its generate() runs it (DynamicCache, logits of the last position
only). The weights are the reference model's own, converted back to transformers' layout: its
attention and MLP projections are Conv1D modules, [in, out], transposed relative to nn.Linear.

transformers advances a DynamicCache in place. To keep the runner contract (an old cache stays
valid), a cache remembers its length; a step given a cache that a later step has already advanced
runs on a copy of its first `length` positions instead.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from gptdeploy.errors import GptDeployError
from gptdeploy.loading import HF_ACTIVATIONS, HF_CONV1D_SUFFIXES
from gptdeploy.model import GPT
from gptdeploy.runtimes.base import ModelInfo, OpenOptions, Runner, StepOutput
from gptdeploy.runtimes.torch_runner import PRECISIONS


class HfCache:
    """transformers' cache (None while empty) and the number of positions this cache stands for."""

    def __init__(self, cache, length: int, batch: int):
        self.cache = cache
        self.length = length
        self.batch = batch


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer, each [batch, n_head, length, head_dim]."""
    return [(entry[0], entry[1]) for entry in cache]


class HfRunner(Runner):
    """transformers.GPT2LMHeadModel in eval mode, on the device and in the dtype of the weights it was given."""

    name = "hf"

    def __init__(self, hf_model):
        import transformers

        self.model = hf_model.eval()
        config = hf_model.config
        self.info = ModelInfo(n_layer=config.n_layer, n_head=config.n_head, head_dim=config.n_embd // config.n_head,
                              block_size=config.n_positions, vocab_size=config.vocab_size)
        param = next(hf_model.parameters())
        self.precision = PRECISIONS[param.dtype]
        self._device = param.device
        self.device = str(param.device)
        self._dtype = param.dtype
        self._transformers_version = transformers.__version__
        # transformers 5 renamed the forward's past_key_values keyword (and output field) to `cache`
        parameters = inspect.signature(hf_model.forward).parameters
        self._cache_kw = "cache" if "cache" in parameters else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in parameters  # what generate() uses, where transformers has it

    @classmethod
    def open(cls, target: GPT, options: OpenOptions = OpenOptions()) -> HfRunner:
        return cls.from_gpt(target)

    @classmethod
    def from_gpt(cls, model: GPT) -> HfRunner:
        """A GPT2LMHeadModel holding `model`'s weights, on its device and in its dtype."""
        import transformers

        cfg = model.config
        if not cfg.bias:
            raise GptDeployError("transformers' GPT-2 always has biases; the hf runtime cannot run a model "
                                 "trained with bias=False")
        hf_config = transformers.GPT2Config(
            n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.block_size,
            vocab_size=cfg.vocab_size, activation_function=HF_ACTIVATIONS[cfg.gelu],
            layer_norm_epsilon=cfg.layer_norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            tie_word_embeddings=True,
        )
        param = next(model.parameters())
        hf_model = transformers.GPT2LMHeadModel(hf_config)
        state = {name: tensor.t() if name.endswith(HF_CONV1D_SUFFIXES) else tensor
                 for name, tensor in model.state_dict().items()}
        expected = set(hf_model.state_dict())
        if set(state) != expected:  # transformers renamed something: say what, rather than load half a model
            raise GptDeployError(f"transformers {transformers.__version__}'s GPT2LMHeadModel has other parameter "
                                 f"names: missing {sorted(expected - set(state))[:3]}, "
                                 f"unexpected {sorted(set(state) - expected)[:3]}")
        hf_model.load_state_dict(state)
        return cls(hf_model.to(device=param.device, dtype=param.dtype))

    def describe(self) -> str:
        attention = getattr(self.model.config, "_attn_implementation", None) or "default"
        return (f"{self.name} (transformers {self._transformers_version} GPT2LMHeadModel, {self.device}, "
                f"{self.precision}, {attention} attention)")

    def new_cache(self, batch: int) -> HfCache:
        return HfCache(None, 0, batch)

    def cache_length(self, cache: HfCache) -> int:
        return cache.length

    def cache_to_numpy(self, cache: HfCache) -> list[tuple[np.ndarray, np.ndarray]]:
        if cache.cache is None:
            empty = np.zeros((cache.batch, self.info.n_head, 0, self.info.head_dim), dtype=np.float32)
            return [(empty, empty) for _ in range(self.info.n_layer)]

        def host(t):
            return t[:, :, : cache.length].float().cpu().numpy()

        return [(host(k), host(v)) for k, v in _layers(cache.cache)]

    def _usable(self, cache: HfCache):
        """transformers' cache for this step: the cache itself, or a copy when a later step advanced it."""
        if cache.cache is None or cache.cache.get_seq_length() == cache.length:
            return cache.cache
        from transformers import DynamicCache

        return DynamicCache([(k[:, :, : cache.length], v[:, :, : cache.length]) for k, v in _layers(cache.cache)])

    @torch.inference_mode()
    def _step(self, input_ids, attention_mask, position_ids, cache: HfCache, last_only) -> StepOutput:
        def to_device(a):
            return torch.from_numpy(a).to(self._device)

        options = {self._cache_kw: self._usable(cache)}
        if self._logits_to_keep and last_only:
            options["logits_to_keep"] = 1  # the lm_head on the last position only, as generate() does
        out = self.model(to_device(input_ids), attention_mask=to_device(attention_mask),
                         position_ids=to_device(position_ids), use_cache=True, **options)
        logits = out.logits[:, -1:] if last_only else out.logits
        new_cache = getattr(out, self._cache_kw)
        return StepOutput(logits.float().cpu().numpy(),
                          HfCache(new_cache, cache.length + input_ids.shape[1], input_ids.shape[0]))

    def close(self) -> None:
        self.model = None
