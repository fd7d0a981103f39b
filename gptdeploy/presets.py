"""Named model architectures and where their weights live."""

from __future__ import annotations

from dataclasses import dataclass

from gptdeploy.config import GPTConfig


@dataclass(frozen=True)
class Preset:
    config: GPTConfig
    hub_repo: str | None = None  # Hugging Face Hub repository with the pretrained weights
    description: str = ""
    packaged_file: str | None = None  # weights shipped in gptdeploy/data/ (safetensors), loaded offline


PRESETS: dict[str, Preset] = {
    "gpt2": Preset(GPTConfig(n_layer=12, n_head=12, n_embd=768), "openai-community/gpt2", "GPT-2 124M"),
    "gpt2-medium": Preset(GPTConfig(n_layer=24, n_head=16, n_embd=1024), "openai-community/gpt2-medium", "GPT-2 350M"),
    "gpt2-large": Preset(GPTConfig(n_layer=36, n_head=20, n_embd=1280), "openai-community/gpt2-large", "GPT-2 774M"),
    "gpt2-xl": Preset(GPTConfig(n_layer=48, n_head=25, n_embd=1600), "openai-community/gpt2-xl", "GPT-2 1558M"),
    # Trained by scripts/train_shakespeare.py on tinyshakespeare and shipped in the package: works offline.
    "shakespeare": Preset(
        GPTConfig(n_layer=6, n_head=4, n_embd=128, block_size=256, gelu="tanh"), None,
        "6 layers, 128 wide, trained on Shakespeare (packaged)", packaged_file="shakespeare.safetensors",
    ),
    # Small architectures for tests and quick trials: random weights only.
    "tiny": Preset(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128), None, "2 layers, 64 wide (tests)"),
    "small": Preset(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256), None, "4 layers, 128 wide (tests)"),
}
