"""The runner interface: one model step with a KV cache, the same for every runtime.

A runner is what a runtime needs to take part in generation, parity and benchmarks, and nothing more
(Polygraphy's split: loaders build a runner, runners run, a comparator compares). numpy is the
currency at the boundary, so neither ONNX Runtime nor the generation loop needs torch.

    runner = OrtRunner(read_export("out/tiny"))         # or RUNTIMES["ort"].open(folder, OpenOptions())
    cache = runner.new_cache(batch=1)
    logits, cache = runner.step(input_ids, attention_mask, position_ids, cache, last_only=True)

The cache is opaque: a caller only passes it back into the next step (and, to compare runtimes,
reads it with cache_to_numpy). A runner never changes a cache in place, so an old cache stays valid.

A runner opens what already exists: an export folder, its engines, a loaded model. It never exports,
optimizes or builds anything; the application layer (gptdeploy.app.sources) makes what is missing first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from gptdeploy.errors import GptDeployError

Cache = Any  # each runner's own type; callers treat it as opaque


@dataclass(frozen=True)
class OpenOptions:
    """How a runner is asked to open what it runs (each runtime reads what applies to it)."""

    device: str | None = None  # "cpu", "cuda", "cuda:N"; None: the runtime's own default
    variant: str | None = None  # ONNX Runtime: a variant of the export (gptdeploy.export_folder.VARIANTS)
    threads: int = 0  # intra-op threads of ONNX Runtime; 0: its default (one per core)
    optimization: str = "all"  # ONNX Runtime's graph optimization level
    huge_pages: bool = False  # ONNX Runtime on CPU: the weights moved into huge pages once loaded (slower to open)

    def check_huge_pages(self, runtime: str) -> None:
        """Huge pages move ONNX Runtime's CPU buffers (gptdeploy.runtimes.hugepages): refused for another runtime,
        where they would do nothing."""
        if self.huge_pages and runtime != "ort":
            raise GptDeployError(f"--huge-pages is for the ort runtime (ONNX Runtime on the CPU), not {runtime}")

    def cuda_index(self, runtime: str) -> int:
        """N of "cuda:N" (0 for "cuda" or no device); GptDeployError for anything else."""
        device = self.device or "cuda:0"
        if device == "cuda":
            return 0
        if not device.startswith("cuda:") or not device[5:].isdigit():
            raise GptDeployError(f"device {device!r}: {runtime} takes cuda or cuda:N")
        return int(device[5:])


@dataclass(frozen=True)
class ModelInfo:
    """What a caller needs to know about a runner's model."""

    n_layer: int
    n_head: int
    head_dim: int
    block_size: int  # the context: past + new positions may not exceed it
    vocab_size: int  # the width of the logits; nanoGPT pads it (50304) beyond the tokenizer's

    @classmethod
    def from_config(cls, config: dict) -> ModelInfo:
        """From GPTConfig fields (GPTConfig.to_dict(), or an export manifest's "config")."""
        return cls(
            n_layer=config["n_layer"], n_head=config["n_head"], head_dim=config["n_embd"] // config["n_head"],
            block_size=config["block_size"], vocab_size=config["vocab_size"],
        )


class StepOutput(NamedTuple):
    logits: np.ndarray  # float32 [batch, seq, vocab], or [batch, 1, vocab] with last_only
    cache: Cache  # the cache with this step's keys and values appended


class Runner(ABC):
    """One runtime running one model. Subclasses implement `open` and the four abstract methods."""

    name: str  # the registry name: "torch", "ort", "ort-cuda", ...
    info: ModelInfo
    device: str  # "cpu", "cuda:0", ...
    precision: str  # gptdeploy.precision name of the weights it computes with: fp32, fp16, bf16, int8, int4

    @classmethod
    def open(cls, target, options: OpenOptions) -> Runner:
        """The runner for `target`: an ExportFolder (ONNX runtimes) or a gptdeploy.GPT (torch, hf)."""
        raise NotImplementedError

    @abstractmethod
    def new_cache(self, batch: int) -> Cache:
        """An empty cache (past length 0) for `batch` rows."""

    @abstractmethod
    def cache_length(self, cache: Cache) -> int:
        """The number of positions the cache holds."""

    @abstractmethod
    def cache_to_numpy(self, cache: Cache) -> list[tuple[np.ndarray, np.ndarray]]:
        """A host copy of the cache: per layer (key, value), each [batch, n_head, past_len, head_dim]."""

    @abstractmethod
    def _step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
              cache: Cache, last_only: bool) -> StepOutput:
        """step() after its inputs were checked."""

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: Cache,
             *, last_only: bool = False) -> StepOutput:
        """Runs the model on `input_ids` after the positions the cache holds.

        input_ids: int64 [batch, seq]; attention_mask: int64 [batch, past_len + seq], 0 for left
        padding; position_ids: int64 [batch, seq]. last_only: return the logits of the last position
        only (what generation needs), saving the copy of the others.
        """
        input_ids, attention_mask, position_ids = (
            np.ascontiguousarray(a, dtype=np.int64) for a in (input_ids, attention_mask, position_ids)
        )
        self._check_inputs(input_ids, attention_mask, position_ids, self.cache_length(cache))
        return self._step(input_ids, attention_mask, position_ids, cache, last_only)

    def _check_inputs(self, input_ids, attention_mask, position_ids, past_len):
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, seq] with seq >= 1, got shape {input_ids.shape}")
        batch, seq = input_ids.shape
        if attention_mask.shape != (batch, past_len + seq):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected "
                             f"({batch}, {past_len + seq}) = (batch, past_len + seq)")
        if position_ids.shape != (batch, seq):
            raise ValueError(f"position_ids has shape {position_ids.shape}, expected ({batch}, {seq})")
        if past_len + seq > self.info.block_size or int(position_ids.max()) >= self.info.block_size:
            raise ValueError(f"{past_len + seq} positions exceed the model's context (block_size "
                             f"{self.info.block_size})")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.info.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.info.vocab_size}), "
                             f"got {int(input_ids.min())}..{int(input_ids.max())}")

    def describe(self) -> str:
        """One line for logs and reports."""
        return f"{self.name} ({self.device}, {self.precision})"

    def close(self) -> None:
        """Releases sessions and device memory; the runner is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
