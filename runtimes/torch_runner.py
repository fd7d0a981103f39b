"""The `torch` runtime: the reference model itself, on CPU or CUDA, in fp32, fp16 or bf16."""

from __future__ import annotations

import numpy as np
import torch

from gptdeploy.model import GPT, KVCache
from gptdeploy.runtimes.base import ModelInfo, OpenOptions, Runner, StepOutput

PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class TorchRunner(Runner):
    """Runs a gptdeploy.GPT in eval mode where its weights are. The cache is the model's own KVCache."""

    name = "torch"

    def __init__(self, model: GPT):
        param = next(model.parameters())
        if param.dtype not in PRECISIONS:
            raise ValueError(f"the model's dtype {param.dtype} is not one of {', '.join(PRECISIONS.values())}")
        self.model = model.eval()
        self.info = ModelInfo.from_config(model.config.to_dict())
        self.precision = PRECISIONS[param.dtype]
        self._device = param.device
        self._dtype = param.dtype
        self.device = str(param.device)

    @classmethod
    def open(cls, target: GPT, options: OpenOptions = OpenOptions()) -> TorchRunner:
        """The model as it was loaded (gptdeploy.load's dtype and device)."""
        return cls(target)

    def new_cache(self, batch: int) -> KVCache:
        empty = torch.empty(batch, self.info.n_head, 0, self.info.head_dim, dtype=self._dtype, device=self._device)
        return [(empty, empty) for _ in range(self.info.n_layer)]

    def cache_length(self, cache: KVCache) -> int:
        return cache[0][0].shape[2]

    def cache_to_numpy(self, cache: KVCache) -> list[tuple[np.ndarray, np.ndarray]]:
        # numpy has no bfloat16: a bf16 cache comes back as float32 (exact, bf16 is a subset)
        def host(t):
            return (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()

        return [(host(k), host(v)) for k, v in cache]

    @torch.inference_mode()
    def _step(self, input_ids, attention_mask, position_ids, cache, last_only) -> StepOutput:
        def to_device(a):
            return torch.from_numpy(a).to(self._device)

        out = self.model(to_device(input_ids), attention_mask=to_device(attention_mask),
                         position_ids=to_device(position_ids), past_key_values=cache)
        logits = out.logits[:, -1:] if last_only else out.logits
        return StepOutput(logits.float().cpu().numpy(), out.present)
